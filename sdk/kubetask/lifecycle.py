"""The rules of a run's life that both workers and the operator apply: retries and backoff.

A run's attempts are numbered from 1. After attempt n fails, retry n follows if n <= retries; it
waits min(backoff max seconds, factor ** n) seconds, or not at all without a backoff factor.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime, timedelta

#: Backoff is capped at one day when a task sets a factor but no maximum (Hatchet's default).
DEFAULT_BACKOFF_MAX_SECONDS = 86_400


class Phase(enum.StrEnum):
    SCHEDULED = "Scheduled"
    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


FINAL_PHASES = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED})


class Reason(enum.StrEnum):
    """Machine-readable why of a run's last transition (`status.reason`)."""

    ASSIGNED = "Assigned"
    SUCCEEDED = "Succeeded"
    RETRYING = "Retrying"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    NON_RETRYABLE = "NonRetryable"
    INVALID_INPUT = "InvalidInput"
    OUTPUT_TOO_LARGE = "OutputTooLarge"
    SCHEDULE_TIMEOUT = "ScheduleTimeout"
    EXECUTION_TIMEOUT = "ExecutionTimeout"
    CANCELLED = "Cancelled"
    WORKER_LOST = "WorkerLost"
    SCHEDULED = "Scheduled"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    retries: int = 0
    backoff_factor: float | None = None
    backoff_max_seconds: int | None = None

    def delay(self, retry_number: int) -> timedelta:
        """How long retry `retry_number` (1 for the first retry) waits before it may start."""
        if self.backoff_factor is None:
            return timedelta(0)
        cap = self.backoff_max_seconds or DEFAULT_BACKOFF_MAX_SECONDS
        # NB: factor ** n overflows a float for large n; the cap is reached long before that.
        try:
            seconds = min(float(cap), self.backoff_factor**retry_number)
        except OverflowError:
            seconds = float(cap)
        return timedelta(seconds=seconds)


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
