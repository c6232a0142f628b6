"""The Helm chart installs, and the roles it grants are all the operator and workers need."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kubetask_cli import cluster

from .conftest import REPO, Harness, Kubectl, random_name, run_command

pytestmark = pytest.mark.integration


def helm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_command(["helm", *args], env=env, timeout=180)


def service_account_kubeconfig(
    state: cluster.ClusterState, kubectl: Kubectl, namespace: str, account: str, path: Path
) -> dict[str, str]:
    """Environment for a process that acts as `account` (a TokenRequest token), not as admin."""
    token = kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    config = json.loads(Path(state.kubeconfig).read_text())
    config["users"][0]["user"] = {"token": token}
    path.write_text(json.dumps(config))
    return {"KUBECONFIG": str(path)}


@pytest.mark.timeout(300)
def test_the_chart_installs_and_its_roles_are_enough_to_run_tasks(
    harness: Harness,
    kubectl: Kubectl,
    kubectl_env: dict[str, str],
    cluster_state: cluster.ClusterState,
    tmp_path: Path,
) -> None:
    namespace = harness.namespace
    release = random_name("kt")
    chart = str(REPO / "charts" / "kubetask")
    linted = helm(kubectl_env, "lint", chart)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    # The session's cluster has the CRDs already (from crds/, which the chart's copy must match).
    installed = helm(
        kubectl_env, "install", release, chart, "-n", namespace, "--skip-crds",
        "--wait", "--timeout", "120s",
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    try:
        # KWOK ran the operator's Pod on the fake node, so the Deployment is available.
        deployment = json.loads(
            kubectl(
                "get", "deployment", f"{release}-operator", "-n", namespace, "-o", "json"
            ).stdout
        )
        assert deployment["status"]["availableReplicas"] == 1

        # A worker as a Deployment of the user's would run it: its own service account bound to
        # the chart's worker role, and a Pod that tells it its name through POD_NAME.
        kubectl("create", "serviceaccount", "worker", "-n", namespace)
        kubectl(
            "create", "rolebinding", "worker", "-n", namespace,
            f"--clusterrole={release}-worker", f"--serviceaccount={namespace}:worker",
        )  # fmt: skip
        worker_name = random_name("w")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": worker_name,
                "namespace": namespace,
                "labels": {"kubetask.io/worker": worker_name},
                "annotations": {"kubetask.io/slots": "4"},
            },
            "spec": {
                "nodeName": cluster.DEFAULT_NODE,
                "serviceAccountName": "worker",
                "containers": [{"name": "worker", "image": "example.invalid/worker"}],
            },
        }
        kubectl("apply", "-f", "-", input=json.dumps(pod))
        kubectl(
            "wait", "-n", namespace, "--for=condition=Ready", "--timeout=30s", f"pod/{worker_name}"
        )

        operator_env = service_account_kubeconfig(
            cluster_state,
            kubectl,
            namespace,
            f"{release}-operator",
            tmp_path / "operator.kubeconfig",
        )
        worker_env = service_account_kubeconfig(
            cluster_state, kubectl, namespace, "worker", tmp_path / "worker.kubeconfig"
        )
        harness.start_operator(env=operator_env)
        harness.start_worker(
            tasks="echo,per-user", name=worker_name, env={**worker_env, "POD_NAME": worker_name}
        )

        # A plain run, and one whose dynamic rate-limit key makes the operator create a RateLimit.
        runs = [
            harness.create_run("echo", {"value": "hi"}),
            harness.create_run("per-user", {"key": "ada"}),
        ]
        for run in runs:
            final = harness.wait_final(run)
            assert final["status"]["phase"] == "Completed", final["status"]
            assert final["status"]["worker"] == worker_name
        limits = harness.custom.list_namespaced_custom_object(
            "kubetask.io", "v1alpha1", namespace, "ratelimits"
        )["items"]
        assert [item["status"]["used"] for item in limits] == [1]
        task = harness.custom.get_namespaced_custom_object(
            "kubetask.io", "v1alpha1", namespace, "tasks", "echo"
        )
        assert task["status"]["workers"] == 1
        logs = (tmp_path / "operator.log").read_text() + (
            tmp_path / f"{worker_name}.log"
        ).read_text()
        assert "Forbidden" not in logs, logs[-3000:]
    finally:
        harness.stop_all()
        helm(kubectl_env, "uninstall", release, "-n", namespace)
