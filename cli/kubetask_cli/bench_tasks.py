"""The task `kubetask bench` runs, and the worker that serves it.

`kubetask worker kubetask_cli.bench_tasks:worker_from_environment` builds the worker from
KUBETASK_BENCH_WORKER (its name, shared by every worker process of one benchmark) and
KUBETASK_BENCH_SLOTS; its namespace is POD_NAMESPACE, as for any worker.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from kubetask import Context, KubeTask, Worker

TASK = "noop"

kt = KubeTask()


class NoopInput(BaseModel):
    """No input: the run measures kubetask, not the task."""


class NoopOutput(BaseModel):
    started: float
    """When the function started, in seconds since the epoch (`time.time()`): the benchmark
    subtracts the moment it triggered the run to get trigger → start as the task sees it."""


# The backlog part queues thousands of runs before any worker exists; the default schedule timeout
# (5 minutes) could cancel the last of them before a slow drain reaches them.
@kt.task(name=TASK, schedule_timeout="1h")
async def noop(input: NoopInput, ctx: Context) -> NoopOutput:
    return NoopOutput(started=time.time())


def worker_from_environment() -> Worker:
    return kt.worker(
        os.environ.get("KUBETASK_BENCH_WORKER", "bench-worker"),
        tasks=[noop],
        slots=int(os.environ.get("KUBETASK_BENCH_SLOTS", "50")),
    )
