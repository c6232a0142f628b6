"""The Python SDK and the CLI against a real cluster, operator and worker processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client

from kubetask import KubeTask, RunFailedError, TaskDefinition

from . import taskbook
from .conftest import Harness, run_command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def bound(kt: KubeTask, task: TaskDefinition[Any, Any]) -> TaskDefinition[Any, Any]:
    """The taskbook's task, triggered through a client of the test's namespace."""
    return TaskDefinition(kt, task.function, task.config)


@pytest.fixture
def kt(harness: Harness, kube_api: client.ApiClient) -> KubeTask:
    return KubeTask(api_client=kube_api, namespace=harness.namespace)


def test_run_waits_and_returns_the_typed_output(harness: Harness, kt: KubeTask) -> None:
    harness.start_operator()
    harness.start_worker(tasks="echo")
    echo = bound(kt, taskbook.echo)

    assert echo.run(taskbook.Echo(value="typed")) == taskbook.Echo(value="typed")
    handle = echo.run_no_wait({"value": "later"})
    assert handle.name.startswith("echo-")
    assert handle.result(timeout=30) == taskbook.Echo(value="later")
    assert echo.run_many([{"value": str(i)} for i in range(5)]) == [
        taskbook.Echo(value=str(i)) for i in range(5)
    ]


def test_the_aio_twins_work_from_a_running_event_loop(harness: Harness, kt: KubeTask) -> None:
    harness.start_operator()
    harness.start_worker(tasks="echo")
    echo = bound(kt, taskbook.echo)

    async def main() -> list[taskbook.Echo]:
        one = await echo.aio_run({"value": "a"})
        many = await echo.aio_run_many([{"value": "b"}, {"value": "c"}])
        handle = await echo.aio_run_no_wait({"value": "d"})
        return [one, *many, await handle.aio_result()]

    assert [e.value for e in asyncio.run(main())] == ["a", "b", "c", "d"]


def test_schedule_holds_the_run_until_its_time(harness: Harness, kt: KubeTask) -> None:
    harness.start_operator()
    harness.start_worker(tasks="echo")
    echo = bound(kt, taskbook.echo)
    run_at = datetime.now(UTC) + timedelta(seconds=3)

    handle = echo.schedule(run_at, {"value": "on time"})
    scheduled = harness.wait_for(
        handle.name, lambda r: (r.get("status") or {}).get("phase") == "Scheduled", 10
    )
    assert scheduled["status"]["reason"] == "Scheduled"
    assert handle.result(timeout=30) == taskbook.Echo(value="on time")
    started = [r["t"] for r in harness.records() if r["event"] == "start"]
    assert started[0] >= run_at.timestamp()


def test_a_failed_run_raises_with_the_run_s_error(harness: Harness, kt: KubeTask) -> None:
    harness.start_operator()
    harness.start_worker(tasks="fatal")

    with pytest.raises(RunFailedError) as raised:
        bound(kt, taskbook.fatal).run({"value": "oops"}, timeout=30)

    assert raised.value.reason == "NonRetryable"
    assert "cannot handle 'oops'" in str(raised.value)


def test_an_output_over_the_limit_fails_the_run_clearly(harness: Harness, kt: KubeTask) -> None:
    harness.start_operator()
    harness.start_worker(tasks="blob")

    with pytest.raises(RunFailedError) as raised:
        bound(kt, taskbook.blob).run({"size": 300_000}, timeout=30)

    assert raised.value.reason == "OutputTooLarge"
    assert "limit is 262144" in str(raised.value)


def test_release_slot_lets_the_next_run_start(harness: Harness, kt: KubeTask) -> None:
    harness.start_operator()
    harness.start_worker(tasks="release", slots=1)
    task = bound(kt, taskbook.release)

    first = task.run_no_wait({"seconds": 3})
    time.sleep(0.5)
    second = task.run_no_wait({"seconds": 0.1})
    second.result(timeout=30)
    first.result(timeout=30)

    events = [(r["run"], r["event"]) for r in harness.records()]
    assert events.index((second.name, "end")) < events.index((first.name, "end"))


def test_a_sync_task_sees_cancellation_cooperatively(harness: Harness, kt: KubeTask) -> None:
    harness.start_operator()
    harness.start_worker(tasks="cooperative")
    handle = bound(kt, taskbook.cooperative).run_no_wait({"seconds": 30})
    harness.wait_for(handle.name, lambda r: (r.get("status") or {}).get("phase") == "Running")
    time.sleep(0.3)

    kt.kube.cancel_run(kt.namespace, handle.name)

    run = harness.wait_final(handle.name, timeout=15)
    assert run["status"]["phase"] == "Cancelled"
    deadline = time.monotonic() + 10
    while "cancelled" not in [r["event"] for r in harness.records()]:
        assert time.monotonic() < deadline, "the function never saw the cancellation"
        time.sleep(0.1)


def test_the_task_lists_its_live_workers(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="echo")
    harness.start_worker(tasks="echo")
    deadline = time.monotonic() + 20
    while True:
        task = harness.custom.get_namespaced_custom_object(
            "kubetask.io", "v1alpha1", harness.namespace, "tasks", "echo"
        )
        if (task.get("status") or {}).get("workers") == 2:
            break
        assert time.monotonic() < deadline, task.get("status")
        time.sleep(0.2)


def cli(harness: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    return run_command(
        [sys.executable, "-m", "kubetask_cli.main", *args, "-n", harness.namespace],
        env=harness.env, timeout=60,
    )  # fmt: skip


def test_the_cli_runs_cancels_and_shows_logs(harness: Harness) -> None:
    harness.start_operator()
    harness.start_worker(tasks="echo,sleep")

    done = cli(harness, "run", "echo", "--input", '{"value": "cli"}', "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"value": "cli"}

    name = cli(harness, "run", "sleep", "--input", '{"seconds": 60}').stdout.strip()
    harness.wait_for(name, lambda r: (r.get("status") or {}).get("phase") == "Running")
    assert cli(harness, "cancel", name).returncode == 0
    assert harness.wait_final(name)["status"]["phase"] == "Cancelled"

    echo_run = harness.create_run("echo", {"value": "logged"})
    harness.wait_final(echo_run)
    assert cli(harness, "logs", echo_run).stdout == "echo logged\n"


def test_manifests_prints_the_task_objects(harness: Harness) -> None:
    printed = cli(harness, "manifests", "tests.integration.taskbook:flaky")
    assert printed.returncode == 0, printed.stderr
    assert "kind: Task" in printed.stdout
    assert "retries: 3" in printed.stdout
    assert "factor: 2" in printed.stdout
