"""Flow-control records: concurrency rules, rate-limit uses and budgets, and rendered keys.

A run's concurrency counters and rate-limit budgets are named from keys its task's CEL
expressions render for its input; the planner turns them into what placement checks.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kubetask_operator.limits import ExpressionError, Window, dynamic_limit_name, render_key

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

    def forget_except(self, live: Mapping[Key, object]) -> None:
        """Drop the keys of runs that are gone, once they outnumber the live ones."""
        if len(self._keys) > 2 * len(live) + 1000:
            self._keys = {memo: key for memo, key in self._keys.items() if memo[0] in live}


def counters_of(
    run: FlowRun, rules: Mapping[Key, tuple[ConcurrencyRule, ...]], keys: KeyMemo
) -> list[tuple[str, ConcurrencyRule]]:
    """The concurrency counters a run takes while running: one per rule of its task, named
    `namespace/task/rule index/rendered key`. Raises ExpressionError."""
    namespace = run.key[0]
    found = []
    for index, rule in enumerate(rules.get((namespace, run.task), ())):
        value = keys.key(run, rule.expression)
        found.append((f"{namespace}/{run.task}/{index}/{value}", rule))
    return found


def budget_for(
    run: FlowRun, use: RateLimitUse, keys: KeyMemo
) -> tuple[str, str, int | None, str | None, str | None]:
    """Which RateLimit a use of a run draws from: (namespace, object name, limit, duration,
    dynamic key); limit and duration come from the Task only for a dynamic key."""
    namespace = run.key[0]
    if use.dynamic_key is not None:
        value = keys.key(run, use.dynamic_key)
        return (namespace, dynamic_limit_name(value), use.limit, use.duration, value)
    return (namespace, use.key or "", None, None, None)
