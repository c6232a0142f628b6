"""What the operator does next with each run: pure functions from the cluster's state to writes.

Inputs are frozen records made from API objects (see `view`); the outputs are status transitions,
each guarded by the resourceVersion it was decided on, and the next moment something becomes due
(a deadline, a `runAt`, a backoff, a schedule timeout, a heartbeat limit). `planner` applies
these per run, to the runs that changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from kubetask.lifecycle import (
    FINAL_PHASES,
    GiveUp,
    Phase,
    Reason,
    RetryPolicy,
    after_failure,
    format_time,
)
from kubetask_operator.flow import (
    Budget,
    ConcurrencyRule,
    RateLimitUse,
)
from kubetask_operator.limits import ExpressionError, compile_expression
from kubetask_operator.placement import AffinityTerm, WaitReason

WAITING_CONDITION = "Waiting"
NORMAL_WAITS = frozenset({WaitReason.SLOTS_BUSY, WaitReason.CONCURRENCY_LIMITED})


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    namespace: str
    name: str
    policy: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    schedule_timeout: timedelta = timedelta(minutes=5)
    execution_timeout: timedelta = timedelta(seconds=60)
    default_priority: int = 1
    affinity: tuple[AffinityTerm, ...] = ()
    workers: int | None = None
    """`status.workers` as last written: live workers serving the task."""
    concurrency: tuple[ConcurrencyRule, ...] = ()
    rate_limits: tuple[RateLimitUse, ...] = ()
    expressions_condition: tuple[str, str] | None = None
    """The (status, message) of its ExpressionsValid condition as last written."""

    def expression_errors(self) -> list[str]:
        """Why each of the task's CEL expressions does not compile (empty when all do)."""
        errors = []
        expressions = [rule.expression for rule in self.concurrency]
        expressions += [use.dynamic_key for use in self.rate_limits if use.dynamic_key]
        for expression in expressions:
            try:
                compile_expression(expression)
            except ExpressionError as exc:
                errors.append(str(exc))
        return errors


@dataclasses.dataclass(frozen=True)
class RunRecord:
    namespace: str
    name: str
    resource_version: str
    task: str
    created: datetime
    seq: int
    """FIFO tie-breaker below creationTimestamp's whole seconds (see `ClusterView.upsert_run`)."""
    priority: int | None = None
    run_at: datetime | None = None
    cancel: bool = False
    phase: Phase | None = None
    attempt: int = 0
    requeues: int = 0
    worker: str | None = None
    queued_at: datetime | None = None
    not_before: datetime | None = None
    deadline: datetime | None = None
    slot_released: bool = False
    reason: str | None = None
    input: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    waiting_reason: str | None = None
    """The reason of the run's Waiting condition, if it has one."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def task_key(self) -> tuple[str, str]:
        return (self.namespace, self.task)

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES


@dataclasses.dataclass(frozen=True)
class WorkerRecord:
    namespace: str
    pod: str
    node: str
    tasks: frozenset[str]
    slots: int
    labels: Mapping[str, str]
    ready: bool
    renewed: datetime | None

    def live(self, now: datetime, lost_after: timedelta) -> bool:
        return self.ready and self.renewed is not None and now - self.renewed < lost_after


@dataclasses.dataclass(frozen=True)
class Transition:
    """One status write: merge `status` into the run if it still has `resource_version`."""

    namespace: str
    name: str
    resource_version: str
    status: dict[str, Any]
    reason: str
    message: str
    warning: bool = False
    """Also post a Kubernetes Event: only failures do, to keep successful runs at 3 writes."""
    needs: tuple[str, ...] = ()
    """Rate-limit budgets whose spend must be written first; if one fails, this write is off."""


@dataclasses.dataclass(frozen=True)
class Spend:
    """Units taken from a rate limit's window: written to its RateLimit before the assignments
    that need them, so that a crash in between loses units rather than exceeding the limit."""

    budget: Budget
    used: int
    """Units used in the window after this pass."""


@dataclasses.dataclass(frozen=True)
class Limits:
    worker_lost_after: timedelta
    max_requeues: int
    wait_condition_after: timedelta


@dataclasses.dataclass(frozen=True)
class Decision:
    transitions: list[Transition]
    wake_at: datetime | None
    queued: int
    """Runs waiting for a worker after this decision (for the queue-depth metric)."""
    live_workers: int
    """Workers that count as live at this decision's time (for the live-workers metric)."""
    task_workers: dict[tuple[str, str], int]
    """Tasks whose `status.workers` differs from the live workers serving them now."""
    task_conditions: dict[tuple[str, str], dict[str, str]] = dataclasses.field(default_factory=dict)
    """Tasks whose ExpressionsValid condition must change, with the new condition."""
    spends: list[Spend] = dataclasses.field(default_factory=list)


EXPRESSIONS_CONDITION = "ExpressionsValid"


def expression_conditions(
    tasks: Mapping[tuple[str, str], TaskRecord], now: datetime
) -> dict[tuple[str, str], dict[str, str]]:
    """An ExpressionsValid condition for tasks with expressions, when it changes."""
    changes = {}
    for key, task in tasks.items():
        if not (task.concurrency or any(use.dynamic_key for use in task.rate_limits)):
            continue
        errors = task.expression_errors()
        status = "False" if errors else "True"
        message = " ".join(errors) if errors else "Every CEL expression compiles."
        if task.expressions_condition == (status, message):
            continue
        changes[key] = {
            "type": EXPRESSIONS_CONDITION,
            "status": status,
            "reason": "InvalidExpression" if errors else "Compiled",
            "message": message[:4000],
            "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    return changes


def task_worker_changes(
    tasks: Mapping[tuple[str, str], TaskRecord], live_workers: Iterable[WorkerRecord]
) -> dict[tuple[str, str], int]:
    serving: dict[tuple[str, str], int] = {}
    for worker in live_workers:
        for task in worker.tasks:
            key = (worker.namespace, task)
            serving[key] = serving.get(key, 0) + 1
    return {
        key: serving.get(key, 0)
        for key, task in tasks.items()
        if task.workers != serving.get(key, 0)
    }


class Wake:
    def __init__(self) -> None:
        self.earliest: datetime | None = None

    def at(self, moment: datetime | None) -> None:
        if moment is not None and (self.earliest is None or moment < self.earliest):
            self.earliest = moment


def review_running(
    run: RunRecord,
    task: TaskRecord,
    live_workers: Mapping[tuple[str, str], WorkerRecord],
    *,
    now: datetime,
    limits: Limits,
    wake: Wake,
) -> Transition | None:
    if run.cancel:
        return cancel(run, now, Reason.CANCELLED, "The run was cancelled while running.")
    if (run.namespace, run.worker or "") not in live_workers:
        if run.slot_released or run.requeues >= limits.max_requeues:
            why = (
                "it had released its slot"
                if run.slot_released
                else f"it was already re-queued {run.requeues} times"
            )
            return fail(run, now, Reason.WORKER_LOST, f"Worker {run.worker} was lost and {why}.")
        return _requeue(
            run,
            now,
            reason=Reason.WORKER_LOST,
            message=f"Worker {run.worker} was lost; the run is queued again without spending "
            "a retry.",
            not_before=None,
            requeues=run.requeues + 1,
        )
    if run.deadline is not None and run.deadline <= now:
        message = (
            f"Attempt {run.attempt} exceeded its execution timeout "
            f"({_seconds(task.execution_timeout)})."
        )
        outcome = after_failure(task.policy, attempt=run.attempt, retryable=True, now=now)
        error = {"message": message, "type": "ExecutionTimeout", "retryable": True}
        if isinstance(outcome, GiveUp):
            return fail(run, now, Reason.EXECUTION_TIMEOUT, message, error=error)
        return _requeue(
            run,
            now,
            reason=Reason.EXECUTION_TIMEOUT,
            message=f"{message} Retry {run.attempt} not before {format_time(outcome.not_before)}.",
            not_before=outcome.not_before,
            error=error,
        )
    wake.at(run.deadline)
    return None


def review_waiting(
    run: RunRecord, task: TaskRecord, now: datetime, wake: Wake
) -> tuple[Transition | None, bool]:
    """Cancellation, schedule timeout, `runAt` and backoff for a run that is not running.

    Returns the transition due now, if any, and whether the run may be assigned now.
    """
    if run.cancel:
        return cancel(run, now, Reason.CANCELLED, "The run was cancelled before it started."), False
    if run.run_at is not None and run.run_at > now and run.attempt == 0:
        wake.at(run.run_at)
        if run.phase is Phase.SCHEDULED:
            return None, False
        return Transition(
            run.namespace,
            run.name,
            run.resource_version,
            {"phase": Phase.SCHEDULED.value, "reason": Reason.SCHEDULED.value,
             "message": f"Waiting until {format_time(run.run_at)}."},
            reason=Reason.SCHEDULED.value,
            message=f"Scheduled for {format_time(run.run_at)}.",
        ), False  # fmt: skip
    expires = queued_since(run) + task.schedule_timeout
    if expires <= now:
        message = (
            f"The run was still waiting after its schedule timeout "
            f"({_seconds(task.schedule_timeout)})."
        )
        return cancel(run, now, Reason.SCHEDULE_TIMEOUT, message), False
    wake.at(expires)
    if run.not_before is not None and run.not_before > now:
        wake.at(run.not_before)
        return None, False
    return None, True


def queued_since(run: RunRecord) -> datetime:
    if run.queued_at is not None:
        return run.queued_at
    if run.run_at is not None and run.run_at > run.created:
        return run.run_at
    return run.created


def assignment(
    run: RunRecord,
    task: TaskRecord,
    worker: WorkerRecord,
    now: datetime,
    *,
    needs: tuple[str, ...] = (),
) -> Transition:
    """Queued → Running on `worker`: the one write that starts an attempt."""
    # A re-queue after losing the worker repeats the same attempt: it spent no retry.
    repeat = run.reason == Reason.WORKER_LOST.value and run.attempt > 0
    attempt = run.attempt if repeat else run.attempt + 1
    return Transition(
        run.namespace,
        run.name,
        run.resource_version,
        {
            "phase": Phase.RUNNING.value,
            "attempt": attempt,
            "worker": worker.pod,
            "node": worker.node,
            "startedAt": format_time(now),
            "deadline": format_time(now + task.execution_timeout),
            "queuedAt": format_time(queued_since(run)),
            "reason": Reason.ASSIGNED.value,
            "message": f"Attempt {attempt} assigned to worker {worker.pod} on node {worker.node}.",
            "notBefore": None,
            "slotReleased": None,
            "conditions": None,
        },
        reason=Reason.ASSIGNED.value,
        message=f"Assigned attempt {attempt} to worker {worker.pod}.",
        needs=needs,
    )


def cancel(run: RunRecord, now: datetime, reason: Reason, message: str) -> Transition:
    return Transition(
        run.namespace,
        run.name,
        run.resource_version,
        {
            "phase": Phase.CANCELLED.value,
            "reason": reason.value,
            "message": message,
            "finishedAt": format_time(now),
        },
        reason=reason.value,
        message=message,
        warning=reason is not Reason.CANCELLED,
    )


def fail(
    run: RunRecord,
    now: datetime,
    reason: Reason,
    message: str,
    *,
    error: dict[str, Any] | None = None,
) -> Transition:
    return Transition(
        run.namespace,
        run.name,
        run.resource_version,
        {
            "phase": Phase.FAILED.value,
            "reason": reason.value,
            "message": message,
            "error": error or {"message": message, "type": reason.value, "retryable": False},
            "finishedAt": format_time(now),
        },
        reason=reason.value,
        message=message,
        warning=True,
    )


def _requeue(
    run: RunRecord,
    now: datetime,
    *,
    reason: Reason,
    message: str,
    not_before: datetime | None,
    requeues: int | None = None,
    error: dict[str, Any] | None = None,
) -> Transition:
    status: dict[str, Any] = {
        "phase": Phase.QUEUED.value,
        "reason": reason.value,
        "message": message,
        "worker": None,
        "node": None,
        "startedAt": None,
        "deadline": None,
        "slotReleased": None,
        "queuedAt": format_time(now),
        "notBefore": format_time(not_before) if not_before else None,
    }
    if requeues is not None:
        status["requeues"] = requeues
    if error is not None:
        status["error"] = error
    return Transition(
        run.namespace, run.name, run.resource_version, status, reason=reason.value,
        message=message, warning=True,
    )  # fmt: skip


def _seconds(duration: timedelta) -> str:
    return f"{duration.total_seconds():g}s"
