"""Fixtures for tests against a real local control plane.

One cluster per test session (etcd, kube-apiserver, controller manager, scheduler and KWOK, built by
`make install`), the CRDs from crds/ applied, and a fresh namespace with a random name per test.
Outside CI a missing cluster skips these tests; with CI=true it fails them, so CI never passes by
skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import pytest
from kubernetes import client, config, watch

from kubetask_cli import cluster

REPO = Path(__file__).resolve().parents[2]


def run_command(
    argv: list[str],
    *,
    env: dict[str, str] | None,
    timeout: float,
    cwd: Path | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end and keep its output as text; the caller judges the exit code."""
    return subprocess.run(
        argv, input=input, capture_output=True, text=True, env=env, cwd=cwd, check=False,
        timeout=timeout,
    )  # fmt: skip


class Kubectl(Protocol):
    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="session")
def cluster_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.ClusterState]:
    directory = tmp_path_factory.mktemp("cluster") / "kt"
    try:
        state = cluster.up(directory)
    except cluster.ClusterError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"The local control plane did not start: {exc}")
        pytest.skip(f"No local control plane ({exc}); run `make install` first.")
    try:
        cluster.kubectl(state, "apply", "-f", str(REPO / "crds"))
        cluster.kubectl(
            state, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"
        )
        yield state
    finally:
        cluster.down(directory)


@pytest.fixture(scope="session")
def kube_api(cluster_state: cluster.ClusterState) -> client.ApiClient:
    return config.new_client_from_config(config_file=cluster_state.kubeconfig)


@pytest.fixture(scope="session")
def kubectl_env(cluster_state: cluster.ClusterState) -> dict[str, str]:
    env = dict(os.environ)
    env["KUBECONFIG"] = cluster_state.kubeconfig
    env["PATH"] = f"{cluster_state.bin_dir}:{env['PATH']}"
    return env


@pytest.fixture(scope="session")
def kubectl(kubectl_env: dict[str, str]) -> Kubectl:
    def run(
        *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        completed = run_command(["kubectl", *args], env=kubectl_env, timeout=60, input=input)
        if check and completed.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {completed.returncode}: {completed.stderr}"
            )
        return completed

    return run


@pytest.fixture
def namespace(kube_api: client.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    # The controller manager finalizes the namespace in the background; nobody waits for it.
    core.delete_namespace(name)


def random_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


CustomObject = dict[str, Any]
Waiter = Callable[..., CustomObject]


class Harness:
    """Operator and worker processes for one test namespace, and ways to look at its runs."""

    def __init__(
        self,
        *,
        namespace: str,
        state: cluster.ClusterState,
        api: client.ApiClient,
        workdir: Path,
        env: dict[str, str],
    ) -> None:
        self.namespace = namespace
        self.state = state
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self.core = client.CoreV1Api(api)
        self.workdir = workdir
        self.record_file = workdir / "records.jsonl"
        self.env = {
            **env,
            "POD_NAMESPACE": namespace,
            "KT_RECORD_FILE": str(self.record_file),
            "KUBETASK_METRICS_PORT": "0",
            # Short enough that tests about lost workers take seconds, not minutes.
            "KUBETASK_WORKER_LOST_AFTER_SECONDS": "4",
            "KUBETASK_HEARTBEAT_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "kubetask_cli.main", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.processes.append(process)
        return process

    def start_operator(
        self, name: str = "operator", env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self._spawn(name, ["operator", "-n", self.namespace], {**self.env, **(env or {})})

    def start_worker(
        self,
        *,
        tasks: str,
        slots: int = 4,
        labels: dict[str, str] | None = None,
        node: str | None = None,
        name: str | None = None,
        target: str = "tests.integration.taskbook:worker_from_environment",
        env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start a worker process and return it with its Pod's name once its Lease exists."""
        worker_name = name or random_name("w")
        env = {
            **self.env,
            "KT_WORKER_NAME": worker_name,
            "KT_TASKS": tasks,
            "KT_SLOTS": str(slots),
            "KT_LABELS": json.dumps(labels or {}),
            **(env or {}),
        }
        args = ["worker", target]
        if node:
            args += ["--node", node]
        process = self._spawn(worker_name, args, env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            leases = self.coordination.list_namespaced_lease(
                self.namespace, label_selector=f"kubetask.io/worker={worker_name}"
            ).items
            if leases:
                return process, leases[0].metadata.name
            if process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"worker {worker_name} did not start:\n"
            + (self.workdir / f"{worker_name}.log").read_text()[-3000:]
        )

    def add_node(self, name: str, labels: dict[str, str]) -> str:
        cluster.create_node(self.state, name, labels)
        return name

    def create_run(self, task: str, payload: dict[str, Any] | None = None, **spec: Any) -> str:
        body = {
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "TaskRun",
            "metadata": {"generateName": f"{task}-"},
            "spec": {"task": task, "input": payload or {}, **spec},
        }
        created = self.custom.create_namespaced_custom_object(
            "kubetask.io", "v1alpha1", self.namespace, "taskruns", body
        )
        return str(created["metadata"]["name"])

    def get_run(self, name: str) -> dict[str, Any]:
        return dict(
            self.custom.get_namespaced_custom_object(
                "kubetask.io", "v1alpha1", self.namespace, "taskruns", name
            )
        )

    def wait_for(
        self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get_run(name)
            if predicate(run):
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {name} never got there; last status {run.get('status')}")
            time.sleep(0.1)

    def wait_final(self, name: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_for(
            name,
            lambda r: (r.get("status") or {}).get("phase") in ("Completed", "Failed", "Cancelled"),
            timeout,
        )

    def records(self) -> list[dict[str, Any]]:
        if not self.record_file.exists():
            return []
        return [json.loads(line) for line in self.record_file.read_text().splitlines() if line]

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class RunObserver:
    """A watch of its own over the namespace's TaskRuns: every run's Running interval, in the
    order the API server committed the writes, with the run's concurrency key."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.running: dict[str, tuple[str, str]] = {}  # run -> (key, worker)
        self.max_per_key: dict[str, int] = {}
        self.max_per_worker: dict[str, int] = {}
        self.started: list[tuple[str, datetime]] = []  # (run, status.startedAt)
        self.conditions: dict[str, set[str]] = {}
        self.phases: dict[str, str] = {}
        self._seen_start: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        version = self.custom.list_namespaced_custom_object(
            "kubetask.io", "v1alpha1", self.namespace, "taskruns"
        )["metadata"]["resourceVersion"]
        self._ready.set()
        while not self._stop.is_set():
            stream = watch.Watch().stream(
                self.custom.list_namespaced_custom_object,
                "kubetask.io", "v1alpha1", self.namespace, "taskruns",
                resource_version=version, timeout_seconds=30,
            )  # fmt: skip
            try:
                for event in stream:
                    run = event["object"]
                    version = run["metadata"]["resourceVersion"]
                    self._observe(run)
                    if self._stop.is_set():
                        return
            except Exception:
                # The API server closed the stream (or the session's cluster is going away);
                # a missed event would make a test fail, never pass, so resuming is safe.
                if self._stop.wait(0.2):
                    return

    def _observe(self, run: dict[str, Any]) -> None:
        name = run["metadata"]["name"]
        status = run.get("status") or {}
        key = str((run["spec"].get("input") or {}).get("key"))
        self.phases[name] = status.get("phase", "")
        for condition in status.get("conditions") or []:
            self.conditions.setdefault(name, set()).add(condition.get("reason", ""))
        if status.get("phase") == "Running":
            worker = status["worker"]
            self.running[name] = (key, worker)
            start = (name, status["startedAt"])
            if start not in self._seen_start:
                self._seen_start.add(start)
                self.started.append((name, datetime.fromisoformat(status["startedAt"][:-1])))
        else:
            self.running.pop(name, None)
        for key, worker in set(self.running.values()):
            count = sum(1 for k, _ in self.running.values() if k == key)
            self.max_per_key[key] = max(self.max_per_key.get(key, 0), count)
            count = sum(1 for _, w in self.running.values() if w == worker)
            self.max_per_worker[worker] = max(self.max_per_worker.get(worker, 0), count)

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture
def harness(
    namespace: str,
    cluster_state: cluster.ClusterState,
    kube_api: client.ApiClient,
    kubectl_env: dict[str, str],
    tmp_path: Path,
) -> Iterator[Harness]:
    harness = Harness(
        namespace=namespace, state=cluster_state, api=kube_api, workdir=tmp_path, env=kubectl_env
    )
    try:
        yield harness
    finally:
        harness.stop_all()
