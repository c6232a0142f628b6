"""The operator's settings, read from the environment: each with its unit and why its default."""

from __future__ import annotations

import dataclasses
import os


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    worker_lost_after_seconds: float = 30.0
    """KUBETASK_WORKER_LOST_AFTER_SECONDS: a worker whose Lease was not renewed for this many
    seconds is lost and its runs go back to the queue. 30 s is Hatchet's limit; workers renew
    every 10 s, so one slow renewal is tolerated."""

    max_requeues: int = 10
    """KUBETASK_MAX_REQUEUES: how many times a run may go back to the queue because its worker was
    lost before it fails with reason WorkerLost. Such re-queues spend no retry; the cap stops a run
    that kills its worker from cycling forever (Hatchet's default is 10)."""

    wait_condition_after_seconds: float = 5.0
    """KUBETASK_WAIT_CONDITION_AFTER_SECONDS: a run that waits this long for want of a live,
    matching worker gets a Waiting condition saying why. Shorter waits are normal (a worker still
    starting) and writing them would cost a status write per run."""

    write_concurrency: int = 16
    """KUBETASK_WRITE_CONCURRENCY: status writes in flight at once. Enough to keep a local API
    server busy; more only queues inside the client."""

    metrics_port: int = 9090
    """KUBETASK_METRICS_PORT: TCP port of the Prometheus /metrics endpoint; 0 turns it off."""

    max_tick_seconds: float = 5.0
    """KUBETASK_MAX_TICK_SECONDS: the longest the scheduler sleeps without an event, in seconds.
    Deadlines and times wake it on their own; this only bounds the damage of a missed wake-up."""

    @classmethod
    def from_environment(cls) -> OperatorSettings:
        return cls(
            worker_lost_after_seconds=_float("KUBETASK_WORKER_LOST_AFTER_SECONDS", 30.0),
            max_requeues=_int("KUBETASK_MAX_REQUEUES", 10),
            wait_condition_after_seconds=_float("KUBETASK_WAIT_CONDITION_AFTER_SECONDS", 5.0),
            write_concurrency=_int("KUBETASK_WRITE_CONCURRENCY", 16),
            metrics_port=_int("KUBETASK_METRICS_PORT", 9090),
            max_tick_seconds=_float("KUBETASK_MAX_TICK_SECONDS", 5.0),
        )
