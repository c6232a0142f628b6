"""Concurrency limits, cancel strategies and rate limits under load, checked from outside."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import time
from datetime import datetime
from typing import Any

import pytest
from kubernetes import client

from .conftest import Harness, RunObserver

pytestmark = [pytest.mark.integration]


def create_many(harness: Harness, task: str, payloads: list[dict[str, Any]]) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: harness.create_run(task, p), payloads))


def wait_all(harness: Harness, names: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    phases: dict[str, str] = {}
    pending = list(names)
    while pending:
        listing = harness.custom.list_namespaced_custom_object(
            "kubetask.io", "v1alpha1", harness.namespace, "taskruns"
        )["items"]
        current = {r["metadata"]["name"]: (r.get("status") or {}).get("phase") for r in listing}
        pending = [n for n in pending if current.get(n) not in ("Completed", "Failed", "Cancelled")]
        phases = {n: current.get(n) or "" for n in names}
        assert time.monotonic() < deadline, f"{len(pending)} runs never ended"
        time.sleep(0.5)
    return phases


@pytest.mark.timeout(300)
def test_a_thousand_runs_never_exceed_two_running_per_key(
    harness: Harness, kube_api: client.ApiClient
) -> None:
    observer = RunObserver(kube_api, harness.namespace)
    harness.start_operator()
    harness.start_worker(tasks="per-key", slots=25)
    harness.start_worker(tasks="per-key", slots=25)
    rng = random.Random(5)
    payloads = [{"key": f"k{rng.randrange(40)}", "seconds": 0.05} for _ in range(1000)]

    names = create_many(harness, "per-key", payloads)
    phases = wait_all(harness, names, timeout=240)
    observer.stop()

    assert set(phases.values()) == {"Completed"}
    assert max(observer.max_per_key.values()) == 2
    assert len(observer.started) == 1000


@pytest.mark.timeout(300)
def test_the_limit_holds_while_the_operator_is_killed_twice(
    harness: Harness, kube_api: client.ApiClient
) -> None:
    observer = RunObserver(kube_api, harness.namespace)
    operator = harness.start_operator("operator-1")
    harness.start_worker(tasks="per-key", slots=25)
    harness.start_worker(tasks="per-key", slots=25)
    rng = random.Random(7)
    payloads = [{"key": f"k{rng.randrange(30)}", "seconds": 0.1} for _ in range(600)]

    names = create_many(harness, "per-key", payloads)
    for attempt in (2, 3):
        time.sleep(3)
        os.kill(operator.pid, signal.SIGKILL)
        operator.wait()
        operator = harness.start_operator(f"operator-{attempt}")
    phases = wait_all(harness, names, timeout=240)
    observer.stop()

    assert set(phases.values()) == {"Completed"}
    assert max(observer.max_per_key.values()) <= 2
    starts = [(r["run"], r["attempt"]) for r in harness.records() if r["event"] == "start"]
    assert len(starts) == len(set(starts)) == 600


@pytest.mark.timeout(300)
def test_a_static_rate_limit_is_shared_by_two_tasks(
    harness: Harness, kube_api: client.ApiClient
) -> None:
    observer = RunObserver(kube_api, harness.namespace)
    harness.custom.create_namespaced_custom_object(
        "kubetask.io", "v1alpha1", harness.namespace, "ratelimits",
        {"apiVersion": "kubetask.io/v1alpha1", "kind": "RateLimit",
         "metadata": {"name": "shared"}, "spec": {"limit": 20, "duration": "minute"}},
    )  # fmt: skip
    harness.env["KUBETASK_WAIT_CONDITION_AFTER_SECONDS"] = "1"
    harness.start_operator()
    harness.start_worker(tasks="limited-a,limited-b", slots=50)

    names = create_many(harness, "limited-a", [{"key": "a"}] * 15)
    names += create_many(harness, "limited-b", [{"key": "b"}] * 15)
    phases = wait_all(harness, names, timeout=200)
    observer.stop()

    assert set(phases.values()) == {"Completed"}
    per_window: dict[datetime, int] = {}
    for _, started in observer.started:
        minute = started.replace(second=0, microsecond=0)
        per_window[minute] = per_window.get(minute, 0) + 1
    assert sum(per_window.values()) == 30
    assert max(per_window.values()) <= 20
    assert len(per_window) >= 2  # the last ten waited for the next window
    assert any("RateLimited" in reasons for reasons in observer.conditions.values())
    limit = harness.custom.get_namespaced_custom_object(
        "kubetask.io", "v1alpha1", harness.namespace, "ratelimits", "shared"
    )
    assert 0 < limit["status"]["used"] <= 20
    assert limit["status"]["remaining"] == 20 - limit["status"]["used"]


@pytest.mark.timeout(120)
def test_a_dynamic_rate_limit_counts_per_rendered_key(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="per-user", slots=10)
    ada = create_many(harness, "per-user", [{"key": "ada"}] * 3)
    bob = create_many(harness, "per-user", [{"key": "bob"}] * 2)

    # Two units an hour per key: four of five runs complete, ada's third waits.
    deadline = time.monotonic() + 60
    while True:
        phases = {n: (harness.get_run(n).get("status") or {}).get("phase") for n in ada + bob}
        if list(phases.values()).count("Completed") == 4:
            break
        assert time.monotonic() < deadline, phases
        time.sleep(0.3)
    assert all(phases[n] == "Completed" for n in bob)
    limits = harness.custom.list_namespaced_custom_object(
        "kubetask.io", "v1alpha1", harness.namespace, "ratelimits"
    )["items"]
    keys = {
        item["metadata"]["annotations"]["kubetask.io/dynamic-key"]: item["status"]["used"]
        for item in limits
    }
    assert keys == {"ada": 2, "bob": 2}


@pytest.mark.timeout(120)
def test_cancel_in_progress_cancels_the_older_run_and_its_function_sees_it(
    harness: Harness,
) -> None:
    harness.start_operator()
    harness.start_worker(tasks="cancel-in-progress", slots=5)
    older = harness.create_run("cancel-in-progress", {"key": "k", "seconds": 60})
    other = harness.create_run("cancel-in-progress", {"key": "other", "seconds": 1})
    harness.wait_for(older, lambda r: (r.get("status") or {}).get("phase") == "Running")
    newer = harness.create_run("cancel-in-progress", {"key": "k", "seconds": 0.5})

    cancelled = harness.wait_final(older, timeout=30)
    assert (cancelled["status"]["phase"], cancelled["status"]["reason"]) == (
        "Cancelled", "ConcurrencyCancelled",
    )  # fmt: skip
    assert harness.wait_final(newer, timeout=30)["status"]["phase"] == "Completed"
    assert harness.wait_final(other, timeout=30)["status"]["phase"] == "Completed"
    deadline = time.monotonic() + 10
    while (older, "cancelled") not in [(r["run"], r["event"]) for r in harness.records()]:
        assert time.monotonic() < deadline, "the older run's function never saw the cancel"
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_cancel_newest_cancels_the_newcomer_at_once(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="cancel-newest", slots=5)
    first = harness.create_run("cancel-newest", {"key": "k", "seconds": 3})
    harness.wait_for(first, lambda r: (r.get("status") or {}).get("phase") == "Running")
    second = harness.create_run("cancel-newest", {"key": "k", "seconds": 0.1})

    refused = harness.wait_final(second, timeout=15)
    assert (refused["status"]["phase"], refused["status"]["reason"]) == (
        "Cancelled", "ConcurrencyCancelled",
    )  # fmt: skip
    assert refused["status"].get("attempt", 0) == 0  # it never started
    assert harness.wait_final(first, timeout=30)["status"]["phase"] == "Completed"
    assert [r["run"] for r in harness.records() if r["event"] == "start"] == [first]


@pytest.mark.timeout(120)
def test_an_invalid_expression_is_reported_on_the_task_and_fails_its_runs(
    harness: Harness,
) -> None:
    harness.custom.create_namespaced_custom_object(
        "kubetask.io", "v1alpha1", harness.namespace, "tasks",
        {"apiVersion": "kubetask.io/v1alpha1", "kind": "Task", "metadata": {"name": "broken"},
         "spec": {"concurrency": [{"expression": "input.(", "maxRuns": 1}]}},
    )  # fmt: skip
    harness.start_operator()
    run = harness.create_run("broken", {"key": "x"})

    failed = harness.wait_final(run, timeout=30)
    assert (failed["status"]["phase"], failed["status"]["reason"]) == ("Failed", "InvalidInput")
    assert "not a valid CEL expression" in failed["status"]["error"]["message"]
    deadline = time.monotonic() + 20
    while True:
        task = harness.custom.get_namespaced_custom_object(
            "kubetask.io", "v1alpha1", harness.namespace, "tasks", "broken"
        )
        conditions = {c["type"]: c for c in (task.get("status") or {}).get("conditions", [])}
        if "ExpressionsValid" in conditions:
            break
        assert time.monotonic() < deadline, task.get("status")
        time.sleep(0.2)
    condition = conditions["ExpressionsValid"]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidExpression")
    assert "input.(" in condition["message"]
