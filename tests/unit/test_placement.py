"""Which queued run goes to which worker."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from kubetask_operator.placement import (
    AffinityTerm,
    Cap,
    Comparator,
    QueuedRun,
    Units,
    WaitReason,
    Worker,
    place,
    score,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(name: str, task: str = "t", priority: int = 1, at: int = 0) -> QueuedRun:
    return QueuedRun(name=name, task=task, priority=priority, queued_at=T0 + timedelta(seconds=at))


def worker(
    name: str, slots: int = 1, busy: int = 0, tasks: tuple[str, ...] = ("t",), **labels: str
) -> Worker:
    return Worker(name=name, tasks=frozenset(tasks), slots=slots, busy=busy, labels=labels)


def test_higher_priority_goes_first_then_arrival_order() -> None:
    queue = [run("old-low", at=0), run("new-high", priority=3, at=5), run("mid", priority=2, at=1)]
    result = place(queue, [worker("w", slots=2)], {})
    assert [a.run for a in result.assignments] == ["new-high", "mid"]
    assert result.waiting == {"old-low": WaitReason.SLOTS_BUSY}


def test_same_second_runs_keep_the_order_they_were_seen_in() -> None:
    queue = [
        QueuedRun("b", "t", 1, T0, seq=1),
        QueuedRun("a", "t", 1, T0, seq=2),
    ]
    result = place(queue, [worker("w")], {})
    assert [a.run for a in result.assignments] == ["b"]


def test_a_required_label_excludes_workers_without_it() -> None:
    gpu = AffinityTerm("gpu", "true", required=True)
    result = place([run("r")], [worker("cpu", slots=5), worker("big", gpu="true")], {"t": [gpu]})
    assert [(a.run, a.worker) for a in result.assignments] == [("r", "big")]


def test_the_required_label_can_come_from_the_node() -> None:
    # Worker labels are the node's overlaid with the pod's; the view merges them.
    term = AffinityTerm("nvidia.com/gpu.present", "true", required=True)
    labelled = Worker("w", frozenset({"t"}), 1, 0, {"nvidia.com/gpu.present": "true"})
    assert place([run("r")], [labelled], {"t": [term]}).assignments[0].worker == "w"


def test_no_matching_worker_is_told_apart_from_no_worker_and_busy_slots() -> None:
    gpu = AffinityTerm("gpu", "true", required=True)
    assert place([run("r")], [], {}).waiting == {"r": WaitReason.NO_WORKER}
    assert place([run("r")], [worker("cpu")], {"t": [gpu]}).waiting == {
        "r": WaitReason.NO_MATCHING_WORKER
    }
    assert place([run("r")], [worker("w", busy=1)], {}).waiting == {"r": WaitReason.SLOTS_BUSY}


def test_preferred_weights_pick_the_better_worker_then_the_least_loaded() -> None:
    terms = [
        AffinityTerm("model", "llama", weight=50),
        AffinityTerm("zone", "a", weight=10),
    ]
    workers = [worker("zone-only", zone="a"), worker("model-only", model="llama")]
    assert place([run("r")], workers, {"t": terms}).assignments[0].worker == "model-only"

    even = [worker("busy", slots=4, busy=3), worker("idle", slots=4, busy=1)]
    assert place([run("r")], even, {}).assignments[0].worker == "idle"


def test_ordering_comparators_compare_integers() -> None:
    at_least_16 = AffinityTerm("memory-gb", "16", Comparator.GREATER_THAN_OR_EQUAL)
    assert at_least_16.matches({"memory-gb": "32"})
    assert not at_least_16.matches({"memory-gb": "8"})
    assert not at_least_16.matches({"memory-gb": "lots"})
    assert AffinityTerm("x", "1", Comparator.NOT_EQUAL).matches({})
    assert score([AffinityTerm("x", "1", required=True)], {}) is None


def test_a_blocked_task_does_not_block_other_tasks() -> None:
    queue = [run("a1", task="a", priority=3), run("b1", task="b")]
    workers = [worker("wa", busy=1, tasks=("a",)), worker("wb", tasks=("b",))]
    result = place(queue, workers, {})
    assert [a.run for a in result.assignments] == ["b1"]
    assert result.waiting == {"a1": WaitReason.SLOTS_BUSY}


queues = st.lists(
    st.builds(
        QueuedRun,
        name=st.uuids().map(str),
        task=st.sampled_from(["a", "b", "c"]),
        priority=st.integers(1, 3),
        queued_at=st.integers(0, 100).map(lambda s: T0 + timedelta(seconds=s)),
        seq=st.integers(0, 1000),
    ),
    max_size=60,
    unique_by=lambda r: r.name,
)
worker_sets = st.lists(
    st.builds(
        Worker,
        name=st.uuids().map(str),
        tasks=st.frozensets(st.sampled_from(["a", "b", "c"]), min_size=1),
        slots=st.integers(1, 5),
        busy=st.integers(0, 5),
        labels=st.fixed_dictionaries({"gpu": st.sampled_from(["true", "false"])}),
    ),
    max_size=6,
    unique_by=lambda w: w.name,
)


@settings(max_examples=300)
@given(queue=queues, workers=worker_sets, gpu_for_a=st.booleans())
def test_placement_never_overfills_slots_and_always_honours_required_labels(
    queue: list[QueuedRun], workers: list[Worker], gpu_for_a: bool
) -> None:
    affinity = {"a": [AffinityTerm("gpu", "true", required=True)]} if gpu_for_a else {}
    result = place(queue, workers, affinity)
    by_worker = {w.name: w for w in workers}
    by_run = {r.name: r for r in queue}
    counts: dict[str, int] = {}
    for assignment in result.assignments:
        counts[assignment.worker] = counts.get(assignment.worker, 0) + 1
        w = by_worker[assignment.worker]
        r = by_run[assignment.run]
        assert r.task in w.tasks
        if gpu_for_a and r.task == "a":
            assert w.labels["gpu"] == "true"
    for name, count in counts.items():
        assert by_worker[name].busy + count <= by_worker[name].slots
    # Within a task, the assigned runs are exactly the first ones in queue order.
    for task in ("a", "b", "c"):
        ordered = sorted((r for r in queue if r.task == task), key=QueuedRun.order_key)
        assigned = {a.run for a in result.assignments if by_run[a.run].task == task}
        assert {r.name for r in ordered[: len(assigned)]} == assigned


def keyed(name: str, key: str, at: int = 0, priority: int = 1, limit: int = 2) -> QueuedRun:
    counter = f"t/0/{key}"
    return QueuedRun(
        name=name, task="t", priority=priority, queued_at=T0 + timedelta(seconds=at),
        caps=(Cap(counter, limit),), turn_key=counter,
    )  # fmt: skip


def test_a_concurrency_key_at_its_limit_waits_without_blocking_other_keys() -> None:
    queue = [keyed("a1", "a", 0), keyed("a2", "a", 1), keyed("a3", "a", 2), keyed("b1", "b", 3)]
    result = place(queue, [worker("w", slots=10)], {}, running={"t/0/a": 1}, now=T0)
    assert sorted(a.run for a in result.assignments) == ["a1", "b1"]
    assert result.waiting == {
        "a2": WaitReason.CONCURRENCY_LIMITED,
        "a3": WaitReason.CONCURRENCY_LIMITED,
    }


def test_freed_capacity_goes_round_robin_across_keys() -> None:
    # Key a has a long backlog that arrived first; b and c arrived later. With 3 free slots
    # and a generous cap, each key gets a turn before a gets a second one.
    queue = [keyed(f"a{i}", "a", i, limit=9) for i in range(5)]
    queue += [keyed("b0", "b", 10, limit=9), keyed("c0", "c", 11, limit=9)]
    last = {"t/0/a": (T0 + timedelta(seconds=20), 0)}  # a was served just now
    result = place(queue, [worker("w", slots=3)], {}, last_turn=last, now=T0 + timedelta(30))
    assert [a.run for a in result.assignments] == ["b0", "c0", "a0"]


def test_rate_limit_units_are_spent_and_never_overdrawn() -> None:
    queue = [
        QueuedRun(f"r{i}", "t", 1, T0 + timedelta(seconds=i), units=(Units("ns/openai", 2),))
        for i in range(5)
    ]
    result = place(queue, [worker("w", slots=10)], {}, budgets={"ns/openai": 5})
    assert [a.run for a in result.assignments] == ["r0", "r1"]
    assert result.spent == {"ns/openai": 4}
    assert set(result.waiting.values()) == {WaitReason.RATE_LIMITED}


limited_queues = st.lists(
    st.builds(
        QueuedRun,
        name=st.uuids().map(str),
        task=st.sampled_from(["a", "b"]),
        priority=st.integers(1, 3),
        queued_at=st.integers(0, 100).map(lambda s: T0 + timedelta(seconds=s)),
        seq=st.integers(0, 1000),
        caps=st.sampled_from(["k1", "k2", "k3"]).map(lambda k: (Cap(f"c/{k}", 2),)),
        units=st.sampled_from([(), (Units("rl", 1),), (Units("rl", 3),)]),
        turn_key=st.none(),
    ),
    max_size=60,
    unique_by=lambda r: r.name,
)


@settings(max_examples=300)
@given(
    queue=limited_queues,
    workers=worker_sets,
    running=st.fixed_dictionaries({f"c/{k}": st.integers(0, 2) for k in ("k1", "k2", "k3")}),
    budget=st.integers(0, 20),
)
def test_placement_never_exceeds_concurrency_caps_or_rate_budgets(
    queue: list[QueuedRun], workers: list[Worker], running: dict[str, int], budget: int
) -> None:
    result = place(queue, workers, {}, running=running, budgets={"rl": budget})
    by_run = {r.name: r for r in queue}
    held = dict(running)
    spent = 0
    for assignment in result.assignments:
        r = by_run[assignment.run]
        for cap in r.caps:
            held[cap.counter] += 1
            assert held[cap.counter] <= cap.limit
        spent += sum(u.units for u in r.units)
    assert spent <= budget
    assert result.spent.get("rl", 0) == spent
    # Priority: an unassigned run never outranks an assigned run of the same group.
    for assignment in result.assignments:
        r = by_run[assignment.run]
        for other in queue:
            if other.group == r.group and other.name in result.waiting:
                assert other.order_key() > r.order_key()


@settings(max_examples=300)
@given(
    backlogs=st.lists(st.integers(0, 8), min_size=1, max_size=6),
    free=st.integers(0, 40),
    arrivals=st.randoms(use_true_random=False),
)
def test_freed_capacity_is_shared_round_robin_across_waiting_keys(
    backlogs: list[int], free: int, arrivals: random.Random
) -> None:
    # Keys with backlogs of different lengths, arrived in any interleaving, all before `now`,
    # caps that never bind: no key may get a second run while another key still waits for its
    # first, and in general two keys' shares differ by at most one while both still have runs.
    queue = [
        keyed(f"k{k}-{i}", f"k{k}", limit=99) for k, n in enumerate(backlogs) for i in range(n)
    ]
    times = list(range(len(queue)))
    arrivals.shuffle(times)
    queue = [
        dataclasses.replace(r, queued_at=T0 + timedelta(seconds=t))
        for r, t in zip(queue, times, strict=True)
    ]
    result = place(queue, [worker("w", slots=free)], {}, now=T0 + timedelta(hours=1))

    share = {f"k{k}": 0 for k in range(len(backlogs))}
    for assignment in result.assignments:
        share[assignment.run.split("-")[0]] += 1
    assert len(result.assignments) == min(free, len(queue))
    for key, got in share.items():
        for other, other_got in share.items():
            if other_got < backlogs[int(other[1:])]:  # `other` still has runs waiting
                assert got <= other_got + 1, (key, other, share)
