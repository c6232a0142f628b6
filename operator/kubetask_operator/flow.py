"""Flow control for one scheduling pass: concurrency keys, cancel strategies and rate budgets.

Pure functions over records. Given the runs waiting to be placed and the runs running, they say
which runs fail because an expression cannot give their key, which runs a cancel strategy cancels,
and what each remaining run needs from placement: concurrency counters (`Cap`), rate-limit units
(`Units`) and the round-robin key it takes turns with.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from kubetask_operator.limits import (
    ExpressionError,
    Window,
    dynamic_limit_name,
    render_key,
    window_at,
)
from kubetask_operator.placement import Cap, Units

Key = tuple[str, str]


class Strategy(enum.StrEnum):
    GROUP_ROUND_ROBIN = "GroupRoundRobin"
    CANCEL_IN_PROGRESS = "CancelInProgress"
    CANCEL_NEWEST = "CancelNewest"


@dataclasses.dataclass(frozen=True)
class ConcurrencyRule:
    expression: str
    max_runs: int
    strategy: Strategy = Strategy.GROUP_ROUND_ROBIN


@dataclasses.dataclass(frozen=True)
class RateLimitUse:
    """One entry of a Task's `rateLimits`: a static `key` or a `dynamic_key` expression."""

    units: int = 1
    key: str | None = None
    dynamic_key: str | None = None
    limit: int | None = None
    duration: str | None = None


@dataclasses.dataclass(frozen=True)
class RateLimitRecord:
    """A RateLimit object: its spec and the window state in its status."""

    namespace: str
    name: str
    limit: int
    duration: str
    resource_version: str
    window_start: datetime | None = None
    used: int = 0
    dynamic_key: str | None = None


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a rate limit has left in the window that holds `now`."""

    namespace: str
    name: str
    limit: int
    duration: str
    window: Window
    used: int
    record: RateLimitRecord | None
    """None for a dynamic key seen for the first time: its RateLimit object is created."""
    dynamic_key: str | None = None

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@dataclasses.dataclass(frozen=True)
class FlowRun:
    """What flow control needs of a run."""

    key: Key
    task: str
    input: Mapping[str, Any]
    metadata: Mapping[str, str]
    order: tuple[datetime, int]
    """Arrival order: creation time, then the tie-breaker."""


@dataclasses.dataclass(frozen=True)
class Needs:
    caps: tuple[Cap, ...] = ()
    units: tuple[Units, ...] = ()
    turn_key: str | None = None


@dataclasses.dataclass
class FlowPlan:
    needs: dict[Key, Needs]
    failures: dict[Key, str]
    """Runs whose key expressions fail for their input, with the reason."""
    cancellations: dict[Key, str]
    """Runs (waiting or running) a CancelInProgress or CancelNewest rule cancels."""
    running: dict[str, int]
    """Concurrency counter → runs holding it now."""
    budgets: dict[str, Budget]


class KeyMemo:
    """Rendered keys per run and expression; a run's input and metadata never change."""

    def __init__(self) -> None:
        self._keys: dict[tuple[Key, str], str | ExpressionError] = {}

    def key(self, run: FlowRun, expression: str) -> str:
        memo = (run.key, expression)
        found = self._keys.get(memo)
        if found is None:
            try:
                found = render_key(expression, input=run.input, metadata=run.metadata)
            except ExpressionError as exc:
                found = exc
            self._keys[memo] = found
        if isinstance(found, ExpressionError):
            raise found
        return found

    def forget_except(self, live: set[Key]) -> None:
        """Drop the keys of runs that are gone, once they outnumber the live ones."""
        if len(self._keys) > 2 * len(live) + 1000:
            self._keys = {memo: key for memo, key in self._keys.items() if memo[0] in live}


def plan_flow(
    *,
    waiting: Iterable[FlowRun],
    running: Iterable[FlowRun],
    rules: Mapping[Key, tuple[ConcurrencyRule, ...]],
    rate_limits: Mapping[Key, tuple[RateLimitUse, ...]],
    limit_objects: Mapping[Key, RateLimitRecord],
    keys: KeyMemo,
    now: datetime,
) -> FlowPlan:
    """Flow control for the runs of one pass; `rules` and `rate_limits` are by task."""
    plan = FlowPlan(needs={}, failures={}, cancellations={}, running={}, budgets={})
    holders: dict[str, list[FlowRun]] = {}
    counters: dict[str, tuple[ConcurrencyRule, list[FlowRun]]] = {}

    for run in running:
        try:
            for counter, rule in _counters(run, rules, keys):
                plan.running[counter] = plan.running.get(counter, 0) + 1
                holders.setdefault(counter, []).append(run)
                counters.setdefault(counter, (rule, []))
        except ExpressionError:
            continue  # it runs already; its key could not count before either

    for run in waiting:
        try:
            caps = []
            turn_key = None
            for counter, rule in _counters(run, rules, keys):
                caps.append(Cap(counter=counter, limit=rule.max_runs))
                counters.setdefault(counter, (rule, []))[1].append(run)
                if turn_key is None and rule.strategy is Strategy.GROUP_ROUND_ROBIN:
                    turn_key = counter
            units = tuple(
                Units(budget=budget.id, units=use.units)
                for use, budget in _budgets(
                    run, rate_limits, limit_objects, keys=keys, now=now, plan=plan
                )
            )
        except ExpressionError as exc:
            plan.failures[run.key] = str(exc)
            continue
        plan.needs[run.key] = Needs(caps=tuple(caps), units=units, turn_key=turn_key)

    for counter, (rule, queued) in counters.items():
        _apply_strategy(rule, holders.get(counter, []), queued, plan, counter)
    for key in plan.cancellations:
        plan.needs.pop(key, None)
    return plan


def _counters(
    run: FlowRun, rules: Mapping[Key, tuple[ConcurrencyRule, ...]], keys: KeyMemo
) -> list[tuple[str, ConcurrencyRule]]:
    namespace = run.key[0]
    found = []
    for index, rule in enumerate(rules.get((namespace, run.task), ())):
        value = keys.key(run, rule.expression)
        found.append((f"{namespace}/{run.task}/{index}/{value}", rule))
    return found


def _budgets(
    run: FlowRun,
    rate_limits: Mapping[Key, tuple[RateLimitUse, ...]],
    limit_objects: Mapping[Key, RateLimitRecord],
    *,
    keys: KeyMemo,
    now: datetime,
    plan: FlowPlan,
) -> list[tuple[RateLimitUse, Budget]]:
    namespace = run.key[0]
    found = []
    for use in rate_limits.get((namespace, run.task), ()):
        if use.dynamic_key is not None:
            value = keys.key(run, use.dynamic_key)
            name = dynamic_limit_name(value)
            record = limit_objects.get((namespace, name))
            limit = record.limit if record else use.limit or 0
            duration = record.duration if record else use.duration or "minute"
        else:
            value = None
            name = use.key or ""
            record = limit_objects.get((namespace, name))
            # A static limit that does not exist (yet) has no units: its runs wait for it.
            limit = record.limit if record else 0
            duration = record.duration if record else "minute"
        budget = plan.budgets.get(f"{namespace}/{name}")
        if budget is None:
            window = window_at(duration, now)
            used = record.used if record and record.window_start == window.start else 0
            budget = Budget(namespace, name, limit, duration, window, used, record, value)
            plan.budgets[budget.id] = budget
        found.append((use, budget))
    return found


def _apply_strategy(
    rule: ConcurrencyRule,
    holding: list[FlowRun],
    queued: list[FlowRun],
    plan: FlowPlan,
    counter: str,
) -> None:
    key_text = counter.split("/", 3)[3]
    if rule.strategy is Strategy.CANCEL_IN_PROGRESS:
        # The newest maxRuns runs of the key stay; every older one, running or not, makes room.
        everyone = sorted(holding + queued, key=lambda run: run.order)
        for run in everyone[: max(0, len(everyone) - rule.max_runs)]:
            plan.cancellations.setdefault(
                run.key,
                f"Cancelled by a newer run of concurrency key {key_text!r} "
                f"(CancelInProgress, maxRuns {rule.max_runs}).",
            )
    elif rule.strategy is Strategy.CANCEL_NEWEST:
        room = max(0, rule.max_runs - len(holding))
        for run in sorted(queued, key=lambda run: run.order)[room:]:
            plan.cancellations.setdefault(
                run.key,
                f"Concurrency key {key_text!r} already has {rule.max_runs} runs "
                f"(CancelNewest): this one was cancelled.",
            )
