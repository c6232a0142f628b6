"""API I/O shared by the client and the worker: TaskRuns, Tasks, Pods and Leases.

Everything here is a thin, synchronous call on the official Kubernetes client; callers that live in
an event loop run these in threads.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterator
from typing import Any, cast

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

logger = logging.getLogger(__name__)

GROUP = "kubetask.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
TASKRUNS = "taskruns"
TASKS = "tasks"
RATELIMITS = "ratelimits"

#: Seconds a watch request stays open before the server ends it and it is opened again.
WATCH_SECONDS = 240

Obj = dict[str, Any]


class StaleAttemptError(Exception):
    """A guarded status write found that the run is no longer this attempt's."""


#: HTTP connections kept per client. The client's default (5 per core) would make a worker's or
#: the operator's concurrent writes queue for a connection on a small machine.
CONNECTION_POOL_SIZE = 64


def user_agent(component: str) -> str:
    """`component/version`. The API server names a write's field manager after the part before
    the slash, so managedFields and audit logs tell the SDK, the workers and the operator apart."""
    try:
        version = importlib.metadata.version("kubetask")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{component}/{version}"


def load_api_client(
    kubeconfig: str | None = None, *, component: str = "kubetask"
) -> client.ApiClient:
    """The in-cluster service account inside a pod, else the kubeconfig (KUBECONFIG, ~/.kube)."""
    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    api_client = client.ApiClient(configuration)
    api_client.user_agent = user_agent(component)
    return api_client


def default_namespace(kubeconfig: str | None = None) -> str:
    if namespace := os.environ.get("POD_NAMESPACE"):
        return namespace
    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, FileNotFoundError, TypeError):
        return "default"
    return str(active.get("context", {}).get("namespace") or "default")


class Kube:
    """The calls kubetask makes, named for what they do."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)

    # --- TaskRuns -------------------------------------------------------------------------

    def create_run(self, namespace: str, body: Obj) -> Obj:
        return cast(
            Obj,
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, TASKRUNS, body),
        )

    def get_run(self, namespace: str, name: str) -> Obj:
        return cast(
            Obj, self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, TASKRUNS, name)
        )

    def cancel_run(self, namespace: str, name: str) -> Obj:
        return cast(
            Obj,
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, TASKRUNS, name, {"spec": {"cancel": True}}
            ),
        )

    def list_runs(self, namespace: str, *, field_selector: str = "") -> tuple[list[Obj], str]:
        listing = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, TASKRUNS, field_selector=field_selector
        )
        return listing["items"], listing["metadata"]["resourceVersion"]

    def watch_runs(
        self,
        namespace: str,
        *,
        field_selector: str,
        resource_version: str,
        timeout_seconds: int = WATCH_SECONDS,
    ) -> Iterator[tuple[str, Obj]]:
        """Events after `resource_version` until the server closes the watch."""
        stream = watch.Watch().stream(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            TASKRUNS,
            field_selector=field_selector,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_seconds,
        )
        for event in stream:
            yield event["type"], event["object"]

    def replace_run_status(self, namespace: str, name: str, *, guards: Obj, status: Obj) -> Obj:
        """Replace the whole status, only if every `guards` status field still has its value."""
        return self._patch_status_guarded(
            namespace, name, guards, [{"op": "replace", "path": "/status", "value": status}]
        )

    def set_run_status_fields(self, namespace: str, name: str, *, guards: Obj, fields: Obj) -> Obj:
        """Set some status fields, only if every `guards` status field still has its value."""
        ops = [
            {"op": "add", "path": f"/status/{key}", "value": value} for key, value in fields.items()
        ]
        return self._patch_status_guarded(namespace, name, guards, ops)

    def _patch_status_guarded(
        self, namespace: str, name: str, guards: Obj, changes: list[Obj]
    ) -> Obj:
        # A JSON Patch `test` checks the guards on the server in the same write, so a result from
        # an attempt that was cancelled, timed out or re-assigned can never land.
        ops: list[Obj] = [
            {"op": "test", "path": f"/status/{field}", "value": value}
            for field, value in guards.items()
        ]
        try:
            return cast(
                Obj,
                self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    TASKRUNS,
                    name,
                    ops + changes,
                    _content_type="application/json-patch+json",
                ),
            )
        except ApiException as exc:
            # The server answers a failed `test` with 422 and a missing run with 404.
            if exc.status in (404, 409, 422):
                raise StaleAttemptError(f"{namespace}/{name}: {exc.reason}") from exc
            raise

    # --- Tasks ----------------------------------------------------------------------------

    def apply_task(self, namespace: str, body: Obj, *, field_manager: str) -> Obj:
        """Server-side apply, so a worker owns exactly the fields it sets."""
        return self.apply(TASKS, namespace, body, field_manager=field_manager)

    def apply(self, plural: str, namespace: str, body: Obj, *, field_manager: str) -> Obj:
        """Server-side apply of one kubetask object."""
        name = body["metadata"]["name"]
        return cast(
            Obj,
            self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                body,
                field_manager=field_manager,
                force=True,
                _content_type="application/apply-patch+yaml",
            ),
        )
