"""The scheduler's memory between passes, so that a pass costs what changed, not what waits.

A pass reviews only the runs that changed since the last one (watch events), whose timer fell due
(a deadline, a `runAt`, a backoff, a schedule timeout, a Waiting condition) or whose worker was
lost. Assignable runs stay in a `RunQueue` across passes, and placement looks at the heads of its
groups only. Everything here is decision logic without I/O; `decide` runs one pass over a given
set of runs, for tests and as the reference the incremental passes must agree with.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Mapping
from datetime import datetime

from kubetask.lifecycle import Phase, Reason
from kubetask_operator.decisions import (
    NORMAL_WAITS,
    WAITING_CONDITION,
    Decision,
    Limits,
    RunRecord,
    Spend,
    TaskRecord,
    Transition,
    Wake,
    WorkerRecord,
    assignment,
    cancel,
    expression_conditions,
    fail,
    queued_since,
    review_running,
    review_waiting,
    task_worker_changes,
)
from kubetask_operator.flow import (
    Budget,
    ConcurrencyRule,
    FlowRun,
    KeyMemo,
    RateLimitRecord,
    RateLimitUse,
    Strategy,
    budget_for,
    counters_of,
)
from kubetask_operator.limits import ExpressionError, window_at
from kubetask_operator.placement import (
    WAIT_MESSAGES,
    Cap,
    Group,
    QueuedRun,
    RunQueue,
    Turn,
    Units,
    WaitReason,
    Worker,
    place_queue,
)

Key = tuple[str, str]

#: Round-robin turns kept before keys with no queued runs are pruned (then twice what is left).
#: Small enough to be a few hundred KiB, large enough that pruning is rare.
MIN_TURNS_BOUND = 1024


def scoped(namespace: str, name: str) -> str:
    """Placement works on flat names; a namespace prefix keeps namespaces apart."""
    return f"{namespace}/{name}"


def unscoped(name: str) -> Key:
    namespace, _, rest = name.partition("/")
    return (namespace, rest)


@dataclasses.dataclass(frozen=True)
class _BudgetSpec:
    namespace: str
    name: str
    limit: int | None
    duration: str | None
    dynamic_key: str | None


class Planner:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.queue = RunQueue()
        self.keys = KeyMemo()
        self.turns: dict[str, Turn] = {}
        self._turns_bound = MIN_TURNS_BOUND
        self._dirty: set[Key] = set()
        self._timers: list[tuple[datetime, Key]] = []
        self._running: dict[Key, RunRecord] = {}
        self._counters: dict[Key, tuple[str, ...]] = {}
        self._budget_specs: dict[str, _BudgetSpec] = {}
        self._group_reasons: dict[Group, WaitReason] = {}

    # --- what changed ------------------------------------------------------------------------

    def touch(self, key: Key) -> None:
        """The run changed, appeared or went away: review it in the next pass."""
        self._dirty.add(key)

    def touch_all(self, keys: Iterable[Key]) -> None:
        self._dirty.update(keys)

    @property
    def queued(self) -> int:
        return len(self.queue)

    # --- one pass ----------------------------------------------------------------------------

    def plan(
        self,
        *,
        runs: Mapping[Key, RunRecord],
        tasks: Mapping[Key, TaskRecord],
        workers: Iterable[WorkerRecord],
        now: datetime,
        rate_limits: Mapping[Key, RateLimitRecord] | None = None,
    ) -> Decision:
        rate_limits = rate_limits or {}
        live = {
            (w.namespace, w.pod): w for w in workers if w.live(now, self.limits.worker_lost_after)
        }
        wake = Wake()
        transitions: list[Transition] = []

        # Runs on a worker that is no longer live must be looked at again.
        for key, record in self._running.items():
            if (record.namespace, record.worker or "") not in live:
                self._dirty.add(key)
        while self._timers and self._timers[0][0] <= now:
            self._dirty.add(heapq.heappop(self._timers)[1])

        dirty, self._dirty = self._dirty, set()
        waiting: list[RunRecord] = []
        for key in dirty:
            run = runs.get(key)
            if run is None or run.final:
                self._forget(key)
                continue
            task = tasks.get(run.task_key) or TaskRecord(run.namespace, run.task)
            if run.phase is Phase.RUNNING:
                self._unqueue(key)
                run_wake = Wake()
                change = review_running(run, task, live, now=now, limits=self.limits, wake=run_wake)
                self._running[key] = run
                self._counters[key] = self._counter_names(run, tasks)
                if change is not None:
                    transitions.append(change)
                self._arm(key, run_wake.earliest)
            else:
                self._running.pop(key, None)
                self._counters.pop(key, None)
                waiting.append(run)

        holders: dict[str, list[RunRecord]] = {}
        for key, names in self._counters.items():
            for counter in names:
                holders.setdefault(counter, []).append(self._running[key])

        # Oldest first: a cancel strategy keeps or cancels runs by arrival.
        waiting.sort(key=lambda run: (run.created, run.seq))
        cancelled: set[Key] = set()
        for run in waiting:
            if run.key in cancelled:
                continue
            task = tasks.get(run.task_key) or TaskRecord(run.namespace, run.task)
            transitions.extend(self._review_waiting(run, task, runs, holders, cancelled, now=now))

        placement = self._place(runs=runs, tasks=tasks, live=live, rate_limits=rate_limits, now=now)
        transitions.extend(placement.transitions)
        transitions.extend(self._conditions(placement.blocked, runs, now))
        for group, reason in placement.blocked.items():
            if reason is WaitReason.RATE_LIMITED:
                for use in group[2]:
                    wake.at(placement.budgets[use.budget].window.end)

        for worker in live.values():
            wake.at(worker.renewed + self.limits.worker_lost_after if worker.renewed else None)
        if self._timers:
            wake.at(self._timers[0][0])
        return Decision(
            transitions=transitions,
            wake_at=wake.earliest,
            queued=len(self.queue),
            live_workers=len(live),
            task_workers=task_worker_changes(tasks, live.values()),
            task_conditions=expression_conditions(tasks, now),
            spends=placement.spends,
        )

    # --- reviewing runs ----------------------------------------------------------------------

    def _forget(self, key: Key) -> None:
        self._unqueue(key)
        self._running.pop(key, None)
        self._counters.pop(key, None)

    def _unqueue(self, key: Key) -> None:
        self.queue.discard(scoped(*key))

    def _arm(self, key: Key, moment: datetime | None) -> None:
        if moment is not None:
            heapq.heappush(self._timers, (moment, key))

    def _counter_names(self, run: RunRecord, tasks: Mapping[Key, TaskRecord]) -> tuple[str, ...]:
        rules = self._rules(tasks)
        if run.task_key not in rules:
            return ()
        try:
            return tuple(counter for counter, _ in counters_of(_flow_run(run), rules, self.keys))
        except ExpressionError:
            return ()  # it runs already; its key could not count before either

    @staticmethod
    def _rules(tasks: Mapping[Key, TaskRecord]) -> dict[Key, tuple[ConcurrencyRule, ...]]:
        return {key: task.concurrency for key, task in tasks.items() if task.concurrency}

    def _review_waiting(
        self,
        run: RunRecord,
        task: TaskRecord,
        runs: Mapping[Key, RunRecord],
        holders: dict[str, list[RunRecord]],
        cancelled: set[Key],
        *,
        now: datetime,
    ) -> list[Transition]:
        run_wake = Wake()
        change, assignable = review_waiting(run, task, now, run_wake)
        self._arm(run.key, run_wake.earliest)
        if change is not None or not assignable:
            self._unqueue(run.key)
            return [change] if change is not None else []

        flow = _flow_run(run)
        try:
            counters = counters_of(flow, {run.task_key: task.concurrency}, self.keys)
            units = tuple(self._units(flow, task.rate_limits))
        except ExpressionError as exc:
            self._unqueue(run.key)
            error = {"message": str(exc), "type": "KeyExpressionError", "retryable": False}
            return [fail(run, now, Reason.INVALID_INPUT, str(exc), error=error)]

        transitions: list[Transition] = []
        for counter, rule in counters:
            transitions.extend(
                self._strategy(
                    run, counter, rule, runs=runs, holders=holders, cancelled=cancelled, now=now
                )
            )
        if run.key in cancelled:
            self._unqueue(run.key)
            return transitions

        turn_key = next(
            (c for c, rule in counters if rule.strategy is Strategy.GROUP_ROUND_ROBIN), None
        )
        self.queue.put(
            QueuedRun(
                name=scoped(run.namespace, run.name),
                task=scoped(run.namespace, run.task),
                priority=run.priority or task.default_priority,
                queued_at=queued_since(run),
                seq=run.seq,
                caps=tuple(Cap(counter, rule.max_runs) for counter, rule in counters),
                units=units,
                turn_key=turn_key,
            )
        )
        transitions.extend(self._condition_for(run, now))
        return transitions

    def _units(self, run: FlowRun, uses: Iterable[RateLimitUse]) -> Iterable[Units]:
        for use in uses:
            spec = budget_for(run, use, self.keys)
            budget_id = scoped(spec[0], spec[1])
            self._budget_specs[budget_id] = _BudgetSpec(*spec)
            yield Units(budget=budget_id, units=use.units)

    def _strategy(
        self,
        run: RunRecord,
        counter: str,
        rule: ConcurrencyRule,
        *,
        runs: Mapping[Key, RunRecord],
        holders: dict[str, list[RunRecord]],
        cancelled: set[Key],
        now: datetime,
    ) -> list[Transition]:
        key_text = counter.split("/", 3)[3]
        running = [r for r in holders.get(counter, []) if r.key not in cancelled]
        queued = [
            runs[unscoped(name)]
            for name in self.queue.holding(counter)
            if unscoped(name) in runs and unscoped(name) not in cancelled
        ]
        victims: list[RunRecord] = []
        if rule.strategy is Strategy.CANCEL_NEWEST:
            if len(running) + len(queued) >= rule.max_runs:
                victims = [run]
            message = (
                f"Concurrency key {key_text!r} already has {rule.max_runs} runs "
                "(CancelNewest): this one was cancelled."
            )
        elif rule.strategy is Strategy.CANCEL_IN_PROGRESS:
            # The newest maxRuns runs of the key stay; every older one, running or not, goes.
            everyone = sorted([*running, *queued, run], key=lambda r: (r.created, r.seq))
            victims = everyone[: max(0, len(everyone) - rule.max_runs)]
            message = (
                f"Cancelled by a newer run of concurrency key {key_text!r} "
                f"(CancelInProgress, maxRuns {rule.max_runs})."
            )
        transitions = []
        for victim in victims:
            cancelled.add(victim.key)
            self._unqueue(victim.key)
            transitions.append(cancel(victim, now, Reason.CONCURRENCY_CANCELLED, message))
        return transitions

    # --- placement ---------------------------------------------------------------------------

    def _place(
        self,
        *,
        runs: Mapping[Key, RunRecord],
        tasks: Mapping[Key, TaskRecord],
        live: Mapping[Key, WorkerRecord],
        rate_limits: Mapping[Key, RateLimitRecord],
        now: datetime,
    ) -> _Placement:
        busy: dict[Key, int] = {}
        held: dict[str, int] = {}
        for key, record in self._running.items():
            if record.worker is not None and not record.slot_released:
                slot = (record.namespace, record.worker)
                busy[slot] = busy.get(slot, 0) + 1
            for counter in self._counters.get(key, ()):
                held[counter] = held.get(counter, 0) + 1
        workers = [
            Worker(
                name=scoped(w.namespace, w.pod),
                tasks=frozenset(scoped(w.namespace, t) for t in w.tasks),
                slots=w.slots,
                busy=busy.get((w.namespace, w.pod), 0),
                labels=w.labels,
            )
            for w in live.values()
        ]
        budgets = self._budgets(rate_limits, now)
        affinity = {scoped(*key): task.affinity for key, task in tasks.items()}
        result = place_queue(
            self.queue, workers, affinity,
            running=held,
            budgets={budget_id: b.remaining for budget_id, b in budgets.items()},
            last_turn=self.turns, now=now,
        )  # fmt: skip

        transitions = []
        for chosen in result.assignments:
            key = unscoped(chosen.run)
            run = runs[key]
            worker = live[unscoped(chosen.worker)]
            task = tasks.get(run.task_key) or TaskRecord(run.namespace, run.task)
            queued = result.popped[chosen.run]
            needs = tuple(use.budget for use in queued.units)
            transitions.append(assignment(run, task, worker, now, needs=needs))
        self.turns.update(result.turns)
        if len(self.turns) > self._turns_bound:
            # A turn only orders the queued runs of its key; a key with none waiting forgets it,
            # and its next run competes by arrival. Pruning when the map has doubled keeps the
            # cost per pass constant on average.
            self.turns = {key: turn for key, turn in self.turns.items() if self.queue.holding(key)}
            self._turns_bound = max(MIN_TURNS_BOUND, 2 * len(self.turns))
        spends = [
            Spend(budget=budgets[budget_id], used=budgets[budget_id].used + units)
            for budget_id, units in result.spent.items()
        ]
        return _Placement(transitions, result.blocked, spends, budgets)

    def _budgets(
        self, rate_limits: Mapping[Key, RateLimitRecord], now: datetime
    ) -> dict[str, Budget]:
        needed = {use.budget for group in self.queue.groups() for use in group[2]}
        budgets = {}
        for budget_id in needed:
            spec = self._budget_specs[budget_id]
            record = rate_limits.get((spec.namespace, spec.name))
            if spec.dynamic_key is not None:
                limit = record.limit if record else spec.limit or 0
                duration = record.duration if record else spec.duration or "minute"
            else:
                # A static limit that does not exist (yet) has no units: its runs wait for it.
                limit = record.limit if record else 0
                duration = record.duration if record else "minute"
            window = window_at(duration, now)
            used = record.used if record and record.window_start == window.start else 0
            budgets[budget_id] = Budget(
                spec.namespace, spec.name, limit, duration, window, used, record, spec.dynamic_key
            )
        return budgets

    # --- Waiting conditions ------------------------------------------------------------------

    def _conditions(
        self, blocked: Mapping[Group, WaitReason], runs: Mapping[Key, RunRecord], now: datetime
    ) -> list[Transition]:
        """When a group starts waiting for something that needs attention, its runs that have
        waited long enough get a Waiting condition; the others get a timer for it."""
        transitions = []
        for group, reason in blocked.items():
            if self._group_reasons.get(group) == reason or reason in NORMAL_WAITS:
                continue
            for queued in self.queue.members(group):
                run = runs.get(unscoped(queued.name))
                if run is None:
                    continue
                due = queued_since(run) + self.limits.wait_condition_after
                if due > now:
                    self._arm(run.key, due)
                elif run.waiting_reason != reason.value:
                    transitions.append(waiting_condition(run, reason, now))
        self._group_reasons = dict(blocked)
        return transitions

    def _condition_for(self, run: RunRecord, now: datetime) -> list[Transition]:
        """A run joining (or still in) a group that waits for attention gets its condition once
        it has waited long enough, and a timer until then."""
        queued = self.queue.get(scoped(run.namespace, run.name))
        reason = self._group_reasons.get(queued.group) if queued else None
        if reason is None or reason in NORMAL_WAITS or run.waiting_reason == reason.value:
            return []
        due = queued_since(run) + self.limits.wait_condition_after
        if due > now:
            self._arm(run.key, due)
            return []
        return [waiting_condition(run, reason, now)]


@dataclasses.dataclass
class _Placement:
    transitions: list[Transition]
    blocked: dict[Group, WaitReason]
    spends: list[Spend]
    budgets: dict[str, Budget]


def waiting_condition(run: RunRecord, reason: WaitReason, now: datetime) -> Transition:
    condition = {
        "type": WAITING_CONDITION,
        "status": "True",
        "reason": reason.value,
        "message": WAIT_MESSAGES[reason],
        "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return Transition(
        run.namespace,
        run.name,
        run.resource_version,
        {"phase": Phase.QUEUED.value, "conditions": [condition]},
        reason=reason.value,
        message=WAIT_MESSAGES[reason],
    )


def _flow_run(run: RunRecord) -> FlowRun:
    return FlowRun(
        key=run.key, task=run.task, input=run.input, metadata=run.metadata,
        order=(run.created, run.seq),
    )  # fmt: skip


def decide(
    *,
    runs: Iterable[RunRecord],
    tasks: Mapping[Key, TaskRecord],
    workers: Iterable[WorkerRecord],
    now: datetime,
    limits: Limits,
    rate_limits: Mapping[Key, RateLimitRecord] | None = None,
    keys: KeyMemo | None = None,
    last_turn: Mapping[str, Turn] | None = None,
) -> Decision:
    """One pass of a fresh planner over `runs`: every transition due at `now`."""
    planner = Planner(limits)
    if keys is not None:
        planner.keys = keys
    planner.turns = dict(last_turn or {})
    by_key = {run.key: run for run in runs}
    planner.touch_all(by_key)
    return planner.plan(runs=by_key, tasks=tasks, workers=workers, now=now, rate_limits=rate_limits)
