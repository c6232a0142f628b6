"""What the operator does next with each run: pure functions from the cluster's state to writes.

Inputs are frozen records made from API objects (see `view`); the output is a list of status
transitions, each guarded by the resourceVersion it was decided on, and the next moment something
becomes due (a deadline, a `runAt`, a backoff, a schedule timeout, a heartbeat limit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
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
    FlowPlan,
    FlowRun,
    KeyMemo,
    Needs,
    RateLimitRecord,
    RateLimitUse,
    plan_flow,
)
from kubetask_operator.limits import ExpressionError, compile_expression
from kubetask_operator.placement import (
    WAIT_MESSAGES,
    AffinityTerm,
    QueuedRun,
    WaitReason,
    Worker,
    place,
)

WAITING_CONDITION = "Waiting"
_NORMAL_WAITS = frozenset({WaitReason.SLOTS_BUSY, WaitReason.CONCURRENCY_LIMITED})


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
    task_workers: dict[tuple[str, str], int]
    """Tasks whose `status.workers` differs from the live workers serving them now."""
    task_conditions: dict[tuple[str, str], dict[str, str]] = dataclasses.field(default_factory=dict)
    """Tasks whose ExpressionsValid condition must change, with the new condition."""
    spends: list[Spend] = dataclasses.field(default_factory=list)
    turns: dict[str, datetime] = dataclasses.field(default_factory=dict)
    """Round-robin keys given a run in this pass, with the time (for the next passes)."""


def decide(
    *,
    runs: Iterable[RunRecord],
    tasks: Mapping[tuple[str, str], TaskRecord],
    workers: Iterable[WorkerRecord],
    now: datetime,
    limits: Limits,
    rate_limits: Mapping[tuple[str, str], RateLimitRecord] | None = None,
    keys: KeyMemo | None = None,
    last_turn: Mapping[str, datetime] | None = None,
) -> Decision:
    """Every transition due at `now`, and when to look again.

    `keys` remembers rendered concurrency and rate-limit keys between passes; `last_turn` says
    when each round-robin key was last given a run.
    """
    live_workers = {
        (w.namespace, w.pod): w for w in workers if w.live(now, limits.worker_lost_after)
    }
    transitions: list[Transition] = []
    wake = _Wake()
    eligible: list[RunRecord] = []
    busy: dict[tuple[str, str], int] = {}
    holding: list[RunRecord] = []

    for run in runs:
        if run.final:
            continue
        task = tasks.get(run.task_key) or TaskRecord(run.namespace, run.task)
        if run.phase is Phase.RUNNING:
            change = _running(run, task, live_workers, now=now, limits=limits, wake=wake)
            if change is not None:
                transitions.append(change)
            else:
                holding.append(run)
                if run.worker is not None and not run.slot_released:
                    key = (run.namespace, run.worker)
                    busy[key] = busy.get(key, 0) + 1
            continue
        change, due = _waiting(run, task, now, wake)
        if change is not None:
            transitions.append(change)
        elif due:
            eligible.append(run)

    for worker in live_workers.values():
        wake.at(worker.renewed + limits.worker_lost_after if worker.renewed else None)
    flow = plan_flow(
        waiting=[_flow_run(run) for run in eligible if _limited(run, tasks)],
        running=[_flow_run(run) for run in holding if _limited(run, tasks)],
        rules={key: task.concurrency for key, task in tasks.items() if task.concurrency},
        rate_limits={key: task.rate_limits for key, task in tasks.items() if task.rate_limits},
        limit_objects=rate_limits or {},
        keys=keys or KeyMemo(),
        now=now,
    )
    by_key = {run.key: run for run in (*eligible, *holding)}
    for key, message in flow.failures.items():
        error = {"message": message, "type": "KeyExpressionError", "retryable": False}
        transitions.append(_fail(by_key[key], now, Reason.INVALID_INPUT, message, error=error))
    for key, message in flow.cancellations.items():
        transitions.append(_cancel(by_key[key], now, Reason.CONCURRENCY_CANCELLED, message))
    placeable = [run for run in eligible if run.key in flow.needs or not _limited(run, tasks)]

    placement = _assign(
        placeable, tasks, live_workers, busy, now,
        flow=flow, last_turn=last_turn or {},
    )  # fmt: skip
    transitions.extend(placement.transitions)
    transitions.extend(_waiting_conditions(placement.waiting, now, limits, wake))
    for run, reason in placement.waiting:
        if reason is WaitReason.RATE_LIMITED:
            for use in flow.needs[run.key].units:
                wake.at(flow.budgets[use.budget].window.end)
    return Decision(
        transitions=transitions,
        wake_at=wake.earliest,
        queued=len(placement.waiting),
        task_workers=_task_worker_changes(tasks, live_workers.values()),
        task_conditions=_expression_conditions(tasks, now),
        spends=placement.spends,
        turns=placement.turns,
    )


EXPRESSIONS_CONDITION = "ExpressionsValid"


def _expression_conditions(
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


def _limited(run: RunRecord, tasks: Mapping[tuple[str, str], TaskRecord]) -> bool:
    task = tasks.get(run.task_key)
    return task is not None and bool(task.concurrency or task.rate_limits)


def _flow_run(run: RunRecord) -> FlowRun:
    return FlowRun(
        key=run.key,
        task=run.task,
        input=run.input,
        metadata=run.metadata,
        order=(run.created, run.seq),
    )


def _task_worker_changes(
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


class _Wake:
    def __init__(self) -> None:
        self.earliest: datetime | None = None

    def at(self, moment: datetime | None) -> None:
        if moment is not None and (self.earliest is None or moment < self.earliest):
            self.earliest = moment


def _running(
    run: RunRecord,
    task: TaskRecord,
    live_workers: Mapping[tuple[str, str], WorkerRecord],
    *,
    now: datetime,
    limits: Limits,
    wake: _Wake,
) -> Transition | None:
    if run.cancel:
        return _cancel(run, now, Reason.CANCELLED, "The run was cancelled while running.")
    if (run.namespace, run.worker or "") not in live_workers:
        if run.slot_released or run.requeues >= limits.max_requeues:
            why = (
                "it had released its slot"
                if run.slot_released
                else f"it was already re-queued {run.requeues} times"
            )
            return _fail(run, now, Reason.WORKER_LOST, f"Worker {run.worker} was lost and {why}.")
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
            return _fail(run, now, Reason.EXECUTION_TIMEOUT, message, error=error)
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


def _waiting(
    run: RunRecord, task: TaskRecord, now: datetime, wake: _Wake
) -> tuple[Transition | None, bool]:
    """Cancellation, schedule timeout, `runAt` and backoff for a run that is not running.

    Returns the transition due now, if any, and whether the run may be assigned now.
    """
    if run.cancel:
        return _cancel(
            run, now, Reason.CANCELLED, "The run was cancelled before it started."
        ), False
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
    expires = _queued_since(run) + task.schedule_timeout
    if expires <= now:
        message = (
            f"The run was still waiting after its schedule timeout "
            f"({_seconds(task.schedule_timeout)})."
        )
        return _cancel(run, now, Reason.SCHEDULE_TIMEOUT, message), False
    wake.at(expires)
    if run.not_before is not None and run.not_before > now:
        wake.at(run.not_before)
        return None, False
    return None, True


def _queued_since(run: RunRecord) -> datetime:
    if run.queued_at is not None:
        return run.queued_at
    if run.run_at is not None and run.run_at > run.created:
        return run.run_at
    return run.created


@dataclasses.dataclass
class _Placement:
    transitions: list[Transition]
    waiting: list[tuple[RunRecord, WaitReason]]
    spends: list[Spend]
    turns: dict[str, datetime]


def _assign(
    eligible: Sequence[RunRecord],
    tasks: Mapping[tuple[str, str], TaskRecord],
    live_workers: Mapping[tuple[str, str], WorkerRecord],
    busy: Mapping[tuple[str, str], int],
    now: datetime,
    *,
    flow: FlowPlan,
    last_turn: Mapping[str, datetime],
) -> _Placement:
    # Placement works on flat names; a namespace prefix keeps namespaces apart.
    def scoped(namespace: str, name: str) -> str:
        return f"{namespace}/{name}"

    workers = [
        Worker(
            name=scoped(w.namespace, w.pod),
            tasks=frozenset(scoped(w.namespace, t) for t in w.tasks),
            slots=w.slots,
            busy=busy.get((w.namespace, w.pod), 0),
            labels=w.labels,
        )
        for w in live_workers.values()
    ]
    by_name = {scoped(run.namespace, run.name): run for run in eligible}
    queue = []
    for run in eligible:
        task = tasks.get(run.task_key) or TaskRecord(run.namespace, run.task)
        needs = flow.needs.get(run.key) or Needs()
        queue.append(
            QueuedRun(
                name=scoped(run.namespace, run.name),
                task=scoped(run.namespace, run.task),
                priority=run.priority or task.default_priority,
                queued_at=_queued_since(run),
                seq=run.seq,
                caps=needs.caps,
                units=needs.units,
                turn_key=needs.turn_key,
            )
        )
    affinity = {scoped(*key): task.affinity for key, task in tasks.items()}
    budgets = {budget_id: budget.remaining for budget_id, budget in flow.budgets.items()}
    result = place(
        queue, workers, affinity,
        running=flow.running, budgets=budgets, last_turn=last_turn, now=now,
    )  # fmt: skip

    transitions = []
    turns: dict[str, datetime] = {}
    for assignment in result.assignments:
        run = by_name[assignment.run]
        pod = assignment.worker.split("/", 1)[1]
        worker = live_workers[(run.namespace, pod)]
        task = tasks.get(run.task_key) or TaskRecord(run.namespace, run.task)
        needs = flow.needs.get(run.key) or Needs()
        if needs.turn_key is not None:
            turns[needs.turn_key] = now
        # A re-queue after losing the worker repeats the same attempt: it spent no retry.
        repeat = run.reason == Reason.WORKER_LOST.value and run.attempt > 0
        attempt = run.attempt if repeat else run.attempt + 1
        transitions.append(
            Transition(
                run.namespace,
                run.name,
                run.resource_version,
                {
                    "phase": Phase.RUNNING.value,
                    "attempt": attempt,
                    "worker": pod,
                    "node": worker.node,
                    "startedAt": format_time(now),
                    "deadline": format_time(now + task.execution_timeout),
                    "queuedAt": format_time(_queued_since(run)),
                    "reason": Reason.ASSIGNED.value,
                    "message": f"Attempt {attempt} assigned to worker {pod} on node {worker.node}.",
                    "notBefore": None,
                    "slotReleased": None,
                    "conditions": None,
                },
                reason=Reason.ASSIGNED.value,
                message=f"Assigned attempt {attempt} to worker {pod}.",
                needs=tuple(use.budget for use in needs.units),
            )
        )
    spends = [
        Spend(budget=flow.budgets[budget_id], used=flow.budgets[budget_id].used + units)
        for budget_id, units in result.spent.items()
    ]
    waiting = [
        (run, result.waiting[name]) for name, run in by_name.items() if name in result.waiting
    ]
    return _Placement(transitions=transitions, waiting=waiting, spends=spends, turns=turns)


def _waiting_conditions(
    waiting: Sequence[tuple[RunRecord, WaitReason]],
    now: datetime,
    limits: Limits,
    wake: _Wake,
) -> list[Transition]:
    """A Waiting condition for runs that wait for a missing worker or a rate limit's window.

    Busy slots and concurrency keys at their limit are the normal flow of a queue; writing a
    condition for them would cost a write per waiting run.
    """
    transitions = []
    for run, reason in waiting:
        if reason in _NORMAL_WAITS or run.waiting_reason == reason.value:
            continue
        due = _queued_since(run) + limits.wait_condition_after
        if due > now:
            wake.at(due)
            continue
        condition = {
            "type": WAITING_CONDITION,
            "status": "True",
            "reason": reason.value,
            "message": WAIT_MESSAGES[reason],
            "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        transitions.append(
            Transition(
                run.namespace,
                run.name,
                run.resource_version,
                {"phase": Phase.QUEUED.value, "conditions": [condition]},
                reason=reason.value,
                message=WAIT_MESSAGES[reason],
            )
        )
    return transitions


def _cancel(run: RunRecord, now: datetime, reason: Reason, message: str) -> Transition:
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


def _fail(
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
