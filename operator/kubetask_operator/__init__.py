"""The kubetask operator: pairs queued TaskRuns with live worker pods and enforces their lifecycle.

`run()` is the whole public face; `kubetask operator` calls it.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import kopf

from kubetask_operator.handlers import build_registry
from kubetask_operator.settings import OperatorSettings

__all__ = ["OperatorSettings", "run"]

logger = logging.getLogger(__name__)


def run(
    *,
    settings: OperatorSettings | None = None,
    kubeconfig: str | None = None,
    liveness_endpoint: str | None = None,
    stop_flag: threading.Event | None = None,
    namespaces: list[str] | None = None,
) -> None:
    """Run the operator until SIGTERM/SIGINT (or `stop_flag`), for `namespaces` or all of them.

    kopf's watches log in the way the Kubernetes client does (in-cluster, else KUBECONFIG); the
    operator's own writes use the same configuration.
    """
    from kubetask import _kube

    settings = settings or OperatorSettings.from_environment()
    api_client = _kube.load_api_client(kubeconfig, component="kubetask-operator")
    registry = build_registry(api_client, settings, namespaces=namespaces)

    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces or (),
            standalone=True,
            liveness_endpoint=liveness_endpoint,
            stop_flag=stop_flag,
        )
    )
