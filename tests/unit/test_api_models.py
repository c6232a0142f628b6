"""The kubetask.api models: defaults, the camelCase wire format, and the rules they enforce."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetask.api import (
    API_VERSION,
    GROUP,
    VERSION,
    Backoff,
    ConcurrencyRule,
    ConcurrencyStrategy,
    Condition,
    ConditionStatus,
    DesiredWorkerLabel,
    ObjectMeta,
    RateLimit,
    RateLimitDuration,
    RateLimitSpec,
    RateLimitStatus,
    Task,
    TaskRateLimit,
    TaskRun,
    TaskRunPhase,
    TaskRunReason,
    TaskRunSpec,
    TaskRunStatus,
    TaskSpec,
    TaskStatus,
    WorkerLabelComparator,
    format_duration,
    parse_duration,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KINDS: dict[str, type[Task] | type[TaskRun] | type[RateLimit]] = {
    "Task": Task,
    "TaskRun": TaskRun,
    "RateLimit": RateLimit,
}


def error_locations(error: ValidationError) -> list[str]:
    return [".".join(str(part) for part in detail["loc"]) for detail in error.errors()]


# --- defaults -------------------------------------------------------------------------------------


def test_task_spec_defaults_follow_hatchet() -> None:
    spec = TaskSpec()

    assert spec.retries == 0
    assert spec.backoff is None
    assert spec.schedule_timeout == "5m"
    assert spec.execution_timeout == "60s"
    assert spec.default_priority == 1
    assert spec.concurrency == []
    assert spec.rate_limits == []
    assert spec.worker_affinity == []


def test_item_defaults_follow_hatchet() -> None:
    assert ConcurrencyRule(expression="input.k", max_runs=1).strategy is (
        ConcurrencyStrategy.GROUP_ROUND_ROBIN
    )
    assert TaskRateLimit(key="api").units == 1
    label = DesiredWorkerLabel(key="gpu", value="true")
    assert label.comparator is WorkerLabelComparator.EQUAL
    assert label.required is False
    assert label.weight == 100


def test_task_run_spec_defaults_leave_priority_and_run_at_to_the_operator() -> None:
    spec = TaskRunSpec(task="hello")

    assert spec.input == {}
    assert spec.metadata == {}
    assert spec.cancel is False
    assert spec.priority is None
    assert spec.run_at is None


def test_a_task_without_spec_gets_the_default_spec() -> None:
    task = Task.from_manifest({"metadata": {"name": "hello"}})

    assert task.spec == TaskSpec()
    assert task.api_version == API_VERSION == f"{GROUP}/{VERSION}"
    assert task.kind == "Task"


def test_fresh_status_counts_from_zero() -> None:
    status = TaskRunStatus()

    assert (status.attempt, status.requeues, status.slot_released) == (0, 0, False)
    assert status.phase is TaskRunPhase.QUEUED
    assert TaskStatus().workers == 0
    assert RateLimitStatus().used == 0
    assert RateLimitStatus().remaining is None


# --- wire format ----------------------------------------------------------------------------------


def test_manifest_uses_camel_case_and_leaves_unset_fields_out() -> None:
    run = TaskRun(
        metadata=ObjectMeta(name="resize-1", namespace="media"),
        spec=TaskRunSpec(task="resize", run_at=datetime(2030, 1, 1, tzinfo=UTC)),
    )

    manifest = run.to_manifest()

    assert manifest == {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskRun",
        "metadata": {"name": "resize-1", "namespace": "media", "labels": {}, "annotations": {}},
        "spec": {
            "task": "resize",
            "input": {},
            "runAt": "2030-01-01T00:00:00Z",
            "metadata": {},
            "cancel": False,
        },
    }


def test_manifest_round_trips_through_camel_case() -> None:
    manifest = {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "Task",
        "metadata": {"name": "embed", "labels": {"team": "search"}, "annotations": {}},
        "spec": {
            "retries": 3,
            "backoff": {"factor": 2.0, "maxSeconds": 30},
            "scheduleTimeout": "10m",
            "executionTimeout": "1h30m",
            "defaultPriority": 2,
            "concurrency": [
                {"expression": "input.userId", "maxRuns": 2, "strategy": "CancelNewest"}
            ],
            "rateLimits": [
                {"key": "embeddings", "units": 2},
                {"dynamicKey": "input.userId", "units": 1, "limit": 10, "duration": "hour"},
            ],
            "workerAffinity": [
                {
                    "key": "memoryGb",
                    "value": "16",
                    "comparator": "GreaterThanOrEqual",
                    "required": True,
                    "weight": 100,
                }
            ],
        },
    }

    task = Task.from_manifest(manifest)

    assert task.spec.backoff == Backoff(factor=2, max_seconds=30)
    assert task.spec.rate_limits[1].dynamic_key == "input.userId"
    assert task.to_manifest() == manifest


def test_fields_can_be_set_by_python_name_or_by_manifest_name() -> None:
    by_alias = TaskSpec.model_validate({"executionTimeout": "2m", "defaultPriority": 3})
    by_name = TaskSpec(execution_timeout="2m", default_priority=3)

    assert by_alias == by_name


def test_server_metadata_is_read_and_written_back_unchanged() -> None:
    manifest = {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "RateLimit",
        "metadata": {
            "name": "image-api",
            "namespace": "media",
            "uid": "7f6c3c1e-0000-4000-8000-000000000000",
            "resourceVersion": "42",
            "generation": 1,
            "creationTimestamp": "2024-06-01T12:00:00Z",
            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
            "labels": {},
            "annotations": {},
        },
        "spec": {"limit": 100, "duration": "minute"},
        "status": {"windowStart": "2024-06-01T12:01:00Z", "used": 3, "remaining": 97},
    }

    limit = RateLimit.from_manifest(manifest)

    assert limit.metadata.generation == 1
    assert limit.metadata.creation_timestamp == datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert limit.status is not None
    assert limit.status.remaining == 97
    written = limit.to_manifest()
    assert written["metadata"] == manifest["metadata"]
    assert written["status"] == manifest["status"]


def test_timestamps_are_kept_in_utc_and_written_with_z() -> None:
    berlin = timezone(timedelta(hours=2))
    spec = TaskRunSpec(task="hello", run_at=datetime(2030, 6, 1, 14, 30, tzinfo=berlin))

    assert spec.run_at == datetime(2030, 6, 1, 12, 30, tzinfo=UTC)
    assert spec.model_dump(mode="json", by_alias=True)["runAt"] == "2030-06-01T12:30:00Z"
    assert (
        TaskRunSpec.model_validate({"task": "hello", "runAt": "2030-06-01T14:30:00+02:00"}) == spec
    )


def test_a_time_without_timezone_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        TaskRunSpec(task="hello", run_at=datetime(2030, 1, 1))

    assert error_locations(caught.value) == ["run_at"]


def test_input_keeps_any_json_including_nulls() -> None:
    document = {"a": None, "nested": {"list": [1, 2.5, "x", None, True]}, "empty": {}}
    spec = TaskRunSpec(task="hello", input=document)

    assert TaskRun(metadata=ObjectMeta(name="r"), spec=spec).to_manifest()["spec"]["input"] == (
        document
    )


@pytest.mark.parametrize("output", [{"k": [1, 2]}, [1, "two"], "text", 0, False])
def test_status_output_keeps_any_json_value(output: Any) -> None:
    status = TaskRunStatus.model_validate({"phase": "Completed", "output": output})

    assert status.output == output
    assert status.model_dump(mode="json", by_alias=True)["output"] == output


def test_misspelt_spec_field_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        TaskSpec.model_validate({"retrys": 3})

    assert error_locations(caught.value) == ["retrys"]


def test_unknown_status_field_from_a_newer_operator_is_ignored() -> None:
    status = TaskRunStatus.model_validate({"phase": "Running", "somethingNew": 1})

    assert status.phase is TaskRunPhase.RUNNING


def test_metadata_keeps_fields_it_does_not_model() -> None:
    meta = ObjectMeta.model_validate({"name": "x", "finalizers": ["kubetask.io/slot"]})

    assert meta.model_dump(by_alias=True, exclude_none=True)["finalizers"] == ["kubetask.io/slot"]


def test_metadata_needs_a_name_or_a_generated_name() -> None:
    assert ObjectMeta(generate_name="hello-").name is None
    with pytest.raises(ValidationError, match="name or generateName"):
        ObjectMeta()


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"name": "Resize_Image"}, "name"),
        ({"name": "a" * 254}, "name"),
        ({"generateName": "-run-"}, "generateName"),
        ({"name": "ok", "namespace": "Media"}, "namespace"),
        ({"name": "ok", "labels": {"team": "media team"}}, "team"),
        ({"name": "ok", "labels": {"team": "x" * 64}}, "team"),
        ({"name": "ok", "labels": {"bad key": "x"}}, "bad key"),
        ({"name": "ok", "labels": {"Example.com/team": "x"}}, "Example.com/team"),
        ({"name": "ok", "annotations": {"/empty-prefix": "x"}}, "/empty-prefix"),
        ({"name": "ok", "annotations": {"note": "x" * 300_000}}, "256 KiB"),
    ],
)
def test_metadata_the_server_would_refuse_is_refused(
    metadata: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ObjectMeta.model_validate(metadata)


def test_metadata_accepts_qualified_label_keys_and_empty_values() -> None:
    labels = {"app.kubernetes.io/part-of": "kubetask", "tier": "", "v": "1.2_3-a"}

    assert ObjectMeta(name="a.b-c", namespace="media", labels=labels).labels == labels


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("45s", timedelta(seconds=45)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(minutes=90)),
        ("250us", timedelta(microseconds=250)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration_reads_go_style_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "5", "5 minutes", "-5s", "1d", "1h 30m", ".5s", "5.s", "1e3s"]
)
def test_parse_duration_refuses_what_the_server_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(minutes=5), "5m"),
        (timedelta(seconds=60), "1m"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(days=2, seconds=1), "48h1s"),
    ],
)
def test_format_duration_writes_what_parse_duration_reads(delta: timedelta, expected: str) -> None:
    assert format_duration(delta) == expected


@given(st.integers(min_value=1, max_value=999_999 * 3600 * 1000))
def test_format_then_parse_is_exact_to_the_millisecond(milliseconds: int) -> None:
    delta = timedelta(milliseconds=milliseconds)

    assert parse_duration(format_duration(delta)) == delta


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(seconds=-1)])
def test_format_duration_refuses_lengths_no_field_accepts(delta: timedelta) -> None:
    with pytest.raises(ValueError, match="longer than zero"):
        format_duration(delta)


@pytest.mark.parametrize("value", ["0s", "0ms", "0h0m0s", "0.0s"])
def test_timeouts_must_be_longer_than_zero(value: str) -> None:
    with pytest.raises(ValidationError, match="longer than zero") as caught:
        TaskSpec.model_validate({"executionTimeout": value})

    assert error_locations(caught.value) == ["executionTimeout"]


@pytest.mark.parametrize("value", ["5 minutes", "10", "1d", "-1s", "9" * 40 + "s"])
def test_timeouts_must_be_go_style_durations(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TaskSpec.model_validate({"scheduleTimeout": value})

    assert error_locations(caught.value) == ["scheduleTimeout"]


# --- retries and backoff --------------------------------------------------------------------------


def test_backoff_waits_factor_to_the_retry_number_capped_at_max_seconds() -> None:
    backoff = Backoff(factor=2, max_seconds=30)

    waits = [backoff.delay(retry).total_seconds() for retry in range(1, 7)]

    assert waits == [2, 4, 8, 16, 30, 30]


def test_backoff_without_max_seconds_is_capped_at_one_day() -> None:
    assert Backoff(factor=10).delay(9) == timedelta(days=1)


def test_backoff_beyond_float_range_is_the_cap() -> None:
    assert Backoff(factor=1e300, max_seconds=5).delay(3) == timedelta(seconds=5)


def test_backoff_counts_retries_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        Backoff(factor=2).delay(0)


@pytest.mark.parametrize(
    ("backoff", "location"),
    [
        ({"factor": 0.5}, "factor"),
        ({"factor": float("inf")}, "factor"),
        ({"factor": 2, "maxSeconds": 0}, "maxSeconds"),
        ({}, "factor"),
    ],
)
def test_backoff_refuses_out_of_range_values(backoff: dict[str, Any], location: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TaskSpec.model_validate({"backoff": backoff})

    assert error_locations(caught.value) == [f"backoff.{location}"]


@pytest.mark.parametrize(
    ("spec", "location"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 2**31}, "retries"),
        ({"defaultPriority": 0}, "defaultPriority"),
        ({"defaultPriority": 4}, "defaultPriority"),
        ({"concurrency": [{"expression": "", "maxRuns": 1}]}, "concurrency.0.expression"),
        ({"concurrency": [{"expression": "input.k", "maxRuns": 0}]}, "concurrency.0.maxRuns"),
        (
            {"concurrency": [{"expression": "k", "maxRuns": 1, "strategy": "Fifo"}]},
            "concurrency.0.strategy",
        ),
        ({"rateLimits": [{"key": "api", "units": 0}]}, "rateLimits.0.units"),
        ({"rateLimits": [{"key": "Not_A_Name"}]}, "rateLimits.0.key"),
        (
            {"workerAffinity": [{"key": "gpu", "value": "x", "weight": -1}]},
            "workerAffinity.0.weight",
        ),
        ({"workerAffinity": [{"value": "x"}]}, "workerAffinity.0.key"),
        (
            {"workerAffinity": [{"key": "gpu", "value": "x", "comparator": "Like"}]},
            "workerAffinity.0.comparator",
        ),
    ],
)
def test_task_spec_errors_name_the_field(spec: dict[str, Any], location: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TaskSpec.model_validate(spec)

    assert error_locations(caught.value) == [location]


# --- rate limits ----------------------------------------------------------------------------------


def test_static_rate_limit_names_a_rate_limit_object() -> None:
    limit = TaskRateLimit(key="image-api", units=2)

    assert (limit.key, limit.dynamic_key, limit.limit, limit.duration) == (
        "image-api",
        None,
        None,
        None,
    )


def test_dynamic_rate_limit_carries_its_own_limit_and_window() -> None:
    limit = TaskRateLimit(dynamic_key="input.userId", limit=10, duration=RateLimitDuration.HOUR)

    assert limit.duration == "hour"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "set key"),
        ({"key": "api", "dynamic_key": "input.userId", "limit": 1, "duration": "hour"}, "only one"),
        ({"dynamic_key": "input.userId", "duration": "hour"}, "limit and duration are required"),
        ({"dynamic_key": "input.userId", "limit": 5}, "limit and duration are required"),
        ({"key": "api", "limit": 5}, "belong to the RateLimit"),
        ({"key": "api", "duration": "hour"}, "belong to the RateLimit"),
    ],
)
def test_rate_limit_is_either_static_or_dynamic(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TaskRateLimit.model_validate(fields)


@pytest.mark.parametrize(
    ("spec", "location"),
    [
        ({"limit": 0, "duration": "minute"}, "limit"),
        ({"limit": 1, "duration": "fortnight"}, "duration"),
        ({"limit": 1, "duration": "Minute"}, "duration"),
        ({"duration": "minute"}, "limit"),
    ],
)
def test_rate_limit_spec_errors_name_the_field(spec: dict[str, Any], location: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RateLimitSpec.model_validate(spec)

    assert error_locations(caught.value) == [location]


# --- worker affinity ------------------------------------------------------------------------------


@pytest.mark.parametrize("comparator", [c for c in WorkerLabelComparator if c.orders])
@pytest.mark.parametrize("value", ["16", "-3", "0"])
def test_ordering_comparators_accept_integers(
    comparator: WorkerLabelComparator, value: str
) -> None:
    assert DesiredWorkerLabel(key="memoryGb", value=value, comparator=comparator).value == value


@pytest.mark.parametrize("comparator", [c for c in WorkerLabelComparator if c.orders])
@pytest.mark.parametrize("value", ["a100", "1.5", "", "+3", "1" * 19, "١٢"])
def test_ordering_comparators_refuse_non_integers(
    comparator: WorkerLabelComparator, value: str
) -> None:
    with pytest.raises(ValidationError, match="must be an integer"):
        DesiredWorkerLabel(key="memoryGb", value=value, comparator=comparator)


@pytest.mark.parametrize(
    "comparator", [WorkerLabelComparator.EQUAL, WorkerLabelComparator.NOT_EQUAL]
)
def test_equality_comparators_take_any_string(comparator: WorkerLabelComparator) -> None:
    assert (
        DesiredWorkerLabel(key="model", value="all-minilm", comparator=comparator).required is False
    )


# --- task runs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "location"),
    [
        ({}, "task"),
        ({"task": ""}, "task"),
        ({"task": "Resize_Image"}, "task"),
        ({"task": "hello", "priority": 0}, "priority"),
        ({"task": "hello", "priority": 4}, "priority"),
        ({"task": "hello", "runAt": "tomorrow"}, "runAt"),
        ({"task": "hello", "input": [1, 2]}, "input"),
        ({"task": "hello", "metadata": {"team": 7}}, "metadata.team"),
        ({"task": "hello", "metadata": {f"k{i}": "v" for i in range(65)}}, "metadata"),
    ],
)
def test_task_run_spec_errors_name_the_field(spec: dict[str, Any], location: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TaskRunSpec.model_validate(spec)

    assert error_locations(caught.value) == [location]


def test_finished_phases_are_the_final_ones() -> None:
    finished = {phase for phase in TaskRunPhase if phase.finished}

    assert finished == {TaskRunPhase.COMPLETED, TaskRunPhase.FAILED, TaskRunPhase.CANCELLED}


def test_reasons_fit_the_status_reason_pattern() -> None:
    for reason in TaskRunReason:
        assert TaskRunStatus(reason=reason).reason == reason.value


def test_status_reason_must_be_one_pascal_case_word() -> None:
    with pytest.raises(ValidationError) as caught:
        TaskRunStatus.model_validate({"reason": "worker lost"})

    assert error_locations(caught.value) == ["reason"]


def test_log_lines_are_capped_at_a_thousand() -> None:
    with pytest.raises(ValidationError) as caught:
        TaskRunStatus.model_validate({"logs": ["line"] * 1001})

    assert error_locations(caught.value) == ["logs"]


# --- conditions -----------------------------------------------------------------------------------


def condition(kind: str) -> Condition:
    return Condition(
        type=kind,
        status=ConditionStatus.TRUE,
        reason="WorkersReady",
        message="",
        last_transition_time=datetime(2024, 1, 1, tzinfo=UTC),
    )


def test_conditions_hold_one_entry_per_type() -> None:
    assert len(TaskStatus(conditions=[condition("Ready"), condition("Serving")]).conditions) == 2
    with pytest.raises(ValidationError, match="twice"):
        TaskStatus(conditions=[condition("Ready"), condition("Ready")])


def test_condition_status_is_true_false_or_unknown() -> None:
    with pytest.raises(ValidationError) as caught:
        Condition.model_validate({**condition("Ready").model_dump(), "status": "Yes"})

    assert error_locations(caught.value) == ["status"]


# --- examples -------------------------------------------------------------------------------------


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{index}", document)
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for index, document in enumerate(yaml.safe_load_all(path.read_text()))
    ]


@pytest.mark.parametrize(
    "document", [d for _, d in example_documents()], ids=[i for i, _ in example_documents()]
)
def test_every_example_is_a_valid_kubetask_object(document: dict[str, Any]) -> None:
    model = KINDS[document["kind"]]

    assert model.from_manifest(document).metadata.name == document["metadata"]["name"]


def test_examples_cover_every_concurrency_strategy_and_both_kinds_of_rate_limit() -> None:
    tasks = [Task.from_manifest(d) for _, d in example_documents() if d["kind"] == "Task"]
    strategies = {rule.strategy for task in tasks for rule in task.spec.concurrency}
    rate_limits = [limit for task in tasks for limit in task.spec.rate_limits]

    assert strategies == set(ConcurrencyStrategy)
    assert any(limit.key for limit in rate_limits)
    assert any(limit.dynamic_key for limit in rate_limits)
