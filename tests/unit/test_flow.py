"""Concurrency keys, cancel strategies and rate-limit windows, decided without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubetask.lifecycle import Phase
from kubetask_operator.decisions import Limits, RunRecord, TaskRecord, WorkerRecord
from kubetask_operator.flow import ConcurrencyRule, RateLimitRecord, RateLimitUse, Strategy
from kubetask_operator.limits import ExpressionError, render_key, window_at
from kubetask_operator.planner import MIN_TURNS_BOUND, Planner, decide

NOW = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)
LIMITS = Limits(timedelta(seconds=30), 10, timedelta(seconds=5))


def test_keys_render_from_input_and_metadata() -> None:
    assert render_key("input.user", input={"user": "ada"}, metadata={}) == "ada"
    assert render_key("metadata.team + '-' + input.tier", input={"tier": "gold"},
                      metadata={"team": "ml"}) == "ml-gold"  # fmt: skip
    assert render_key("input.n", input={"n": 3}, metadata={}) == "3"
    with pytest.raises(ExpressionError, match="no field 'user'"):
        render_key("input.user", input={}, metadata={})
    with pytest.raises(ExpressionError, match="not a valid CEL expression"):
        render_key("input.(", input={}, metadata={})


def test_windows_are_fixed_and_aligned() -> None:
    at = datetime(2026, 2, 18, 13, 45, 12, 500, tzinfo=UTC)
    assert window_at("second", at).start == at.replace(microsecond=0)
    assert window_at("minute", at).end == datetime(2026, 2, 18, 13, 46, tzinfo=UTC)
    assert window_at("week", at).start == datetime(2026, 2, 16, tzinfo=UTC)  # a Monday
    assert window_at("month", at).end == datetime(2026, 3, 1, tzinfo=UTC)
    assert window_at("year", at).start == datetime(2026, 1, 1, tzinfo=UTC)


def run_record(name: str, user: str, **fields: object) -> RunRecord:
    base: dict[str, object] = {
        "namespace": "ns", "name": name, "resource_version": "1", "task": "t",
        "created": NOW - timedelta(seconds=1), "seq": 0, "input": {"user": user},
    }  # fmt: skip
    base.update(fields)
    return RunRecord(**base)  # type: ignore[arg-type]


def worker(slots: int = 10) -> WorkerRecord:
    return WorkerRecord("ns", "w", "n", frozenset({"t"}), slots, {}, True, NOW)


def test_a_static_limit_spends_units_and_holds_the_rest_until_the_next_window() -> None:
    task = TaskRecord("ns", "t", rate_limits=(RateLimitUse(units=1, key="api"),))
    window = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    limit = RateLimitRecord(
        "ns", "api", limit=2, duration="minute", resource_version="9", window_start=window, used=1
    )
    runs = [run_record(f"r{i}", "u", seq=i) for i in range(3)]
    d = decide(runs=runs, tasks={("ns", "t"): task}, workers=[worker()], now=NOW, limits=LIMITS,
               rate_limits={("ns", "api"): limit})  # fmt: skip
    assigned = [t for t in d.transitions if t.status.get("phase") == "Running"]
    assert [t.name for t in assigned] == ["r0"]
    assert assigned[0].needs == ("ns/api",)
    assert [(s.budget.name, s.used) for s in d.spends] == [("api", 2)]
    assert d.wake_at is not None and d.wake_at <= datetime(2026, 6, 1, 12, 1, tzinfo=UTC)


def test_a_dynamic_key_gets_its_own_budget() -> None:
    use = RateLimitUse(units=1, dynamic_key="input.user", limit=1, duration="hour")
    task = TaskRecord("ns", "t", rate_limits=(use,))
    runs = [run_record("a1", "ada", seq=1), run_record("a2", "ada", seq=2),
            run_record("b1", "bob", seq=3)]  # fmt: skip
    d = decide(runs=runs, tasks={("ns", "t"): task}, workers=[worker()], now=NOW, limits=LIMITS)
    assert sorted(t.name for t in d.transitions if t.status.get("phase") == "Running") == [
        "a1",
        "b1",
    ]
    assert {s.budget.dynamic_key for s in d.spends} == {"ada", "bob"}
    assert all(s.budget.record is None for s in d.spends)


def test_group_round_robin_never_exceeds_max_runs_per_key() -> None:
    task = TaskRecord("ns", "t", concurrency=(ConcurrencyRule("input.user", 2),))
    running = [run_record(f"x{i}", "ada", phase=Phase.RUNNING, worker="w", attempt=1,
                          deadline=NOW + timedelta(minutes=1)) for i in range(2)]  # fmt: skip
    waiting = [run_record("a", "ada", seq=1), run_record("b", "bob", seq=2)]
    d = decide(runs=running + waiting, tasks={("ns", "t"): task}, workers=[worker()], now=NOW,
               limits=LIMITS)  # fmt: skip
    assert [t.name for t in d.transitions if t.status.get("phase") == "Running"] == ["b"]


def running(name: str, user: str, at: int) -> RunRecord:
    return run_record(
        name, user, phase=Phase.RUNNING, worker="w", attempt=1, seq=at,
        created=NOW - timedelta(seconds=60 - at), deadline=NOW + timedelta(minutes=1),
    )  # fmt: skip


def waiting(name: str, user: str, at: int) -> RunRecord:
    return run_record(name, user, seq=at, created=NOW - timedelta(seconds=60 - at))


def outcome(rule: ConcurrencyRule, runs: list[RunRecord]) -> dict[str, tuple[str, str]]:
    task = TaskRecord("ns", "t", concurrency=(rule,))
    d = decide(runs=runs, tasks={("ns", "t"): task}, workers=[worker()], now=NOW, limits=LIMITS)
    return {t.name: (t.status["phase"], t.reason) for t in d.transitions}


def test_cancel_in_progress_keeps_the_newest_runs_of_a_key() -> None:
    rule = ConcurrencyRule("input.user", 1, Strategy.CANCEL_IN_PROGRESS)
    runs = [running("old", "ada", 0), running("other", "bob", 1), waiting("new", "ada", 5)]
    # The old run is cancelled; the new one starts once that cancel is written.
    assert outcome(rule, runs) == {"old": ("Cancelled", "ConcurrencyCancelled")}


def test_cancel_newest_cancels_arrivals_over_the_limit() -> None:
    rule = ConcurrencyRule("input.user", 2, Strategy.CANCEL_NEWEST)
    runs = [running("r1", "ada", 0), waiting("w1", "ada", 1), waiting("w2", "ada", 2),
            waiting("b", "bob", 3)]  # fmt: skip
    assert outcome(rule, runs) == {
        "w2": ("Cancelled", "ConcurrencyCancelled"),
        "w1": ("Running", "Assigned"),
        "b": ("Running", "Assigned"),
    }


def test_a_failing_expression_fails_only_that_run() -> None:
    rule = ConcurrencyRule("input.user", 1)
    broken = run_record("broken", "x", input={})
    assert outcome(rule, [broken, waiting("ok", "ada", 0)]) == {
        "broken": ("Failed", "InvalidInput"),
        "ok": ("Running", "Assigned"),
    }


def test_round_robin_turns_are_kept_only_for_keys_with_runs_waiting() -> None:
    task = TaskRecord("ns", "t", concurrency=(ConcurrencyRule("input.user", 1),))
    tasks = {("ns", "t"): task}
    many = MIN_TURNS_BOUND + 500

    # Every key has a second run waiting behind its first: all turns still order something.
    planner = Planner(LIMITS)
    runs = {
        (r.namespace, r.name): r
        for i in range(many)
        for r in (
            run_record(f"a{i}", f"u{i}", seq=2 * i),
            run_record(f"b{i}", f"u{i}", seq=2 * i + 1),
        )
    }
    planner.touch_all(runs)
    planner.plan(runs=runs, tasks=tasks, workers=[worker(slots=2 * many)], now=NOW)
    assert len(planner.turns) == many

    # Every key's only run is assigned: no key has anything waiting, so no turn is worth keeping.
    planner = Planner(LIMITS)
    runs = {("ns", f"a{i}"): run_record(f"a{i}", f"u{i}", seq=i) for i in range(many)}
    planner.touch_all(runs)
    planner.plan(runs=runs, tasks=tasks, workers=[worker(slots=many)], now=NOW)
    assert planner.turns == {}
