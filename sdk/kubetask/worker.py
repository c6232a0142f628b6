"""The worker runtime: a process bound to one Pod that executes the runs assigned to it.

Inside a cluster the process learns its Pod from POD_NAME/POD_NAMESPACE (Downward API). Outside
one, it creates a Pod for itself bound to a node (KWOK turns it Ready) and deletes it on exit. It
announces the tasks it serves and its heartbeat in a coordination.k8s.io Lease owned by the Pod,
and watches the TaskRuns whose `status.worker` names its Pod. It never chooses runs itself: the
operator assigns them, and every status write the worker makes is guarded so that a stale attempt
cannot land.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pydantic
from kubernetes.client.exceptions import ApiException

from kubetask import _kube
from kubetask.context import Context, WorkerInfo
from kubetask.errors import NonRetryableError
from kubetask.lifecycle import (
    GiveUp,
    Phase,
    Reason,
    after_failure,
    format_time,
    parse_time,
    utc_now,
)

if TYPE_CHECKING:
    from kubetask.client import KubeTask
    from kubetask.task import TaskDefinition

logger = logging.getLogger(__name__)

WORKER_LABEL = "kubetask.io/worker"
SLOTS_ANNOTATION = "kubetask.io/slots"
TASKS_ANNOTATION = "kubetask.io/tasks"
LABELS_ANNOTATION = "kubetask.io/labels"

#: Slots when neither the pod annotation nor the code sets them (Hatchet's default).
DEFAULT_SLOTS = 100
#: Largest output, in bytes of JSON, a run may return. The whole TaskRun must stay far below etcd's
#: 1.5 MiB object limit, and input, logs and status share that space.
MAX_OUTPUT_BYTES = 256 * 1024
#: Seconds between heartbeats (Lease renewals). The operator declares a worker lost after
#: KUBETASK_WORKER_LOST_AFTER_SECONDS (30 by default) without one, so 10 s tolerates two misses.
HEARTBEAT_SECONDS = float(os.environ.get("KUBETASK_HEARTBEAT_SECONDS", "10"))
#: Threads writing results at once.
WRITE_THREADS = 16
#: Seconds a watch stays open before it is renewed; short, so that shutdown is prompt.
WATCH_RENEW_SECONDS = 60
#: Seconds to wait for a Pod this process created to turn Ready.
POD_READY_TIMEOUT_SECONDS = 60.0


@dataclasses.dataclass
class _Identity:
    pod: str
    namespace: str
    uid: str
    node: str
    slots: int
    labels: dict[str, str]
    owns_pod: bool


@dataclasses.dataclass
class _Execution:
    """One attempt of one run on this worker; `started_at` tells attempts apart."""

    name: str
    task_name: str
    started_at: str
    status: dict[str, Any]
    context: Context | None = None
    task: asyncio.Task[None] | None = None
    taken_away: bool = False
    finishing: bool = False
    """The result is being written: the run's own final event must not cancel the write."""


class Worker:
    def __init__(
        self,
        client: KubeTask,
        name: str,
        *,
        tasks: Sequence[TaskDefinition[Any, Any]],
        slots: int | None = None,
        labels: Mapping[str, str] | None = None,
        node: str | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.tasks = {task.config.name: task for task in tasks}
        self.requested_slots = slots
        self.labels = dict(labels or {})
        self.node = node
        self.identity: _Identity | None = None
        self._executions: dict[str, _Execution] = {}
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Result writes get threads of their own, so that many runs ending at once do not queue
        # behind asyncio's small default pool or behind running sync task functions.
        self._writer = concurrent.futures.ThreadPoolExecutor(
            WRITE_THREADS, thread_name_prefix="kubetask-result"
        )
        self._stopped: asyncio.Event | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Serve until SIGTERM or SIGINT, then clean up (the Pod too, if this process made it)."""
        asyncio.run(self.serve(install_signal_handlers=True))

    def stop(self) -> None:
        """Ask a serving worker to stop; safe from any thread."""
        self._stop.set()
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)

    async def serve(self, *, install_signal_handlers: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        if install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(signum, self.stop)
        # From here on this process writes as a worker (its field manager in managedFields).
        self.client.api_client.user_agent = _kube.user_agent("kubetask-worker")
        identity = await asyncio.to_thread(self._claim_pod)
        self.identity = identity
        # Sync task functions run in threads; a cancelled one keeps its thread until it returns,
        # so the pool has room beyond the slots.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=identity.slots + 16, thread_name_prefix=f"kubetask-{identity.pod}"
        )
        try:
            await asyncio.to_thread(self._apply_tasks)
            await asyncio.to_thread(self._write_lease, create=True)
            logger.info(
                "Worker %s/%s serves %s with %d slots on node %s.",
                identity.namespace,
                identity.pod,
                ", ".join(sorted(self.tasks)),
                identity.slots,
                identity.node,
            )
            watcher = threading.Thread(
                target=self._watch_assigned_runs, name="kubetask-watch", daemon=True
            )
            watcher.start()
            heartbeat = asyncio.create_task(self._heartbeat())
            await self._stopped.wait()
            heartbeat.cancel()
        finally:
            self._stop.set()
            for execution in list(self._executions.values()):
                self._take_away(execution)
            await asyncio.to_thread(self._release_identity, identity)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._writer.shutdown(wait=False)
            logger.info("Worker %s/%s stopped.", identity.namespace, identity.pod)

    # --- identity, tasks, heartbeat ---------------------------------------------------------

    def _claim_pod(self) -> _Identity:
        core = self.client.kube.core
        pod_name = os.environ.get("POD_NAME")
        if pod_name:
            namespace = os.environ.get("POD_NAMESPACE", self.client.namespace)
            pod = core.read_namespaced_pod(pod_name, namespace)
            annotations = pod.metadata.annotations or {}
            return _Identity(
                pod=pod_name,
                namespace=namespace,
                uid=pod.metadata.uid,
                node=pod.spec.node_name or "",
                slots=self._slots(annotations.get(SLOTS_ANNOTATION)),
                labels={**(pod.metadata.labels or {}), **self.labels},
                owns_pod=False,
            )

        namespace = self.client.namespace
        node = self.node or os.environ.get("KUBETASK_WORKER_NODE") or self._default_node()
        slots = self._slots(None)
        name = f"{self.name}-{uuid.uuid4().hex[:6]}"
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {**self.labels, WORKER_LABEL: self.name},
                "annotations": {
                    SLOTS_ANNOTATION: str(slots),
                    "kubetask.io/process": f"{socket.gethostname()}:{os.getpid()}",
                },
            },
            "spec": {
                "nodeName": node,
                # No container runs: this Pod stands for the local process that created it.
                "containers": [{"name": "worker", "image": "kubetask.invalid/local-process"}],
                "terminationGracePeriodSeconds": 0,
            },
        }
        created = core.create_namespaced_pod(namespace, body)
        self._wait_ready(namespace, name)
        return _Identity(
            pod=name,
            namespace=namespace,
            uid=created.metadata.uid,
            node=node,
            slots=slots,
            labels=dict(body["metadata"]["labels"]),  # type: ignore[index]
            owns_pod=True,
        )

    def _slots(self, annotation: str | None) -> int:
        if annotation:
            return max(1, int(annotation))
        return self.requested_slots or DEFAULT_SLOTS

    def _default_node(self) -> str:
        nodes = self.client.kube.core.list_node(label_selector="type=kwok").items
        if not nodes:
            nodes = self.client.kube.core.list_node().items
        if not nodes:
            raise RuntimeError("No node to bind the worker's Pod to; pass --node.")
        return str(sorted(node.metadata.name for node in nodes)[0])

    def _wait_ready(self, namespace: str, name: str) -> None:
        deadline = utc_now() + timedelta(seconds=POD_READY_TIMEOUT_SECONDS)
        while utc_now() < deadline:
            pod = self.client.kube.core.read_namespaced_pod(name, namespace)
            conditions = pod.status.conditions or []
            if any(c.type == "Ready" and c.status == "True" for c in conditions):
                return
            self._stop.wait(0.1)
        raise RuntimeError(f"Pod {namespace}/{name} did not become Ready; is KWOK running?")

    def _apply_tasks(self) -> None:
        assert self.identity is not None
        for task in self.tasks.values():
            self.client.kube.apply_task(
                self.identity.namespace,
                task.manifest(self.identity.namespace),
                field_manager="kubetask-worker",
            )

    def _lease_body(self) -> dict[str, Any]:
        assert self.identity is not None
        now = format_time(utc_now())
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.identity.pod,
                "namespace": self.identity.namespace,
                "labels": {WORKER_LABEL: self.name},
                "annotations": {
                    TASKS_ANNOTATION: ",".join(sorted(self.tasks)),
                    LABELS_ANNOTATION: json.dumps(self.labels, sort_keys=True),
                    SLOTS_ANNOTATION: str(self.identity.slots),
                },
                # Deleting the Pod deletes its Lease (garbage collection by owner).
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Pod", "name": self.identity.pod,
                     "uid": self.identity.uid},
                ],
            },
            "spec": {
                "holderIdentity": self.identity.pod,
                "leaseDurationSeconds": 30,
                "acquireTime": now,
                "renewTime": now,
            },
        }  # fmt: skip

    def _write_lease(self, *, create: bool) -> None:
        assert self.identity is not None
        coordination = self.client.kube.coordination
        if not create:
            try:
                coordination.patch_namespaced_lease(
                    self.identity.pod,
                    self.identity.namespace,
                    {"spec": {"renewTime": format_time(utc_now())}},
                )
                return
            except ApiException as exc:
                if exc.status != 404:
                    raise
        body = self._lease_body()
        try:
            coordination.create_namespaced_lease(self.identity.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            coordination.replace_namespaced_lease(self.identity.pod, self.identity.namespace, body)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await asyncio.to_thread(self._write_lease, create=False)
            except Exception:
                logger.exception("The heartbeat of worker %s failed; retrying.", self.name)

    def _release_identity(self, identity: _Identity) -> None:
        core = self.client.kube.core
        with contextlib.suppress(ApiException):
            self.client.kube.coordination.delete_namespaced_lease(identity.pod, identity.namespace)
        if identity.owns_pod:
            with contextlib.suppress(ApiException):
                core.delete_namespaced_pod(identity.pod, identity.namespace, grace_period_seconds=0)

    # --- assignments ------------------------------------------------------------------------

    def _watch_assigned_runs(self) -> None:
        """Feed every change of a run assigned to this Pod into the event loop (own thread)."""
        assert self.identity is not None and self._loop is not None
        selector = f"status.worker={self.identity.pod}"
        kube = self.client.kube
        while not self._stop.is_set():
            try:
                items, version = kube.list_runs(self.identity.namespace, field_selector=selector)
                self._loop.call_soon_threadsafe(self._reconcile_listing, items)
                while not self._stop.is_set():
                    for kind, run in kube.watch_runs(
                        self.identity.namespace,
                        field_selector=selector,
                        resource_version=version,
                        timeout_seconds=WATCH_RENEW_SECONDS,
                    ):
                        if kind == "ERROR":
                            raise ApiException(status=run.get("code", 500), reason="watch error")
                        version = run["metadata"]["resourceVersion"]
                        if kind != "BOOKMARK":
                            self._loop.call_soon_threadsafe(self._on_run_event, kind, run)
                        if self._stop.is_set():
                            return
            except ApiException as exc:
                if exc.status != 410:
                    logger.warning("Watching assigned runs failed (%s); listing again.", exc)
                    self._stop.wait(1.0)
            except Exception:
                if self._stop.is_set():
                    return
                logger.exception("Watching assigned runs failed; listing again.")
                self._stop.wait(1.0)

    def _reconcile_listing(self, items: list[dict[str, Any]]) -> None:
        present = {item["metadata"]["name"] for item in items}
        for name in list(self._executions):
            if name not in present:
                self._take_away(self._executions[name])
        for item in items:
            self._on_run_event("ADDED", item)

    def _on_run_event(self, kind: str, run: dict[str, Any]) -> None:
        assert self.identity is not None
        name = run["metadata"]["name"]
        status = run.get("status") or {}
        current = self._executions.get(name)
        mine = (
            kind != "DELETED"
            and status.get("phase") == Phase.RUNNING
            and status.get("worker") == self.identity.pod
            and not (run.get("spec") or {}).get("cancel", False)
        )
        if not mine:
            if current is not None and not current.finishing:
                self._take_away(current)
            return
        started_at = str(status.get("startedAt"))
        if current is not None and current.started_at == started_at:
            current.status = status
            return
        if current is not None:
            self._take_away(current)
        task_name = str((run.get("spec") or {}).get("task", ""))
        execution = _Execution(name=name, task_name=task_name, started_at=started_at, status=status)
        self._executions[name] = execution
        execution.task = asyncio.get_running_loop().create_task(self._execute(execution, run))

    def _take_away(self, execution: _Execution) -> None:
        """The run is no longer this attempt's: cancel the function and write nothing."""
        if execution.taken_away:
            return
        execution.taken_away = True
        if execution.context is not None:
            execution.context.cancel()
        if execution.task is not None:
            execution.task.cancel()
        if self._executions.get(execution.name) is execution:
            del self._executions[execution.name]
        logger.info("Run %s was taken away from this worker; cancelled it.", execution.name)

    # --- execution --------------------------------------------------------------------------

    async def _execute(self, execution: _Execution, run: dict[str, Any]) -> None:
        assert self.identity is not None and self._pool is not None
        spec = run.get("spec") or {}
        task = self.tasks.get(spec.get("task", ""))
        attempt = int(execution.status.get("attempt") or 1)
        if task is None:
            await self._finish_failed(
                execution, message=f"This worker does not serve task {spec.get('task')!r}.",
                error_type="UnknownTask", retryable=False, context=None,
            )  # fmt: skip
            return
        loop = asyncio.get_running_loop()
        context = Context(
            run_id=execution.name,
            task_name=task.config.name,
            attempt=attempt,
            metadata=spec.get("metadata") or {},
            worker=WorkerInfo(
                pod=self.identity.pod, node=self.identity.node, labels=self.identity.labels
            ),
            control=_Control(self, execution),
            loop=loop,
        )
        execution.context = context
        try:
            payload = task.input_type.model_validate(spec.get("input") or {})
        except pydantic.ValidationError as exc:
            await self._finish_failed(
                execution, message=f"Invalid input: {exc}", error_type="ValidationError",
                retryable=False, context=context, reason=Reason.INVALID_INPUT,
            )  # fmt: skip
            return

        try:
            if task.is_async:
                result = await task.function(payload, context)
            else:
                result = await loop.run_in_executor(self._pool, task.function, payload, context)
        except asyncio.CancelledError:
            if execution.taken_away:
                return
            raise
        except NonRetryableError as exc:
            await self._finish_failed(
                execution, message=str(exc), error_type=type(exc).__name__, retryable=False,
                context=context,
            )  # fmt: skip
            return
        except Exception as exc:
            await self._finish_failed(
                execution, message=str(exc) or repr(exc), error_type=type(exc).__name__,
                retryable=True, context=context,
            )  # fmt: skip
            return
        if execution.taken_away:
            return
        await self._finish_completed(execution, task, result, context)

    async def _finish_completed(
        self,
        execution: _Execution,
        task: TaskDefinition[Any, Any],
        result: Any,
        context: Context,
    ) -> None:
        try:
            output = task.output_adapter.dump_python(
                task.output_adapter.validate_python(result), mode="json"
            )
        except pydantic.ValidationError as exc:
            await self._finish_failed(
                execution, message=f"Invalid output: {exc}", error_type="ValidationError",
                retryable=False, context=context,
            )  # fmt: skip
            return
        size = len(json.dumps(output))
        if size > MAX_OUTPUT_BYTES:
            await self._finish_failed(
                execution,
                message=f"The output is {size} bytes of JSON; the limit is {MAX_OUTPUT_BYTES}.",
                error_type="OutputTooLarge", retryable=False, context=context,
                reason=Reason.OUTPUT_TOO_LARGE,
            )  # fmt: skip
            return
        status = _without(execution.status, "error", "message")
        status.update(
            phase=Phase.COMPLETED.value,
            reason=Reason.SUCCEEDED.value,
            output=output,
            finishedAt=format_time(utc_now()),
        )
        await self._write_result(execution, status, context)

    async def _finish_failed(
        self,
        execution: _Execution,
        *,
        message: str,
        error_type: str,
        retryable: bool,
        context: Context | None,
        reason: Reason | None = None,
    ) -> None:
        task = self.tasks.get(execution.task_name)
        policy = task.config.retry_policy if task is not None else None
        attempt = int(execution.status.get("attempt") or 1)
        now = utc_now()
        error = {"message": message[:4096], "type": error_type, "retryable": retryable}
        outcome = (
            after_failure(policy, attempt=attempt, retryable=retryable, now=now)
            if policy is not None
            else GiveUp(Reason.NON_RETRYABLE)
        )
        if isinstance(outcome, GiveUp):
            status = dict(execution.status)
            status.update(
                phase=Phase.FAILED.value,
                reason=(reason or outcome.reason).value,
                message=f"Attempt {attempt} failed: {message[:512]}",
                error=error,
                finishedAt=format_time(now),
            )
        else:
            status = _without(
                execution.status, "worker", "node", "startedAt", "deadline", "slotReleased"
            )
            status.update(
                phase=Phase.QUEUED.value,
                reason=Reason.RETRYING.value,
                message=f"Attempt {attempt} failed; retry {attempt} not before "
                f"{format_time(outcome.not_before)}.",
                error=error,
                queuedAt=format_time(now),
                notBefore=format_time(outcome.not_before),
            )
        await self._write_result(execution, status, context)

    async def _write_result(
        self, execution: _Execution, status: dict[str, Any], context: Context | None
    ) -> None:
        assert self.identity is not None
        if execution.taken_away:
            return
        execution.finishing = True
        if context is not None and context.logs:
            status["logs"] = context.logs
        identity = self.identity
        try:
            write = functools.partial(
                self.client.kube.replace_run_status,
                identity.namespace,
                execution.name,
                guards=self._guards(execution),
                status=status,
            )
            await asyncio.get_running_loop().run_in_executor(self._writer, write)
            logger.info(
                "Run %s/%s attempt %s: %s.",
                identity.namespace,
                execution.name,
                status.get("attempt"),
                status["phase"],
            )
        except _kube.StaleAttemptError:
            logger.info(
                "Ignored the result of run %s/%s: the attempt was cancelled, timed out or "
                "re-assigned meanwhile.",
                identity.namespace,
                execution.name,
            )
        finally:
            if self._executions.get(execution.name) is execution:
                del self._executions[execution.name]

    def _guards(self, execution: _Execution) -> dict[str, Any]:
        assert self.identity is not None
        return {
            "phase": Phase.RUNNING.value,
            "worker": self.identity.pod,
            "startedAt": execution.started_at,
        }


class _Control:
    """A run's controls for its Context: guarded status writes for this attempt only."""

    def __init__(self, worker: Worker, execution: _Execution) -> None:
        self.worker = worker
        self.execution = execution

    def extend_deadline(self, by: timedelta) -> None:
        assert self.worker.identity is not None
        current = self.execution.status.get("deadline")
        base = parse_time(current) if current else utc_now()
        deadline = format_time(base + by)
        updated = self.worker.client.kube.set_run_status_fields(
            self.worker.identity.namespace,
            self.execution.name,
            guards=self.worker._guards(self.execution),
            fields={"deadline": deadline},
        )
        self.execution.status = updated.get("status") or self.execution.status

    def release_slot(self) -> None:
        assert self.worker.identity is not None
        updated = self.worker.client.kube.set_run_status_fields(
            self.worker.identity.namespace,
            self.execution.name,
            guards=self.worker._guards(self.execution),
            fields={"slotReleased": True},
        )
        self.execution.status = updated.get("status") or self.execution.status


def _without(status: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in status.items() if key not in keys}
