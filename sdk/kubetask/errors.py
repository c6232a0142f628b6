"""Exceptions users raise inside tasks and catch around triggers."""

from __future__ import annotations

from typing import Any


class NonRetryableError(Exception):
    """Raise inside a task to fail the run at once, whatever retries are left."""


class RunError(Exception):
    """A run ended without an output; `run` is the TaskRun's name, `status` its last status."""

    def __init__(self, message: str, *, run: str, status: dict[str, Any]) -> None:
        super().__init__(message)
        self.run = run
        self.status = status

    @property
    def reason(self) -> str | None:
        reason = self.status.get("reason")
        return str(reason) if reason is not None else None


class RunFailedError(RunError):
    """The run ended Failed; the message is the error its last attempt reported."""


class RunCancelledError(RunError):
    """The run ended Cancelled (explicitly, by a timeout or by a concurrency strategy)."""
