"""The rules of a run's life that both workers and the operator apply: retries and backoff.

A run's attempts are numbered from 1. After attempt n fails, retry n follows if n <= retries; it
waits min(backoff max seconds, factor ** n) seconds, or not at all without a backoff factor.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from kubetask.api import Backoff, TaskRunPhase, TaskRunReason

Phase = TaskRunPhase
Reason = TaskRunReason
FINAL_PHASES = frozenset(phase for phase in TaskRunPhase if phase.finished)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """A task's `retries` and `backoff`, as both the worker and the operator apply them."""

    retries: int = 0
    backoff: Backoff | None = None

    def delay(self, retry_number: int) -> timedelta:
        """How long retry `retry_number` (1 for the first retry) waits before it may start."""
        return self.backoff.delay(retry_number) if self.backoff else timedelta(0)


@dataclasses.dataclass(frozen=True)
class Retry:
    """The attempt failed and the run goes back to the queue, assignable from `not_before`."""

    not_before: datetime


@dataclasses.dataclass(frozen=True)
class GiveUp:
    """The attempt failed and the run ends Failed for `reason`."""

    reason: Reason


def after_failure(
    policy: RetryPolicy, *, attempt: int, retryable: bool, now: datetime
) -> Retry | GiveUp:
    """What follows a failed attempt: another try after the backoff, or the end of the run."""
    if not retryable:
        return GiveUp(Reason.NON_RETRYABLE)
    if attempt > policy.retries:
        return GiveUp(Reason.RETRIES_EXHAUSTED)
    return Retry(not_before=now + policy.delay(attempt))


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, so that two assignments never share a start time."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
