"""The scheduling loop: decide over the view, write the transitions, repeat when woken.

A pass runs whenever a watch event arrives (events that arrive together coalesce into one pass)
or when the next deadline, `runAt`, backoff, window or heartbeat limit falls due; the planner
looks only at the runs that changed or fell due and at the heads of the queue.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any, TypeVar, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetask.lifecycle import Phase, format_time, parse_time, utc_now
from kubetask_operator import metrics
from kubetask_operator.decisions import Decision, Limits, RunRecord, Spend, Transition
from kubetask_operator.planner import Planner
from kubetask_operator.settings import OperatorSettings
from kubetask_operator.view import DYNAMIC_KEY_ANNOTATION, ClusterView, Key

#: Label of the RateLimit objects the operator creates for dynamic keys.
DYNAMIC_LABEL = "kubetask.io/dynamic"
_T = TypeVar("_T")

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
        self._executor = concurrent.futures.ThreadPoolExecutor(
            settings.write_concurrency, thread_name_prefix="kubetask-write"
        )
        # Runs with a write in flight: decided again only once the write has answered.
        self._in_flight: set[Key] = set()
        # Assignments in flight count as running, so a worker's slots are never handed out twice.
        self._pending: dict[Key, RunRecord] = {}
        # Rate limits with a spend in flight: nothing more is taken from them until it answers.
        self._spending: set[str] = set()
        self.planner = Planner(self.limits)
        self._in_flight_tasks: set[Key] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def poke(self) -> None:
        """Something changed: run a pass soon."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            decision = self._decide()
            spends = {
                spend.budget.id: self._spawn(self._write_spend(spend))
                for spend in decision.spends
                if spend.budget.id not in self._spending
            }
            for transition in decision.transitions:
                if all(budget in spends for budget in transition.needs):
                    self._start_write(transition, after=[spends[b] for b in transition.needs])
            for key in decision.task_workers.keys() | decision.task_conditions.keys():
                status: dict[str, Any] = {}
                if key in decision.task_workers:
                    status["workers"] = decision.task_workers[key]
                if key in decision.task_conditions:
                    status["conditions"] = [decision.task_conditions[key]]
                self._start_task_status_write(key, status)
            timeout = self.settings.max_tick_seconds
            if decision.wake_at is not None:
                until = (decision.wake_at - utc_now()).total_seconds()
                timeout = max(0.0, min(timeout, until + 0.001))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    def _decide(self) -> Decision:
        started = time.perf_counter()
        # In-flight assignments read as Running, so their slots are never handed out twice.
        runs = collections.ChainMap(self._pending, self.view.runs)
        changed_runs, changed_tasks = self.view.take_changes()
        self.planner.touch_all(changed_runs)
        if changed_tasks:
            # A Task's settings apply to all of its runs; Tasks change rarely.
            self.planner.touch_all(
                key for key, run in self.view.runs.items() if run.task_key in changed_tasks
            )
        # The view's own dict: a ChainMap would count its length by building a union of keys.
        self.planner.keys.forget_except(self.view.runs)
        decision = self.planner.plan(
            runs=runs,
            tasks=self.view.tasks,
            workers=self.view.workers(),
            now=utc_now(),
            rate_limits=self.view.rate_limits,
        )
        metrics.PASS_SECONDS.observe(time.perf_counter() - started)
        metrics.QUEUED_RUNS.set(decision.queued)
        metrics.LIVE_WORKERS.set(decision.live_workers)
        transitions = [
            t for t in decision.transitions if (t.namespace, t.name) not in self._in_flight
        ]
        return dataclasses.replace(decision, transitions=transitions)

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        """A blocking API call on the writer threads, of which there are as many as writes may
        be in flight (asyncio's default pool has only cores + 4)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _spawn(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_write(
        self, transition: Transition, *, after: Sequence[asyncio.Task[bool]] = ()
    ) -> None:
        key = (transition.namespace, transition.name)
        self._in_flight.add(key)
        if transition.status.get("phase") == Phase.RUNNING.value:
            self._pending[key] = _as_running(self.view.runs[key], transition)
            self.planner.touch(key)
        self._spawn(self._write(transition, after))

    def _start_task_status_write(self, key: Key, status: dict[str, Any]) -> None:
        if key in self._in_flight_tasks:
            return
        self._in_flight_tasks.add(key)
        self._spawn(self._write_task_status(key, status))

    async def _write_task_status(self, key: Key, status: dict[str, Any]) -> None:
        namespace, name = key
        try:
            async with self._writes:
                updated = await self._call(
                    self.custom.patch_namespaced_custom_object_status,
                    GROUP, VERSION, namespace, "tasks", name, {"status": status},
                )  # fmt: skip
            self.view.upsert_task(updated)
            if "workers" in status:
                logger.info(
                    "Task %s/%s is served by %d live workers.", namespace, name, status["workers"]
                )
            for condition in status.get("conditions", []):
                log = logger.warning if condition["status"] == "False" else logger.info
                log("Task %s/%s: %s", namespace, name, condition["message"])
        except ApiException as exc:
            logger.debug("Updating the status of Task %s/%s failed: %s", namespace, name, exc)
        finally:
            self._in_flight_tasks.discard(key)

    async def _write(
        self, transition: Transition, after: Sequence[asyncio.Task[bool]] = ()
    ) -> None:
        key = (transition.namespace, transition.name)
        try:
            # An assignment that takes rate-limit units waits for them to be recorded; if they
            # could not be, the run stays queued and the next pass decides again.
            if after and not all(await asyncio.gather(*after)):
                return
            async with self._writes:
                updated = await self._call(self._patch_status, transition)
            self.view.upsert_run(updated)
            metrics.TRANSITIONS.labels(transition.reason).inc()
            log = logger.warning if transition.warning else logger.info
            log("TaskRun %s/%s: %s", transition.namespace, transition.name, transition.message)
            if transition.warning:
                await self._call(self._post_event, updated, transition)
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
            self.planner.touch(key)
            self.poke()

    async def _write_spend(self, spend: Spend) -> bool:
        """Record units taken from a rate limit's window; False if the window changed meanwhile."""
        budget = spend.budget
        self._spending.add(budget.id)
        try:
            async with self._writes:
                updated = await self._call(self._patch_rate_limit, spend)
            self.view.upsert_rate_limit(updated)
            return True
        except ApiException as exc:
            if exc.status not in (404, 409):
                logger.error("Recording units of RateLimit %s failed: %s", budget.id, exc)
            metrics.WRITE_CONFLICTS.inc()
            return False
        finally:
            self._spending.discard(budget.id)
            self.poke()

    def _patch_rate_limit(self, spend: Spend) -> dict[str, Any]:
        budget = spend.budget
        version = budget.record.resource_version if budget.record else None
        if budget.record is None:
            # A dynamic key seen for the first time gets a RateLimit of its own, so that its
            # window survives restarts and `kubectl get rl` shows it.
            created = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, budget.namespace, "ratelimits",
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "RateLimit",
                    "metadata": {
                        "name": budget.name,
                        "labels": {DYNAMIC_LABEL: "true"},
                        "annotations": {DYNAMIC_KEY_ANNOTATION: budget.dynamic_key or ""},
                    },
                    "spec": {"limit": budget.limit, "duration": budget.duration},
                },
            )  # fmt: skip
            version = created["metadata"]["resourceVersion"]
        body = {
            "metadata": {"resourceVersion": version},
            "status": {
                "windowStart": format_time(budget.window.start),
                "used": spend.used,
                "remaining": max(0, budget.limit - spend.used),
            },
        }
        return cast(
            dict[str, Any],
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, budget.namespace, "ratelimits", budget.name, body
            ),
        )

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
