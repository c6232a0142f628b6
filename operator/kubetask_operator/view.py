"""The operator's in-memory picture of the cluster, rebuilt from the API on every start.

Every watch event replaces the record of its object, unless the record is newer: after a write the
operator stores the object the server returned, and a watch event that is still in flight for an
older version must not roll that back.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import pydantic

from kubetask.api import TaskSpec, parse_duration
from kubetask.lifecycle import Phase, RetryPolicy, parse_time
from kubetask_operator.decisions import (
    EXPRESSIONS_CONDITION,
    WAITING_CONDITION,
    RunRecord,
    TaskRecord,
    WorkerRecord,
)
from kubetask_operator.flow import ConcurrencyRule, RateLimitRecord, RateLimitUse, Strategy
from kubetask_operator.placement import AffinityTerm

logger = logging.getLogger(__name__)

WORKER_LABEL = "kubetask.io/worker"
SLOTS_ANNOTATION = "kubetask.io/slots"
TASKS_ANNOTATION = "kubetask.io/tasks"
LABELS_ANNOTATION = "kubetask.io/labels"
#: On a RateLimit the operator made for a dynamic key: the key, as the expression rendered it.
DYNAMIC_KEY_ANNOTATION = "kubetask.io/dynamic-key"
#: Slots of a worker whose Pod and Lease do not say (the SDK's default, Hatchet's too).
DEFAULT_SLOTS = 100

Obj = dict[str, Any]
Key = tuple[str, str]


def _key(obj: Obj) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


def _version(obj: Obj) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion", "0"))
    except ValueError:
        return 0


def _time(text: str | None) -> datetime | None:
    return parse_time(text) if text else None


class ClusterView:
    def __init__(self) -> None:
        self.runs: dict[Key, RunRecord] = {}
        self.tasks: dict[Key, TaskRecord] = {}
        self.pods: dict[Key, Obj] = {}
        self.leases: dict[Key, Obj] = {}
        self.node_labels: dict[str, dict[str, str]] = {}
        self.rate_limits: dict[Key, RateLimitRecord] = {}
        # What changed since the scheduler last asked: it looks at those runs again.
        self._changed_runs: set[Key] = set()
        self._changed_tasks: set[Key] = set()
        self._versions: dict[tuple[str, Key], int] = {}

    def take_changes(self) -> tuple[set[Key], set[Key]]:
        """The runs and the tasks that changed since the last call."""
        runs, self._changed_runs = self._changed_runs, set()
        tasks, self._changed_tasks = self._changed_tasks, set()
        return runs, tasks

    def _newer(self, kind: str, obj: Obj) -> bool:
        key = (kind, _key(obj))
        version = _version(obj)
        if version < self._versions.get(key, -1):
            return False
        self._versions[key] = version
        return True

    def _forget(self, kind: str, obj: Obj) -> None:
        self._versions.pop((kind, _key(obj)), None)

    # --- TaskRuns ---------------------------------------------------------------------------

    def upsert_run(self, obj: Obj) -> None:
        if not self._newer("run", obj):
            return
        key = _key(obj)
        self._changed_runs.add(key)
        previous = self.runs.get(key)
        # A run that was never written since its creation still has the resourceVersion of its
        # creation, and etcd hands those out in creation order: an exact FIFO tie-breaker within
        # one second of creationTimestamp, even for runs first seen in a restart's listing.
        seq = previous.seq if previous is not None else _version(obj)
        record = run_record(obj, seq)
        if record.final:
            # Final runs never change again; keeping them would only grow memory.
            self.runs.pop(key, None)
            return
        self.runs[key] = record

    def delete_run(self, obj: Obj) -> None:
        self.runs.pop(_key(obj), None)
        self._changed_runs.add(_key(obj))
        self._forget("run", obj)

    # --- Tasks ------------------------------------------------------------------------------

    def upsert_task(self, obj: Obj) -> None:
        if self._newer("task", obj):
            record = task_record(obj)
            if self.tasks.get(_key(obj)) != record:
                self._changed_tasks.add(_key(obj))
            self.tasks[_key(obj)] = record

    def delete_task(self, obj: Obj) -> None:
        self.tasks.pop(_key(obj), None)
        self._changed_tasks.add(_key(obj))
        self._forget("task", obj)

    # --- RateLimits -------------------------------------------------------------------------

    def upsert_rate_limit(self, obj: Obj) -> None:
        if self._newer("ratelimit", obj):
            self.rate_limits[_key(obj)] = rate_limit_record(obj)

    def delete_rate_limit(self, obj: Obj) -> None:
        self.rate_limits.pop(_key(obj), None)
        self._forget("ratelimit", obj)

    # --- workers: Pods, Leases, Nodes -------------------------------------------------------

    def upsert_pod(self, obj: Obj) -> None:
        if self._newer("pod", obj):
            self.pods[_key(obj)] = obj

    def delete_pod(self, obj: Obj) -> None:
        self.pods.pop(_key(obj), None)
        self._forget("pod", obj)

    def upsert_lease(self, obj: Obj) -> None:
        if self._newer("lease", obj):
            self.leases[_key(obj)] = obj

    def delete_lease(self, obj: Obj) -> None:
        self.leases.pop(_key(obj), None)
        self._forget("lease", obj)

    def upsert_node(self, obj: Obj) -> None:
        self.node_labels[obj["metadata"]["name"]] = dict(obj["metadata"].get("labels") or {})

    def delete_node(self, obj: Obj) -> None:
        self.node_labels.pop(obj["metadata"]["name"], None)

    def workers(self) -> list[WorkerRecord]:
        """A record per worker Pod that has a Lease; the rest cannot receive runs."""
        records = []
        for key, pod in self.pods.items():
            lease = self.leases.get(key)
            if lease is None:
                continue
            records.append(worker_record(pod, lease, self.node_labels))
        return records


def run_record(obj: Obj, seq: int) -> RunRecord:
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    phase = status.get("phase")
    waiting = next(
        (
            c.get("reason")
            for c in status.get("conditions") or []
            if c.get("type") == WAITING_CONDITION
        ),
        None,
    )
    return RunRecord(
        namespace=meta["namespace"],
        name=meta["name"],
        resource_version=meta["resourceVersion"],
        task=spec.get("task", ""),
        created=_time(meta.get("creationTimestamp")) or datetime.now(UTC),
        seq=seq,
        priority=spec.get("priority"),
        run_at=_time(spec.get("runAt")),
        cancel=bool(spec.get("cancel", False)),
        phase=Phase(phase) if phase else None,
        attempt=int(status.get("attempt") or 0),
        requeues=int(status.get("requeues") or 0),
        worker=status.get("worker"),
        queued_at=_time(status.get("queuedAt")),
        not_before=_time(status.get("notBefore")),
        deadline=_time(status.get("deadline")),
        slot_released=bool(status.get("slotReleased", False)),
        reason=status.get("reason"),
        input=spec.get("input") or {},
        metadata=spec.get("metadata") or {},
        waiting_reason=waiting,
    )


def task_record(obj: Obj) -> TaskRecord:
    namespace, name = _key(obj)
    try:
        spec = TaskSpec.model_validate(obj.get("spec") or {})
    except pydantic.ValidationError as exc:
        # The API server validated it; a mismatch means the models and the CRD disagree.
        logger.warning("Task %s/%s has a spec this operator cannot read: %s", namespace, name, exc)
        return TaskRecord(namespace, name)
    return TaskRecord(
        namespace=namespace,
        name=name,
        policy=RetryPolicy(retries=spec.retries, backoff=spec.backoff),
        schedule_timeout=parse_duration(spec.schedule_timeout),
        execution_timeout=parse_duration(spec.execution_timeout),
        default_priority=spec.default_priority,
        affinity=tuple(
            AffinityTerm(
                key=label.key,
                value=label.value,
                comparator=label.comparator,
                required=label.required,
                weight=label.weight,
            )
            for label in spec.worker_affinity
        ),
        workers=(obj.get("status") or {}).get("workers"),
        expressions_condition=_condition(obj, EXPRESSIONS_CONDITION),
        concurrency=tuple(
            ConcurrencyRule(
                expression=rule.expression,
                max_runs=rule.max_runs,
                strategy=Strategy(rule.strategy.value),
            )
            for rule in spec.concurrency
        ),
        rate_limits=tuple(
            RateLimitUse(
                units=use.units,
                key=use.key,
                dynamic_key=use.dynamic_key,
                limit=use.limit,
                duration=use.duration.value if use.duration else None,
            )
            for use in spec.rate_limits
        ),
    )


def _condition(obj: Obj, kind: str) -> tuple[str, str] | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return (str(condition.get("status")), str(condition.get("message", "")))
    return None


def rate_limit_record(obj: Obj) -> RateLimitRecord:
    namespace, name = _key(obj)
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    return RateLimitRecord(
        namespace=namespace,
        name=name,
        limit=int(spec.get("limit", 0)),
        duration=str(spec.get("duration", "minute")),
        resource_version=obj["metadata"]["resourceVersion"],
        window_start=_time(status.get("windowStart")),
        used=int(status.get("used") or 0),
        dynamic_key=(obj["metadata"].get("annotations") or {}).get(DYNAMIC_KEY_ANNOTATION),
    )


def worker_record(pod: Obj, lease: Obj, node_labels: dict[str, dict[str, str]]) -> WorkerRecord:
    namespace, name = _key(pod)
    pod_meta = pod["metadata"]
    annotations = {**(lease["metadata"].get("annotations") or {}),
                   **(pod_meta.get("annotations") or {})}  # fmt: skip
    node = (pod.get("spec") or {}).get("nodeName") or ""
    conditions = (pod.get("status") or {}).get("conditions") or []
    ready = pod_meta.get("deletionTimestamp") is None and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )
    try:
        declared = json.loads(lease["metadata"].get("annotations", {}).get(LABELS_ANNOTATION, "{}"))
    except json.JSONDecodeError:
        declared = {}
    # Affinity sees the node's labels, then the pod's, then what the SDK declared, later winning.
    labels = {**node_labels.get(node, {}), **(pod_meta.get("labels") or {}), **declared}
    tasks = (lease["metadata"].get("annotations") or {}).get(TASKS_ANNOTATION, "")
    renew = (lease.get("spec") or {}).get("renewTime")
    try:
        slots = max(1, int(annotations.get(SLOTS_ANNOTATION, DEFAULT_SLOTS)))
    except ValueError:
        slots = DEFAULT_SLOTS
    return WorkerRecord(
        namespace=namespace,
        pod=name,
        node=node,
        tasks=frozenset(t for t in tasks.split(",") if t),
        slots=slots,
        labels=labels,
        ready=ready,
        renewed=_time(renew),
    )
