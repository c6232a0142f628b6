"""Runs end to end: a real API server, the operator and worker processes, no mocks."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import time
import urllib.request
from typing import Any

import pytest
from kubernetes import client

from .conftest import REPO, Harness, Kubectl, RunObserver, random_name

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def phase(run: dict[str, Any]) -> str | None:
    return (run.get("status") or {}).get("phase")


def test_a_run_completes_with_its_output_and_logs(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="echo")
    name = harness.create_run("echo", {"value": "hi"})

    run = harness.wait_final(name)

    status = run["status"]
    assert status["phase"] == "Completed"
    assert status["output"] == {"value": "hi"}
    assert status["attempt"] == 1
    assert status["logs"] == ["echo hi"]
    assert status["worker"].startswith("w-")
    assert status["node"] == "kwok-node-0"
    # The worker's result write names it in managedFields (it took over the whole status).
    assert {(f["manager"], f.get("subresource")) for f in run["metadata"]["managedFields"]} >= {
        ("kubetask-worker", "status")
    }


def test_a_worker_never_runs_more_than_its_slots(
    harness: Harness, kube_api: client.ApiClient
) -> None:
    observer = RunObserver(kube_api, harness.namespace)
    harness.start_operator()
    _, pod = harness.start_worker(tasks="sleep", slots=3)
    names = [harness.create_run("sleep", {"seconds": 0.5}) for _ in range(9)]

    for name in names:
        assert phase(harness.wait_final(name)) == "Completed"
    observer.stop()

    assert observer.max_per_worker == {pod: 3}


def test_a_required_node_label_is_honoured_and_preferred_weights_pick(harness: Harness) -> None:
    harness.start_operator()
    name = harness.create_run("gpu", {"value": "x"})
    harness.start_worker(tasks="gpu,model")  # on the plain node: must not get the GPU run
    time.sleep(2)
    assert phase(harness.get_run(name)) in (None, "Queued")

    gpu_node = harness.add_node(random_name("gpu-node"), {"nvidia.com/gpu.present": "true"})
    _, gpu_pod = harness.start_worker(tasks="gpu", node=gpu_node)
    run = harness.wait_final(name)
    assert run["status"]["output"] == {"node": gpu_node, "worker": gpu_pod}

    model_node = harness.add_node(random_name("model-node"), {"kubetask.io/model": "llama-3-8b"})
    _, model_pod = harness.start_worker(tasks="model", node=model_node)
    for _ in range(3):
        run = harness.wait_final(harness.create_run("model"))
        assert run["status"]["output"]["worker"] == model_pod


def test_a_queued_run_without_a_worker_says_why(harness: Harness) -> None:
    env_delay = {"KUBETASK_WAIT_CONDITION_AFTER_SECONDS": "0.5"}
    harness.env.update(env_delay)
    harness.start_operator()
    name = harness.create_run("echo")
    run = harness.wait_for(name, lambda r: bool((r.get("status") or {}).get("conditions")), 20)
    condition = run["status"]["conditions"][0]
    assert (condition["type"], condition["reason"]) == ("Waiting", "NoWorker")


def test_priority_3_goes_before_priority_1(harness: Harness) -> None:
    harness.start_operator()
    low = [harness.create_run("echo", {"value": f"low{i}"}, priority=1) for i in range(3)]
    high = [harness.create_run("echo", {"value": f"high{i}"}, priority=3) for i in range(3)]
    time.sleep(1)  # all six are queued before the only slot appears
    harness.start_worker(tasks="echo", slots=1)
    for name in low + high:
        harness.wait_final(name)

    order = [r["run"] for r in harness.records() if r["event"] == "start"]
    assert set(order[:3]) == set(high)
    assert order[3:] == low


def test_retries_wait_for_their_backoff(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="flaky")
    name = harness.create_run("flaky", {"succeed_on": 3})

    run = harness.wait_final(name, timeout=60)

    assert run["status"]["phase"] == "Completed"
    assert run["status"]["attempt"] == 3
    starts = [r["t"] for r in harness.records() if r["event"] == "start"]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # backoff factor 2: retry 1 waits 2 s, retry 2 waits 4 s capped by maxSeconds 3.
    assert 2.0 <= gaps[0] < 3.5, gaps
    assert 3.0 <= gaps[1] < 4.5, gaps


def test_retries_exhausted_and_non_retryable_errors_fail_the_run(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="fatal,flaky")
    fatal = harness.create_run("fatal", {"value": "boom"})

    run = harness.wait_final(fatal)

    assert run["status"]["phase"] == "Failed"
    assert run["status"]["reason"] == "NonRetryable"
    assert run["status"]["error"]["message"] == "cannot handle 'boom'"
    assert run["status"]["error"]["retryable"] is False
    assert run["status"]["attempt"] == 1


def test_bad_input_fails_the_run_with_the_validation_message(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="sleep")
    name = harness.create_run("sleep", {"seconds": "not a number"})

    run = harness.wait_final(name)

    assert run["status"]["phase"] == "Failed"
    assert run["status"]["reason"] == "InvalidInput"
    assert "seconds" in run["status"]["error"]["message"]


def test_schedule_timeout_cancels_a_run_nobody_takes(harness: Harness) -> None:
    harness.start_operator()
    # A worker registers the task (2 s schedule timeout) but is full with a long run.
    harness.start_worker(tasks="short-wait,sleep", slots=1)
    harness.create_run("sleep", {"seconds": 30})
    time.sleep(0.5)
    name = harness.create_run("short-wait")

    run = harness.wait_final(name, timeout=20)

    assert (run["status"]["phase"], run["status"]["reason"]) == ("Cancelled", "ScheduleTimeout")
    managers = {(f["manager"], f.get("subresource")) for f in run["metadata"]["managedFields"]}
    assert ("kubetask-operator", "status") in managers


def test_execution_timeout_cancels_the_attempt_and_spends_a_retry(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="hang")
    name = harness.create_run("hang", {"seconds": 30})

    run = harness.wait_final(name, timeout=30)

    assert (run["status"]["phase"], run["status"]["reason"]) == ("Failed", "ExecutionTimeout")
    assert run["status"]["attempt"] == 2  # retries=1: both attempts timed out
    events = [(r["attempt"], r["event"]) for r in harness.records()]
    assert events.count((1, "cancelled")) == 1


def test_refresh_timeout_keeps_a_long_run_alive(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="refresh")
    name = harness.create_run("refresh", {"seconds": 5})  # timeout 2 s, refreshed every 1 s

    run = harness.wait_final(name, timeout=30)

    assert run["status"]["phase"] == "Completed"
    assert run["status"]["attempt"] == 1


def test_kubectl_patch_cancel_stops_a_running_async_function(
    harness: Harness, kubectl: Kubectl
) -> None:
    harness.start_operator()
    harness.start_worker(tasks="sleep")
    name = harness.create_run("sleep", {"seconds": 60})
    harness.wait_for(name, lambda r: phase(r) == "Running")
    time.sleep(0.5)

    kubectl(
        "patch", "taskrun", name, "-n", harness.namespace, "--type=merge",
        "-p", json.dumps({"spec": {"cancel": True}}),
    )  # fmt: skip
    run = harness.wait_final(name, timeout=15)

    assert (run["status"]["phase"], run["status"]["reason"]) == ("Cancelled", "Cancelled")
    deadline = time.monotonic() + 10
    while ("cancelled" not in [r["event"] for r in harness.records()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert [r["event"] for r in harness.records()] == ["start", "cancelled"]


def test_a_killed_worker_s_run_completes_elsewhere_on_the_same_attempt(harness: Harness) -> None:
    harness.start_operator()
    doomed, doomed_pod = harness.start_worker(tasks="sleep", slots=1)
    name = harness.create_run("sleep", {"seconds": 2})
    harness.wait_for(name, lambda r: phase(r) == "Running")
    os.kill(doomed.pid, signal.SIGKILL)
    _, survivor_pod = harness.start_worker(tasks="sleep", slots=1)

    run = harness.wait_final(name, timeout=60)

    assert run["status"]["phase"] == "Completed"
    assert run["status"]["worker"] == survivor_pod
    assert run["status"]["attempt"] == 1
    assert run["status"]["requeues"] == 1
    starts = [(r["worker"], r["attempt"]) for r in harness.records() if r["event"] == "start"]
    assert starts == [(doomed_pod, 1), (survivor_pod, 1)]


@pytest.mark.timeout(400)
def test_the_operator_killed_mid_load_loses_no_run_and_runs_none_twice(harness: Harness) -> None:
    operator = harness.start_operator("operator-1")
    harness.start_worker(tasks="sleep", slots=20)
    harness.start_worker(tasks="sleep", slots=20)
    names = [harness.create_run("sleep", {"seconds": 0.2}) for _ in range(200)]
    deadline = time.monotonic() + 60
    while len(harness.records()) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(operator.pid, signal.SIGKILL)
    operator.wait()
    time.sleep(1)
    harness.start_operator("operator-2")

    finals = [harness.wait_final(name, timeout=120) for name in names]

    assert {phase(run) for run in finals} == {"Completed"}
    starts = [(r["run"], r["attempt"]) for r in harness.records() if r["event"] == "start"]
    assert len(starts) == len(set(starts)) == 200


def test_writes_per_successful_run_are_at_most_three(harness: Harness, kubectl: Kubectl) -> None:
    harness.start_operator()
    harness.start_worker(tasks="echo", slots=10)
    warmup = harness.create_run("echo")
    harness.wait_final(warmup)

    before = taskrun_writes(kubectl)
    names = [harness.create_run("echo", {"value": str(i)}) for i in range(30)]
    for name in names:
        assert phase(harness.wait_final(name)) == "Completed"
    time.sleep(1)
    after = taskrun_writes(kubectl)

    writes = after - before
    assert writes / len(names) <= 3.0, f"{writes} writes for {len(names)} runs"


def taskrun_writes(kubectl: Kubectl) -> float:
    """Mutating requests on taskruns (and their status) the API server counted so far."""
    total = 0.0
    for line in kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = line[line.index("{") + 1 : line.index("}")]
        fields = dict(part.split("=", 1) for part in labels.split(","))
        if fields.get("resource") == '"taskruns"' and fields.get("verb").strip('"') in (
            "POST", "PUT", "PATCH", "DELETE", "APPLY",
        ):  # fmt: skip
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_kubectl_apply_of_the_hello_example_completes(harness: Harness, kubectl: Kubectl) -> None:
    harness.start_operator()
    harness.start_worker(
        tasks="", name="hello-worker", target="examples.python.hello_worker:worker"
    )

    kubectl("apply", "-n", harness.namespace, "-f", str(REPO / "examples" / "hello.yaml"))
    run = harness.wait_final("hello-world")

    assert run["status"]["phase"] == "Completed"
    assert run["status"]["output"] == {"greeting": "Hello, world!"}


def test_the_operator_serves_prometheus_metrics(harness: Harness) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    harness.start_operator(env={"KUBETASK_METRICS_PORT": str(port)})
    harness.start_worker(tasks="echo")
    assert phase(harness.wait_final(harness.create_run("echo", {"value": "m"}))) == "Completed"

    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline, "the operator never served /metrics"
            time.sleep(0.2)
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kubetask_")
    }
    assert samples['kubetask_run_transitions_total{reason="Assigned"}'] >= 1
    assert samples["kubetask_live_workers"] == 1
    assert samples["kubetask_queued_runs"] == 0
    assert samples["kubetask_scheduling_pass_seconds_count"] >= 1
