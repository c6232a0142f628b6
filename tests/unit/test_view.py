"""The operator's view keeps the newest version of each object and reports what changed."""

from __future__ import annotations

from typing import Any

from kubetask_operator.view import ClusterView


def taskrun(name: str, version: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": version,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"task": "t", "input": {"user": "ada"}},
        "status": status,
    }  # fmt: skip


def test_an_older_event_never_rolls_back_a_newer_record() -> None:
    view = ClusterView()
    view.upsert_run(taskrun("r", "10", phase="Running", worker="w"))
    view.upsert_run(taskrun("r", "9", phase="Queued"))
    assert view.runs[("ns", "r")].worker == "w"
    assert view.take_changes() == ({("ns", "r")}, set())
    assert view.take_changes() == (set(), set())


def test_final_runs_leave_the_view_and_count_as_changed() -> None:
    view = ClusterView()
    view.upsert_run(taskrun("r", "1"))
    view.take_changes()
    view.upsert_run(taskrun("r", "2", phase="Completed"))
    assert ("ns", "r") not in view.runs
    assert view.take_changes()[0] == {("ns", "r")}


def test_a_never_written_run_orders_by_its_creation_version() -> None:
    view = ClusterView()
    view.upsert_run(taskrun("b", "7"))
    view.upsert_run(taskrun("a", "8"))
    assert view.runs[("ns", "b")].seq < view.runs[("ns", "a")].seq
    assert view.runs[("ns", "a")].input == {"user": "ada"}
