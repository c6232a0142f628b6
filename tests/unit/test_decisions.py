"""What the operator decides for each run: timeouts, retries, cancellation, worker loss."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubetask.api import Backoff
from kubetask.lifecycle import GiveUp, Phase, Reason, Retry, RetryPolicy, after_failure
from kubetask_operator.decisions import Limits, RunRecord, TaskRecord, WorkerRecord
from kubetask_operator.planner import decide

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits(
    worker_lost_after=timedelta(seconds=30),
    max_requeues=2,
    wait_condition_after=timedelta(seconds=5),
)


def a_run(**fields: object) -> RunRecord:
    base: dict[str, object] = {
        "namespace": "ns", "name": "r", "resource_version": "7", "task": "t",
        "created": NOW - timedelta(seconds=1), "seq": 0,
    }  # fmt: skip
    base.update(fields)
    return RunRecord(**base)  # type: ignore[arg-type]


def a_worker(
    pod: str = "w", renewed_ago: float = 1, slots: int = 2, now: datetime = NOW
) -> WorkerRecord:
    return WorkerRecord(
        namespace="ns", pod=pod, node="n1", tasks=frozenset({"t"}), slots=slots,
        labels={}, ready=True, renewed=now - timedelta(seconds=renewed_ago),
    )  # fmt: skip


def a_task(**fields: object) -> dict[tuple[str, str], TaskRecord]:
    return {("ns", "t"): TaskRecord("ns", "t", **fields)}  # type: ignore[arg-type]


def only(decision_transitions: list) -> dict:  # type: ignore[type-arg]
    assert len(decision_transitions) == 1
    return decision_transitions[0].status  # type: ignore[no-any-return]


def test_a_new_run_is_assigned_with_attempt_one_and_a_deadline() -> None:
    d = decide(runs=[a_run()], tasks=a_task(), workers=[a_worker()], now=NOW, limits=LIMITS)
    status = only(d.transitions)
    assert status["phase"] == "Running"
    assert status["attempt"] == 1
    assert status["worker"] == "w"
    assert status["node"] == "n1"
    assert status["deadline"] == "2026-06-01T12:01:00.000000Z"
    assert d.transitions[0].resource_version == "7"


def test_busy_slots_are_not_handed_out_again() -> None:
    running = [a_run(name=f"x{i}", phase=Phase.RUNNING, worker="w", attempt=1,
                     deadline=NOW + timedelta(seconds=9)) for i in range(2)]  # fmt: skip
    d = decide(
        runs=[*running, a_run()], tasks=a_task(), workers=[a_worker()], now=NOW, limits=LIMITS
    )
    assert d.transitions == []
    assert d.queued == 1
    assert d.wake_at == NOW + timedelta(seconds=9)


def test_a_released_slot_is_free_again() -> None:
    running = [a_run(name=f"x{i}", phase=Phase.RUNNING, worker="w", attempt=1,
                     slot_released=True, deadline=NOW + timedelta(seconds=9))
               for i in range(2)]  # fmt: skip
    d = decide(
        runs=[*running, a_run()], tasks=a_task(), workers=[a_worker()], now=NOW, limits=LIMITS
    )
    assert only(d.transitions)["phase"] == "Running"


def test_execution_timeout_requeues_with_backoff_and_spends_a_retry() -> None:
    policy = RetryPolicy(retries=2, backoff=Backoff(factor=2))
    run = a_run(phase=Phase.RUNNING, worker="w", attempt=2, deadline=NOW)
    d = decide(runs=[run], tasks=a_task(policy=policy), workers=[a_worker()], now=NOW,
               limits=LIMITS)  # fmt: skip
    status = only(d.transitions)
    assert status["phase"] == "Queued"
    assert status["reason"] == "ExecutionTimeout"
    assert status["notBefore"] == "2026-06-01T12:00:04.000000Z"  # 2 ** 2 seconds
    assert status["worker"] is None


def test_execution_timeout_on_the_last_attempt_fails_the_run() -> None:
    run = a_run(phase=Phase.RUNNING, worker="w", attempt=1, deadline=NOW - timedelta(seconds=1))
    d = decide(runs=[run], tasks=a_task(), workers=[a_worker()], now=NOW, limits=LIMITS)
    status = only(d.transitions)
    assert (status["phase"], status["reason"]) == ("Failed", "ExecutionTimeout")


def test_a_lost_worker_requeues_its_runs_without_spending_a_retry() -> None:
    run = a_run(phase=Phase.RUNNING, worker="w", attempt=1, deadline=NOW + timedelta(minutes=1))
    stale = a_worker(renewed_ago=31)
    d = decide(runs=[run], tasks=a_task(), workers=[stale], now=NOW, limits=LIMITS)
    status = only(d.transitions)
    assert (status["phase"], status["reason"], status["requeues"]) == ("Queued", "WorkerLost", 1)

    requeued = a_run(phase=Phase.QUEUED, attempt=1, requeues=1, reason="WorkerLost")
    d = decide(runs=[requeued], tasks=a_task(), workers=[a_worker("w2")], now=NOW, limits=LIMITS)
    assert only(d.transitions)["attempt"] == 1  # the same attempt, on another worker


def test_requeues_are_capped() -> None:
    run = a_run(phase=Phase.RUNNING, worker="gone", attempt=1, requeues=2,
                deadline=NOW + timedelta(minutes=1))  # fmt: skip
    d = decide(runs=[run], tasks=a_task(), workers=[], now=NOW, limits=LIMITS)
    assert (only(d.transitions)["phase"], d.transitions[0].reason) == ("Failed", "WorkerLost")


def test_schedule_timeout_cancels_a_run_still_queued() -> None:
    run = a_run(created=NOW - timedelta(minutes=5))
    d = decide(runs=[run], tasks=a_task(), workers=[], now=NOW, limits=LIMITS)
    status = only(d.transitions)
    assert (status["phase"], status["reason"]) == ("Cancelled", "ScheduleTimeout")


def test_cancel_wins_in_every_open_phase() -> None:
    for phase in (None, Phase.SCHEDULED, Phase.QUEUED, Phase.RUNNING):
        run = a_run(cancel=True, phase=phase, worker="w", attempt=1,
                    deadline=NOW + timedelta(minutes=1))  # fmt: skip
        d = decide(runs=[run], tasks=a_task(), workers=[a_worker()], now=NOW, limits=LIMITS)
        assert (only(d.transitions)["phase"], d.transitions[0].reason) == ("Cancelled", "Cancelled")


def test_a_future_run_at_is_scheduled_then_assigned_when_due() -> None:
    later = NOW + timedelta(minutes=1)
    d = decide(runs=[a_run(run_at=later)], tasks=a_task(), workers=[], now=NOW, limits=LIMITS)
    assert only(d.transitions)["phase"] == "Scheduled"
    assert d.wake_at == later

    scheduled = a_run(run_at=later, phase=Phase.SCHEDULED)
    d = decide(runs=[scheduled], tasks=a_task(), workers=[a_worker()], now=NOW, limits=LIMITS)
    assert d.transitions == []
    d = decide(
        runs=[scheduled], tasks=a_task(), workers=[a_worker(now=later)], now=later, limits=LIMITS
    )
    assert only(d.transitions)["phase"] == "Running"


def test_backoff_holds_a_run_until_not_before() -> None:
    run = a_run(phase=Phase.QUEUED, attempt=1, not_before=NOW + timedelta(seconds=3),
                queued_at=NOW)  # fmt: skip
    d = decide(runs=[run], tasks=a_task(), workers=[a_worker()], now=NOW, limits=LIMITS)
    assert d.transitions == []
    assert d.wake_at == NOW + timedelta(seconds=3)
    due = NOW + timedelta(seconds=3)
    d = decide(runs=[run], tasks=a_task(), workers=[a_worker(now=due)], now=due, limits=LIMITS)
    assert only(d.transitions)["attempt"] == 2


def test_a_run_without_a_worker_gets_a_waiting_condition_once_after_a_delay() -> None:
    fresh = a_run(created=NOW - timedelta(seconds=1))
    d = decide(runs=[fresh], tasks=a_task(), workers=[], now=NOW, limits=LIMITS)
    assert d.transitions == []
    old = a_run(created=NOW - timedelta(seconds=6))
    d = decide(runs=[old], tasks=a_task(), workers=[], now=NOW, limits=LIMITS)
    condition = only(d.transitions)["conditions"][0]
    assert (condition["type"], condition["reason"]) == ("Waiting", "NoWorker")
    marked = a_run(created=NOW - timedelta(seconds=6), waiting_reason="NoWorker")
    d = decide(runs=[marked], tasks=a_task(), workers=[], now=NOW, limits=LIMITS)
    assert d.transitions == []


def test_retry_rules() -> None:
    policy = RetryPolicy(retries=3, backoff=Backoff(factor=3, max_seconds=10))
    assert after_failure(policy, attempt=1, retryable=True, now=NOW) == Retry(
        NOW + timedelta(seconds=3)
    )
    assert after_failure(policy, attempt=3, retryable=True, now=NOW) == Retry(
        NOW + timedelta(seconds=10)
    )
    assert after_failure(policy, attempt=4, retryable=True, now=NOW) == GiveUp(
        Reason.RETRIES_EXHAUSTED
    )
    assert after_failure(policy, attempt=1, retryable=False, now=NOW) == GiveUp(
        Reason.NON_RETRYABLE
    )
    assert RetryPolicy(retries=1).delay(1) == timedelta(0)
    assert RetryPolicy(retries=1, backoff=Backoff(factor=10)).delay(400) == timedelta(days=1)
