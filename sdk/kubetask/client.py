"""`KubeTask`: the SDK's entry point — define tasks, trigger and follow runs, build workers."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic
from kubernetes import client as k8s

from kubetask import _kube, api
from kubetask.task import (
    Concurrency,
    DesiredWorkerLabel,
    RateLimit,
    TaskDecorator,
    TaskDefinition,
    is_final,
)

if TYPE_CHECKING:
    from kubetask.worker import Worker

InputT = TypeVar("InputT", bound=pydantic.BaseModel)
OutputT = TypeVar("OutputT")


class KubeTask:
    """Talks to one namespace of one cluster.

    Configuration comes from the pod's service account inside a cluster, else from the kubeconfig
    (`KUBECONFIG` or ~/.kube/config). The namespace is `namespace`, else `POD_NAMESPACE`, else the
    kubeconfig context's, else "default".
    """

    def __init__(
        self,
        *,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        api_client: k8s.ApiClient | None = None,
    ) -> None:
        self._kubeconfig = kubeconfig
        self._api_client = api_client
        self._namespace = namespace
        self._kube: _kube.Kube | None = None
        self.rate_limits = RateLimits(self)

    # Configuration is read on first use, so that a module defining tasks imports anywhere.
    @property
    def api_client(self) -> k8s.ApiClient:
        if self._api_client is None:
            self._api_client = _kube.load_api_client(self._kubeconfig)
        return self._api_client

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            self._namespace = _kube.default_namespace(self._kubeconfig)
        return self._namespace

    @property
    def kube(self) -> _kube.Kube:
        if self._kube is None:
            self._kube = _kube.Kube(self.api_client)
        return self._kube

    def task(
        self,
        *,
        name: str | None = None,
        retries: int = 0,
        backoff_factor: float | None = None,
        backoff_max_seconds: int | None = None,
        execution_timeout: str = "60s",
        schedule_timeout: str = "5m",
        default_priority: int = 1,
        desired_worker_labels: Mapping[str, DesiredWorkerLabel] | None = None,
        concurrency: int | Sequence[Concurrency | Mapping[str, Any]] | None = None,
        rate_limits: Sequence[RateLimit | Mapping[str, Any]] | None = None,
    ) -> TaskDecorator:
        """Declare a task; the decorated function takes (input model, Context).

        Settings are validated when the decorator is applied, so a bad one fails at import
        rather than in the cluster (pydantic.ValidationError names it).
        """
        return TaskDecorator(
            self,
            name,
            {
                "retries": retries,
                "backoff_factor": backoff_factor,
                "backoff_max_seconds": backoff_max_seconds,
                "execution_timeout": execution_timeout,
                "schedule_timeout": schedule_timeout,
                "default_priority": default_priority,
                "desired_worker_labels": dict(desired_worker_labels or {}),
                "concurrency": concurrency,
                "rate_limits": rate_limits,
            },
        )

    def worker(
        self,
        name: str,
        *,
        tasks: Sequence[TaskDefinition[Any, Any]],
        slots: int | None = None,
        labels: Mapping[str, str] | None = None,
        node: str | None = None,
    ) -> Worker:
        from kubetask.worker import Worker

        return Worker(self, name, tasks=tasks, slots=slots, labels=labels, node=node)

    def wait_for_run(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        """The run once it is Completed, Failed or Cancelled; follows it with a watch."""
        deadline = None if timeout is None else time.monotonic() + timeout
        selector = f"metadata.name={name}"
        while True:
            items, version = self.kube.list_runs(self.namespace, field_selector=selector)
            if not items:
                raise LookupError(f"TaskRun {self.namespace}/{name} does not exist.")
            if is_final(items[0]):
                return items[0]
            for kind, run in self.kube.watch_runs(
                self.namespace, field_selector=selector, resource_version=version
            ):
                if kind == "DELETED":
                    raise LookupError(f"TaskRun {self.namespace}/{name} was deleted.")
                if kind != "BOOKMARK" and is_final(run):
                    return run
                if deadline is not None and time.monotonic() > deadline:
                    break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"TaskRun {self.namespace}/{name} did not end in {timeout} s.")


class RateLimits:
    """`kt.rate_limits`: the namespace's static RateLimit objects."""

    def __init__(self, client: KubeTask) -> None:
        self.client = client

    def put(self, name: str, limit: int, duration: str) -> None:
        """Create or update the RateLimit `name`: `limit` units per `duration` (e.g. "minute")."""
        body = api.RateLimit(
            metadata=api.ObjectMeta(name=name, namespace=self.client.namespace),
            spec=api.RateLimitSpec(limit=limit, duration=api.RateLimitDuration(duration)),
        ).to_manifest()
        self.client.kube.apply(
            _kube.RATELIMITS, self.client.namespace, body, field_manager="kubetask-sdk"
        )
