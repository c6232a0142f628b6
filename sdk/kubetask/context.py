"""What a task function sees of its run: identity, cancellation, deadline, slot and log."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from collections.abc import Mapping
from datetime import timedelta
from typing import Protocol

from kubetask.api import parse_duration

#: Log lines kept per run (Hatchet keeps 1000); older lines are dropped first.
MAX_LOG_LINES = 1000
#: Characters kept of one log line; the rest is cut so that one line cannot fill the object.
MAX_LOG_LINE_CHARS = 2000


class RunControl(Protocol):
    """The worker's side of a run's controls: each call is one guarded status write."""

    def extend_deadline(self, by: timedelta) -> None: ...

    def release_slot(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    pod: str
    node: str
    labels: Mapping[str, str]


class Context:
    """Passed to every task function next to its input.

    Cancellation is cooperative for sync functions, which run in threads: they should check
    `cancelled` between steps. Async functions are also cancelled outright (CancelledError is
    raised at their next await).
    """

    def __init__(
        self,
        *,
        run_id: str,
        task_name: str,
        attempt: int,
        metadata: Mapping[str, str],
        worker: WorkerInfo,
        control: RunControl,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.run_id = run_id
        self.task_name = task_name
        self.attempt = attempt
        self.metadata = dict(metadata)
        self.worker = worker
        self._control = control
        self._loop = loop
        self._cancelled = threading.Event()
        self._cancelled_async = asyncio.Event()
        self._logs: collections.deque[str] = collections.deque(maxlen=MAX_LOG_LINES)
        self._released = False

    @property
    def retry_count(self) -> int:
        """How many retries came before this attempt (0 on the first attempt)."""
        return self.attempt - 1

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def wait_for_cancellation(self) -> None:
        """Returns once the run is cancelled (explicitly, by a timeout or by losing it)."""
        await self._cancelled_async.wait()

    def refresh_timeout(self, duration: str | timedelta) -> None:
        """Push the running deadline back by `duration` (e.g. "30s"); can be called repeatedly."""
        by = parse_duration(duration) if isinstance(duration, str) else duration
        self._control.extend_deadline(by)

    def release_slot(self) -> None:
        """Free this run's slot for other runs; the run goes on but is no longer re-assigned if
        this worker dies."""
        if not self._released:
            self._released = True
            self._control.release_slot()

    def log(self, line: str) -> None:
        """Keep a log line with the run (`kubetask logs RUN`); written with the run's result."""
        self._logs.append(str(line)[:MAX_LOG_LINE_CHARS])

    @property
    def logs(self) -> list[str]:
        return list(self._logs)

    def cancel(self) -> None:
        """Called by the worker when the run is taken away; safe from any thread."""
        self._cancelled.set()
        self._loop.call_soon_threadsafe(self._cancelled_async.set)
