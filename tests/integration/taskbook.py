"""Tasks and a configurable worker for the integration tests.

`kubetask worker tests.integration.taskbook:worker_from_environment` builds a worker from:
KT_WORKER_NAME, KT_TASKS (comma-separated task names), KT_SLOTS, KT_LABELS (JSON). Every task
appends what it did to KT_RECORD_FILE, one JSON line per event, so tests can check from outside
what ran where and when.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from pydantic import BaseModel

from kubetask import (
    Concurrency,
    Context,
    DesiredWorkerLabel,
    KubeTask,
    NonRetryableError,
    RateLimit,
    Worker,
)

kt = KubeTask()


def record(ctx: Context, event: str, **extra: Any) -> None:
    path = os.environ.get("KT_RECORD_FILE")
    if not path:
        return
    line = {
        "run": ctx.run_id, "attempt": ctx.attempt, "event": event, "t": time.time(),
        "worker": ctx.worker.pod, "node": ctx.worker.node, **extra,
    }  # fmt: skip
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(line) + "\n")


class Echo(BaseModel):
    value: str = ""


class Sleep(BaseModel):
    seconds: float = 1.0


class Flaky(BaseModel):
    succeed_on: int = 99


class Where(BaseModel):
    node: str
    worker: str


@kt.task(name="echo")
def echo(input: Echo, ctx: Context) -> Echo:
    record(ctx, "start")
    ctx.log(f"echo {input.value}")
    return input


@kt.task(name="sleep", execution_timeout="60s")
async def sleep(input: Sleep, ctx: Context) -> Sleep:
    record(ctx, "start")
    try:
        await asyncio.sleep(input.seconds)
    except asyncio.CancelledError:
        record(ctx, "cancelled")
        raise
    record(ctx, "end")
    return input


@kt.task(name="flaky", retries=3, backoff_factor=2, backoff_max_seconds=3)
def flaky(input: Flaky, ctx: Context) -> Flaky:
    record(ctx, "start")
    if ctx.attempt < input.succeed_on:
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    return input


@kt.task(name="fatal", retries=3)
def fatal(input: Echo, ctx: Context) -> Echo:
    record(ctx, "start")
    raise NonRetryableError(f"cannot handle {input.value!r}")


@kt.task(name="hang", execution_timeout="2s", retries=1)
async def hang(input: Sleep, ctx: Context) -> Sleep:
    record(ctx, "start")
    try:
        await asyncio.sleep(input.seconds)
    except asyncio.CancelledError:
        record(ctx, "cancelled")
        raise
    return input


@kt.task(name="refresh", execution_timeout="2s")
async def refresh(input: Sleep, ctx: Context) -> Sleep:
    record(ctx, "start")
    waited = 0.0
    while waited < input.seconds:
        await asyncio.to_thread(ctx.refresh_timeout, "2s")
        await asyncio.sleep(1.0)
        waited += 1.0
    record(ctx, "end")
    return input


@kt.task(name="short-wait", schedule_timeout="2s")
def short_wait(input: Echo, ctx: Context) -> Echo:
    record(ctx, "start")
    return input


@kt.task(
    name="gpu",
    desired_worker_labels={
        "nvidia.com/gpu.present": DesiredWorkerLabel(value="true", required=True)
    },
)
def gpu(input: Echo, ctx: Context) -> Where:
    record(ctx, "start")
    return Where(node=ctx.worker.node, worker=ctx.worker.pod)


@kt.task(
    name="model",
    desired_worker_labels={"kubetask.io/model": DesiredWorkerLabel(value="llama-3-8b", weight=50)},
)
def model(input: Echo, ctx: Context) -> Where:
    record(ctx, "start")
    return Where(node=ctx.worker.node, worker=ctx.worker.pod)


TASKS = {
    task.config.name: task
    for task in (echo, sleep, flaky, fatal, hang, refresh, short_wait, gpu, model)
}


def worker_from_environment() -> Worker:
    names = os.environ.get("KT_TASKS", ",".join(TASKS)).split(",")
    return kt.worker(
        os.environ.get("KT_WORKER_NAME", "test-worker"),
        tasks=[TASKS[name] for name in names],
        slots=int(os.environ.get("KT_SLOTS", "4")),
        labels=json.loads(os.environ.get("KT_LABELS", "{}")),
    )


class Blob(BaseModel):
    size: int


@kt.task(name="blob")
def blob(input: Blob, ctx: Context) -> dict[str, str]:
    return {"data": "x" * input.size}


@kt.task(name="release")
async def release(input: Sleep, ctx: Context) -> Sleep:
    record(ctx, "start")
    await asyncio.to_thread(ctx.release_slot)
    await asyncio.sleep(input.seconds)
    record(ctx, "end")
    return input


@kt.task(name="cooperative")
def cooperative(input: Sleep, ctx: Context) -> Sleep:
    """A sync task: it cannot be interrupted, so it checks `ctx.cancelled` between steps."""
    record(ctx, "start")
    deadline = time.monotonic() + input.seconds
    while time.monotonic() < deadline:
        if ctx.cancelled:
            record(ctx, "cancelled")
            raise RuntimeError("stopped because the run was cancelled")
        time.sleep(0.05)
    return input


TASKS.update({task.config.name: task for task in (blob, release, cooperative)})


class Keyed(BaseModel):
    key: str
    seconds: float = 0.05


async def keyed_sleep(input: Keyed, ctx: Context) -> Keyed:
    record(ctx, "start", key=input.key)
    try:
        await asyncio.sleep(input.seconds)
    except asyncio.CancelledError:
        record(ctx, "cancelled", key=input.key)
        raise
    record(ctx, "end", key=input.key)
    return input


per_key = kt.task(name="per-key", concurrency=[Concurrency(expression="input.key", max_runs=2)])(
    keyed_sleep
)
cancel_in_progress = kt.task(
    name="cancel-in-progress",
    concurrency=[{"expression": "input.key", "max_runs": 1, "strategy": "CancelInProgress"}],
)(keyed_sleep)
cancel_newest = kt.task(
    name="cancel-newest",
    concurrency=[Concurrency(expression="input.key", max_runs=1, strategy="CancelNewest")],
)(keyed_sleep)
limited_a = kt.task(name="limited-a", rate_limits=[RateLimit(key="shared", units=1)])(keyed_sleep)
limited_b = kt.task(name="limited-b", rate_limits=[{"key": "shared"}])(keyed_sleep)
per_user = kt.task(
    name="per-user",
    rate_limits=[RateLimit(dynamic_key="input.key", units=1, limit=2, duration="hour")],
)(keyed_sleep)

TASKS.update(
    {
        task.config.name: task
        for task in (per_key, cancel_in_progress, cancel_newest, limited_a, limited_b, per_user)
    }
)
