"""The scheduling loop: decide over the view, write the transitions, repeat when woken.

One pass looks at every open run; it runs whenever a watch event arrives (many events coalesce
into one pass) or when the next deadline, `runAt`, backoff or heartbeat limit falls due.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from datetime import timedelta
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetask.lifecycle import Phase, format_time, parse_time, utc_now
from kubetask_operator import metrics
from kubetask_operator.decisions import Decision, Limits, RunRecord, Transition, decide
from kubetask_operator.settings import OperatorSettings
from kubetask_operator.view import ClusterView, Key

logger = logging.getLogger(__name__)

GROUP = "kubetask.io"
VERSION = "v1alpha1"


class Scheduler:
    def __init__(
        self, api_client: client.ApiClient, view: ClusterView, settings: OperatorSettings
    ) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.view = view
        self.settings = settings
        self.limits = Limits(
            worker_lost_after=timedelta(seconds=settings.worker_lost_after_seconds),
            max_requeues=settings.max_requeues,
            wait_condition_after=timedelta(seconds=settings.wait_condition_after_seconds),
        )
        self._wake = asyncio.Event()
        self._writes = asyncio.Semaphore(settings.write_concurrency)
        # Runs with a write in flight: decided again only once the write has answered.
        self._in_flight: set[Key] = set()
        # Assignments in flight count as running, so a worker's slots are never handed out twice.
        self._pending: dict[Key, RunRecord] = {}
        self._in_flight_tasks: set[tuple[str, str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def poke(self) -> None:
        """Something changed: run a pass soon."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            decision = self._decide()
            for transition in decision.transitions:
                self._start_write(transition)
            for key, count in decision.task_workers.items():
                self._start_task_status_write(key, count)
            timeout = self.settings.max_tick_seconds
            if decision.wake_at is not None:
                until = (decision.wake_at - utc_now()).total_seconds()
                timeout = max(0.0, min(timeout, until + 0.001))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    def _decide(self) -> Decision:
        started = time.perf_counter()
        runs = {**self.view.runs, **self._pending}
        decision = decide(
            runs=runs.values(),
            tasks=self.view.tasks,
            workers=self.view.workers(),
            now=utc_now(),
            limits=self.limits,
        )
        metrics.PASS_SECONDS.observe(time.perf_counter() - started)
        metrics.QUEUED_RUNS.set(decision.queued)
        transitions = [
            t for t in decision.transitions if (t.namespace, t.name) not in self._in_flight
        ]
        return dataclasses.replace(decision, transitions=transitions)

    def _start_write(self, transition: Transition) -> None:
        key = (transition.namespace, transition.name)
        self._in_flight.add(key)
        if transition.status.get("phase") == Phase.RUNNING.value:
            self._pending[key] = _as_running(self.view.runs[key], transition)
        task = asyncio.create_task(self._write(transition))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_task_status_write(self, key: Key, workers: int) -> None:
        if ("task", *key) in self._in_flight_tasks:
            return
        self._in_flight_tasks.add(("task", *key))
        task = asyncio.create_task(self._write_task_status(key, workers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_task_status(self, key: Key, workers: int) -> None:
        namespace, name = key
        try:
            async with self._writes:
                updated = await asyncio.to_thread(
                    self.custom.patch_namespaced_custom_object_status,
                    GROUP, VERSION, namespace, "tasks", name, {"status": {"workers": workers}},
                )  # fmt: skip
            self.view.upsert_task(updated)
            logger.info("Task %s/%s is served by %d live workers.", namespace, name, workers)
        except ApiException as exc:
            logger.debug("Updating the workers of Task %s/%s failed: %s", namespace, name, exc)
        finally:
            self._in_flight_tasks.discard(("task", *key))

    async def _write(self, transition: Transition) -> None:
        key = (transition.namespace, transition.name)
        try:
            async with self._writes:
                updated = await asyncio.to_thread(self._patch_status, transition)
            self.view.upsert_run(updated)
            metrics.TRANSITIONS.labels(transition.reason).inc()
            log = logger.warning if transition.warning else logger.info
            log("TaskRun %s/%s: %s", transition.namespace, transition.name, transition.message)
            if transition.warning:
                await asyncio.to_thread(self._post_event, updated, transition)
        except ApiException as exc:
            if exc.status in (404, 409):
                metrics.WRITE_CONFLICTS.inc()
                logger.debug(
                    "TaskRun %s/%s changed before %s could be written; deciding again.",
                    transition.namespace, transition.name, transition.reason,
                )  # fmt: skip
            else:
                logger.error(
                    "Writing %s to TaskRun %s/%s failed: %s",
                    transition.reason, transition.namespace, transition.name, exc,
                )  # fmt: skip
        except Exception:
            logger.exception(
                "Writing %s to TaskRun %s/%s failed.",
                transition.reason, transition.namespace, transition.name,
            )  # fmt: skip
        finally:
            self._in_flight.discard(key)
            self._pending.pop(key, None)
            self.poke()

    def _patch_status(self, transition: Transition) -> dict[str, Any]:
        # The resourceVersion makes the write conditional: if anything changed the run since the
        # decision (a cancel, another operator, a worker's result), the server refuses with 409.
        body = {
            "metadata": {"resourceVersion": transition.resource_version},
            "status": transition.status,
        }
        return cast(
            dict[str, Any],
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, transition.namespace, "taskruns", transition.name, body
            ),
        )

    def _post_event(self, run: dict[str, Any], transition: Transition) -> None:
        meta = run["metadata"]
        now = format_time(utc_now())
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "TaskRun",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": transition.reason,
            "message": transition.message,
            "type": "Warning",
            "source": {"component": "kubetask-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException as exc:
            logger.debug("Posting an event for %s failed: %s", meta["name"], exc)


def _as_running(record: RunRecord, transition: Transition) -> RunRecord:
    status = transition.status
    return dataclasses.replace(
        record,
        phase=Phase.RUNNING,
        worker=status["worker"],
        attempt=status["attempt"],
        deadline=parse_time(status["deadline"]),
        slot_released=False,
    )
