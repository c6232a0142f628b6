"""The local control plane behaves like a real cluster, and `kubetask cluster` handles faults."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetask_cli import cluster

from .conftest import Kubectl, random_name, run_command

pytestmark = pytest.mark.integration


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_command([sys.executable, "-m", "kubetask_cli.main", *args], env=env, timeout=180)


def test_readyz_answers_ok(kubectl: Kubectl) -> None:
    assert kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_the_default_node_is_ready(kubectl: Kubectl) -> None:
    deadline = time.monotonic() + 30
    while True:
        nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
        ready = {
            node["metadata"]["name"]
            for node in nodes
            for condition in node.get("status", {}).get("conditions", [])
            if condition["type"] == "Ready" and condition["status"] == "True"
        }
        if cluster.DEFAULT_NODE in ready or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert cluster.DEFAULT_NODE in ready


def test_a_pod_bound_to_a_fake_node_becomes_ready(kubectl: Kubectl, namespace: str) -> None:
    name = random_name("pod")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeName": cluster.DEFAULT_NODE,
            "containers": [{"name": "main", "image": "example.invalid/none"}],
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(pod))
    completed = kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", "--timeout=30s", f"pod/{name}"
    )
    assert "condition met" in completed.stdout


def test_a_deployment_gets_scheduled_pods(kubectl: Kubectl, namespace: str) -> None:
    # Proves the controller manager (ReplicaSets) and the scheduler (binding) are running.
    name = random_name("deploy")
    kubectl(
        "create", "deployment", name, "-n", namespace, "--image=example.invalid/none",
        "--replicas=2",
    )  # fmt: skip
    completed = kubectl("rollout", "status", "-n", namespace, f"deployment/{name}", "--timeout=60s")
    assert "successfully rolled out" in completed.stdout


def test_a_service_account_token_cannot_list_secrets(kubectl: Kubectl, namespace: str) -> None:
    account = random_name("sa")
    kubectl("create", "serviceaccount", account, "-n", namespace)
    token = kubectl("create", "token", account, "-n", namespace).stdout.strip()
    assert token.count(".") == 2  # a JWT from the TokenRequest API

    refused = kubectl("get", "secrets", "-n", namespace, f"--token={token}", check=False)
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr
    assert f"system:serviceaccount:{namespace}:{account}" in refused.stderr


def test_up_refuses_a_directory_where_a_cluster_runs(
    cluster_state: cluster.ClusterState,
) -> None:
    before = sorted(p.name for p in Path(cluster_state.directory).iterdir())
    completed = run_cli("cluster", "up", "--dir", cluster_state.directory)
    assert completed.returncode == 1
    assert "already running" in completed.stderr
    assert sorted(p.name for p in Path(cluster_state.directory).iterdir()) == before
    assert all(cluster.pid_alive(pid) for pid in cluster_state.pids.values())


def test_down_with_nothing_running_says_so(tmp_path: Path) -> None:
    completed = run_cli("cluster", "down", "--dir", str(tmp_path / "none"))
    assert completed.returncode == 0
    assert "nothing to stop" in completed.stdout


def test_env_prints_kubeconfig_and_path(cluster_state: cluster.ClusterState) -> None:
    completed = run_cli("cluster", "env", "--dir", cluster_state.directory)
    assert completed.returncode == 0
    assert f"export KUBECONFIG={cluster_state.kubeconfig}" in completed.stdout
    assert cluster_state.bin_dir in completed.stdout


@pytest.mark.timeout(300)
def test_a_component_that_fails_to_start_leaves_no_process(tmp_path: Path) -> None:
    env = dict(os.environ, KUBETASK_KUBE_APISERVER_EXTRA_ARGS="--no-such-flag")
    directory = tmp_path / "broken"
    completed = run_cli("cluster", "up", "--dir", str(directory), env=env)

    assert completed.returncode == 1
    assert "kube-apiserver exited" in completed.stderr
    assert "no-such-flag" in completed.stderr  # the tail of its log is printed
    leftovers = subprocess.run(
        ["pgrep", "-f", str(directory)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert leftovers == []


@pytest.mark.timeout(300)
def test_two_clusters_run_side_by_side_and_down_stops_everything(tmp_path: Path) -> None:
    directory = tmp_path / "second"
    started = time.monotonic()
    completed = run_cli("cluster", "up", "--dir", str(directory))
    assert completed.returncode == 0, completed.stderr
    elapsed = time.monotonic() - started
    state = cluster.ClusterState.load(directory)
    assert state is not None
    assert len(state.live_pids()) == len(cluster.COMPONENT_ORDER)
    # Readiness time is reported, not asserted: timing targets belong to benchmarks.
    print(f"second cluster ready in {elapsed:.1f} s")

    completed = run_cli("cluster", "down", "--dir", str(directory))
    assert completed.returncode == 0
    assert not any(cluster.pid_alive(pid) for pid in state.pids.values())
    assert not directory.exists()


@pytest.mark.timeout(300)
def test_a_port_taken_before_binding_is_replaced_by_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone grabs the port `up` chose for etcd between the choice and etcd's bind.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    choices = iter([taken])
    real_free_port = cluster._free_port
    monkeypatch.setattr(cluster, "_free_port", lambda: next(choices, None) or real_free_port())
    directory = tmp_path / "retry"
    try:
        state = cluster.up(directory)
        assert state.ports["etcd"] != taken
        assert len(state.live_pids()) == len(cluster.COMPONENT_ORDER)
    finally:
        cluster.down(directory)
        squatter.close()
