"""The generated CRDs as the API server applies them: examples, invalid objects, columns, selectors.

The unit tests check what the generator writes; these check what a real API server makes of it:
CEL rules compile within the cost limit, error messages name the field, every object the pydantic
models accept is accepted and stored unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from pydantic import BaseModel, ValidationError

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
    Resource,
    Task,
    TaskRateLimit,
    TaskRun,
    TaskRunError,
    TaskRunPhase,
    TaskRunReason,
    TaskRunSpec,
    TaskRunStatus,
    TaskSpec,
    TaskStatus,
    WorkerLabelComparator,
    parse_duration,
)
from kubetask.api.common import INT32_MAX, INT64_MAX, OBJECT_NAME_PATTERN

pytestmark = pytest.mark.integration

ModelT = TypeVar("ModelT", bound=BaseModel)

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
MODELS: dict[str, type[Task] | type[TaskRun] | type[RateLimit]] = {
    "Task": Task,
    "TaskRun": TaskRun,
    "RateLimit": RateLimit,
}


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def custom_objects(kube_api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_api)


def read(kube_api: client.ApiClient, namespace: str, kind: str, name: str) -> dict[str, Any]:
    stored: dict[str, Any] = custom_objects(kube_api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, MODELS[kind].plural, name
    )
    return stored


def create(kube_api: client.ApiClient, namespace: str, resource: Resource) -> dict[str, Any]:
    created: dict[str, Any] = custom_objects(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, resource.plural, resource.to_manifest()
    )
    return created


def replace_status(
    kube_api: client.ApiClient, namespace: str, resource: Resource, stored: dict[str, Any]
) -> dict[str, Any]:
    """Write resource's status over the stored object through the status subresource."""
    status = resource.model_dump(mode="json", by_alias=True, exclude_none=True)["status"]
    body = {**stored, "status": status}
    replaced: dict[str, Any] = custom_objects(kube_api).replace_namespaced_custom_object_status(
        GROUP, VERSION, namespace, resource.plural, stored["metadata"]["name"], body
    )
    return replaced


# --- (a) every example applies and reads back as written, plus defaults ---------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_applies_and_reads_back_with_only_defaults_added(
    example: Path, kubectl: Any, kube_api: client.ApiClient, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(example))

    for document in yaml.safe_load_all(example.read_text()):
        kind, name = document["kind"], document["metadata"]["name"]
        # The models fill in the same defaults as the schema (tests/unit/test_crd_generation.py).
        expected = MODELS[kind].from_manifest(document).to_manifest()["spec"]

        stored = read(kube_api, namespace, kind, name)

        assert stored["spec"] == expected, f"{example.name}: {kind} {name}"


# --- (b) invalid objects are refused, and the error names the field -------------------------------


def task(spec: Any, name: str = "bad") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Task", "metadata": {"name": name}, "spec": spec}


def run(spec: Any = None, name: str = "bad-run") -> dict[str, Any]:
    manifest = {"apiVersion": API_VERSION, "kind": "TaskRun", "metadata": {"name": name}}
    return manifest if spec is None else {**manifest, "spec": spec}


def rate_limit(spec: Any = None) -> dict[str, Any]:
    manifest = {"apiVersion": API_VERSION, "kind": "RateLimit", "metadata": {"name": "bad-limit"}}
    return manifest if spec is None else {**manifest, "spec": spec}


STORED_RUN = {
    "task": "resize",
    "input": {"image": "cat.png", "width": 640},
    "priority": 2,
    "runAt": "2030-01-01T00:00:00Z",
    "metadata": {"team": "media"},
}


def changed_run(**changes: Any) -> dict[str, Any]:
    """STORED_RUN with changes; a change to None removes the field."""
    return run({k: v for k, v in {**STORED_RUN, **changes}.items() if v is not None})


@dataclass(frozen=True)
class Invalid:
    """A manifest the API server must refuse, with the field its error must name.

    With ``stored``, that manifest is applied first and the refused one is an update of it.
    """

    case: str
    manifest: dict[str, Any]
    field: str
    stored: dict[str, Any] | None = None


STATIC = {"key": "image-api"}
DYNAMIC = {"dynamicKey": "input.userId", "limit": 10, "duration": "hour"}
GPU = {"key": "gpu", "value": "true"}

INVALID = [
    # Task: types and ranges.
    Invalid("negative retries", task({"retries": -1}), "spec.retries"),
    Invalid("retries as text", task({"retries": "three"}), "spec.retries"),
    Invalid("backoff factor below one", task({"backoff": {"factor": 0.5}}), "spec.backoff.factor"),
    Invalid("backoff without factor", task({"backoff": {"maxSeconds": 9}}), "spec.backoff.factor"),
    Invalid(
        "backoff cap of zero",
        task({"backoff": {"factor": 2, "maxSeconds": 0}}),
        "spec.backoff.maxSeconds",
    ),
    Invalid("priority above three", task({"defaultPriority": 4}), "spec.defaultPriority"),
    Invalid("priority zero", task({"defaultPriority": 0}), "spec.defaultPriority"),
    # Task: durations.
    Invalid("duration in words", task({"scheduleTimeout": "5 minutes"}), "spec.scheduleTimeout"),
    Invalid("duration without unit", task({"executionTimeout": "90"}), "spec.executionTimeout"),
    Invalid("duration in days", task({"executionTimeout": "1d"}), "spec.executionTimeout"),
    Invalid("zero duration", task({"executionTimeout": "0s"}), "spec.executionTimeout"),
    Invalid("negative duration", task({"scheduleTimeout": "-5m"}), "spec.scheduleTimeout"),
    # Task: concurrency.
    Invalid(
        "empty concurrency expression",
        task({"concurrency": [{"expression": "", "maxRuns": 1}]}),
        "spec.concurrency[0].expression",
    ),
    Invalid(
        "concurrency without maxRuns",
        task({"concurrency": [{"expression": "input.k"}]}),
        "spec.concurrency[0].maxRuns",
    ),
    Invalid(
        "unknown concurrency strategy",
        task({"concurrency": [{"expression": "input.k", "maxRuns": 1, "strategy": "Fifo"}]}),
        "spec.concurrency[0].strategy",
    ),
    Invalid("concurrency as a number", task({"concurrency": 3}), "spec.concurrency"),
    # Task: rate limits.
    Invalid(
        "both key and dynamicKey",
        task({"rateLimits": [{**STATIC, **DYNAMIC}]}),
        "spec.rateLimits[0].dynamicKey",
    ),
    Invalid(
        "neither key nor dynamicKey", task({"rateLimits": [{"units": 2}]}), "spec.rateLimits[0]"
    ),
    Invalid(
        "dynamic key without limit",
        task({"rateLimits": [{"dynamicKey": "input.userId", "duration": "hour"}]}),
        "spec.rateLimits[0].limit",
    ),
    Invalid(
        "dynamic key without duration",
        task({"rateLimits": [{"dynamicKey": "input.userId", "limit": 10}]}),
        "spec.rateLimits[0].duration",
    ),
    Invalid(
        "unknown rate limit duration",
        task({"rateLimits": [{**DYNAMIC, "duration": "fortnight"}]}),
        "spec.rateLimits[0].duration",
    ),
    Invalid(
        "static key with its own limit",
        task({"rateLimits": [{**STATIC, "limit": 5}]}),
        "spec.rateLimits[0].limit",
    ),
    Invalid(
        "zero units", task({"rateLimits": [{**STATIC, "units": 0}]}), "spec.rateLimits[0].units"
    ),
    Invalid(
        "key that is no object name",
        task({"rateLimits": [{"key": "Image_API"}]}),
        "spec.rateLimits[0].key",
    ),
    # Task: worker affinity.
    Invalid(
        "ordering comparator on a word",
        task({"workerAffinity": [{"key": "gpu", "value": "a100", "comparator": "GreaterThan"}]}),
        "spec.workerAffinity[0].value",
    ),
    Invalid(
        "ordering comparator on a fraction",
        task({"workerAffinity": [{**GPU, "value": "1.5", "comparator": "LessThanOrEqual"}]}),
        "spec.workerAffinity[0].value",
    ),
    Invalid(
        "unknown comparator",
        task({"workerAffinity": [{**GPU, "comparator": "Like"}]}),
        "spec.workerAffinity[0].comparator",
    ),
    Invalid(
        "negative weight",
        task({"workerAffinity": [{**GPU, "weight": -1}]}),
        "spec.workerAffinity[0].weight",
    ),
    Invalid(
        "label without key",
        task({"workerAffinity": [{"value": "true"}]}),
        "spec.workerAffinity[0].key",
    ),
    Invalid(
        "label value as a number",
        task({"workerAffinity": [{"key": "memoryGb", "value": 16}]}),
        "spec.workerAffinity[0].value",
    ),
    # TaskRun: creation.
    Invalid("run without spec", run(), "spec"),
    Invalid("run without task", run({"input": {}}), "spec.task"),
    Invalid("run with empty task", run({"task": ""}), "spec.task"),
    Invalid("run of no valid task name", run({"task": "Resize_Image"}), "spec.task"),
    Invalid("run priority five", run({"task": "hello", "priority": 5}), "spec.priority"),
    Invalid("run priority as a word", run({"task": "hello", "priority": "high"}), "spec.priority"),
    Invalid("runAt in words", run({"task": "hello", "runAt": "tomorrow"}), "spec.runAt"),
    Invalid(
        "runAt in month thirteen",
        run({"task": "hello", "runAt": "2030-13-01T00:00:00Z"}),
        "spec.runAt",
    ),
    Invalid("input as a list", run({"task": "hello", "input": [1, 2]}), "spec.input"),
    Invalid(
        "metadata value as a number",
        run({"task": "hello", "metadata": {"team": 7}}),
        "spec.metadata.team",
    ),
    Invalid("cancel as a word", run({"task": "hello", "cancel": "maybe"}), "spec.cancel"),
    # TaskRun: the spec is fixed once the run exists.
    Invalid("task changed", changed_run(task="embed"), "spec.task", changed_run()),
    Invalid("input changed", changed_run(input={"image": "dog.png"}), "spec.input", changed_run()),
    Invalid(
        "input nested value changed",
        changed_run(input={"image": "cat.png", "width": 320}),
        "spec.input",
        changed_run(),
    ),
    Invalid("priority changed", changed_run(priority=3), "spec.priority", changed_run()),
    Invalid("priority set later", changed_run(), "spec.priority", changed_run(priority=None)),
    Invalid("priority removed", changed_run(priority=None), "spec.priority", changed_run()),
    Invalid(
        "runAt changed", changed_run(runAt="2031-01-01T00:00:00Z"), "spec.runAt", changed_run()
    ),
    Invalid("runAt set later", changed_run(), "spec.runAt", changed_run(runAt=None)),
    Invalid(
        "metadata changed", changed_run(metadata={"team": "search"}), "spec.metadata", changed_run()
    ),
    Invalid("metadata added later", changed_run(), "spec.metadata", changed_run(metadata=None)),
    Invalid(
        "cancel set back to false",
        changed_run(cancel=False),
        "spec.cancel",
        changed_run(cancel=True),
    ),
    # RateLimit.
    Invalid("rate limit without spec", rate_limit(), "spec"),
    Invalid("limit zero", rate_limit({"limit": 0, "duration": "minute"}), "spec.limit"),
    Invalid("limit missing", rate_limit({"duration": "minute"}), "spec.limit"),
    Invalid("unknown window", rate_limit({"limit": 5, "duration": "fortnight"}), "spec.duration"),
    Invalid(
        "window in PascalCase", rate_limit({"limit": 5, "duration": "Minute"}), "spec.duration"
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("invalid", INVALID, ids=[invalid.case for invalid in INVALID])
def test_server_refuses_invalid_object_naming_the_field(
    invalid: Invalid, kubectl: Any, namespace: str
) -> None:
    if invalid.stored is not None:
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(invalid.stored))

    refused = kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(invalid.manifest), check=False
    )

    assert refused.returncode != 0, f"the server accepted {invalid.case}"
    assert f"{invalid.field}: " in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    "invalid",
    [invalid for invalid in INVALID if invalid.stored is None],
    ids=[invalid.case for invalid in INVALID if invalid.stored is None],
)
def test_models_refuse_what_the_server_refuses(invalid: Invalid) -> None:
    with pytest.raises(ValidationError):
        MODELS[invalid.manifest["kind"]].from_manifest(invalid.manifest)


@pytest.mark.timeout(60)
def test_run_can_be_cancelled_after_creation(kubectl: Any, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(changed_run()))

    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(changed_run(cancel=True)))

    cancelled = kubectl("get", "tr", "bad-run", "-n", namespace, "-o", "jsonpath={.spec.cancel}")
    assert cancelled.stdout == "true"


# --- (c) whatever the models accept, the server accepts and stores unchanged ----------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
NON_EMPTY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
PASCAL_CASE = st.from_regex(r"\A[A-Z][A-Za-z0-9]{0,20}\Z")
OBJECT_NAMES = st.from_regex(OBJECT_NAME_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 253)
TIMESTAMPS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
LABEL_KEYS = st.builds(
    lambda prefix, name: f"{prefix}/{name}" if prefix else name,
    st.none() | st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?(\.[a-z0-9]{1,8}){0,2}\Z"),
    st.from_regex(r"\A([A-Za-z0-9][-A-Za-z0-9_.]{0,20})?[A-Za-z0-9]\Z"),
)
LABEL_VALUES = st.from_regex(r"\A(([A-Za-z0-9][-A-Za-z0-9_.]{0,40})?[A-Za-z0-9])?\Z")
LABELS = st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=3)
COUNTS = st.integers(min_value=0, max_value=INT32_MAX)
POSITIVE_COUNTS = st.integers(min_value=1, max_value=INT32_MAX)


def _keeps_its_spelling(number: float) -> bool:
    # The API server writes a whole float64 between 2^53 and 1e21 without exponent, e.g.
    # 3.998981580690422e16 as 39989815806904220, which Python then reads as a different int.
    # Same float64, different JSON number: not something the schema can prevent.
    return not (number.is_integer() and 2**53 <= abs(number) < 1e21)


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False).filter(_keeps_its_spelling)
    | TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=12,
)
JSON_OBJECTS = st.dictionaries(TEXT, JSON_VALUES, max_size=4)


def model(cls: type[ModelT], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[ModelT]:
    """Instances of cls with fields drawn from the strategies, passed by their Python names.

    NB: st.builds() would also fill in the camelCase aliases of pydantic's signature.
    """
    return st.fixed_dictionaries(fields).map(lambda values: cls(**values))


def _positive(text: str) -> bool:
    return parse_duration(text) > timedelta(0)


DURATIONS = (
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=5000),
            st.sampled_from(["", ".5", ".25"]),
            st.sampled_from(["ns", "us", "ms", "s", "m", "h"]),
        ),
        min_size=1,
        max_size=3,
    )
    .map(lambda parts: "".join(f"{number}{fraction}{unit}" for number, fraction, unit in parts))
    .filter(_positive)
)

BACKOFFS = model(
    Backoff,
    factor=st.floats(min_value=1, max_value=1e6, allow_nan=False, allow_infinity=False),
    max_seconds=st.none() | POSITIVE_COUNTS,
)
CONCURRENCY_RULES = model(
    ConcurrencyRule,
    expression=NON_EMPTY_TEXT,
    max_runs=POSITIVE_COUNTS,
    strategy=st.sampled_from(ConcurrencyStrategy),
)
TASK_RATE_LIMITS = model(TaskRateLimit, key=OBJECT_NAMES, units=POSITIVE_COUNTS) | model(
    TaskRateLimit,
    dynamic_key=NON_EMPTY_TEXT,
    units=POSITIVE_COUNTS,
    limit=POSITIVE_COUNTS,
    duration=st.sampled_from(RateLimitDuration),
)


@st.composite
def desired_worker_labels(draw: st.DrawFn) -> DesiredWorkerLabel:
    comparator = draw(st.sampled_from(WorkerLabelComparator))
    integers = st.integers(min_value=-(10**17), max_value=10**17).map(str)
    return DesiredWorkerLabel(
        key=draw(NON_EMPTY_TEXT),
        value=draw(integers if comparator.orders else TEXT),
        comparator=comparator,
        required=draw(st.booleans()),
        weight=draw(COUNTS),
    )


TASK_SPECS = model(
    TaskSpec,
    retries=COUNTS,
    backoff=st.none() | BACKOFFS,
    schedule_timeout=DURATIONS,
    execution_timeout=DURATIONS,
    default_priority=st.integers(min_value=1, max_value=3),
    concurrency=st.lists(CONCURRENCY_RULES, max_size=3),
    rate_limits=st.lists(TASK_RATE_LIMITS, max_size=3),
    worker_affinity=st.lists(desired_worker_labels(), max_size=3),
)
TASK_RUN_SPECS = model(
    TaskRunSpec,
    task=OBJECT_NAMES,
    input=JSON_OBJECTS,
    priority=st.none() | st.integers(min_value=1, max_value=3),
    run_at=st.none() | TIMESTAMPS,
    metadata=st.dictionaries(TEXT, TEXT, max_size=4),
    cancel=st.booleans(),
)
RATE_LIMIT_SPECS = model(
    RateLimitSpec, limit=POSITIVE_COUNTS, duration=st.sampled_from(RateLimitDuration)
)

CONDITIONS = st.lists(
    model(
        Condition,
        type=PASCAL_CASE,
        status=st.sampled_from(ConditionStatus),
        reason=PASCAL_CASE,
        message=TEXT,
        last_transition_time=TIMESTAMPS,
        observed_generation=st.none() | st.integers(min_value=0, max_value=INT64_MAX),
    ),
    max_size=3,
    unique_by=lambda condition: condition.type,
)
TASK_STATUSES = model(TaskStatus, workers=COUNTS, conditions=CONDITIONS)
TASK_RUN_STATUSES = model(
    TaskRunStatus,
    phase=st.sampled_from(TaskRunPhase),
    attempt=COUNTS,
    requeues=COUNTS,
    worker=st.none() | TEXT,
    node=st.none() | TEXT,
    output=JSON_VALUES,
    error=st.none()
    | model(TaskRunError, message=TEXT, type=st.none() | TEXT, retryable=st.booleans()),
    reason=st.none() | st.sampled_from(TaskRunReason).map(str) | PASCAL_CASE,
    message=st.none() | TEXT,
    queued_at=st.none() | TIMESTAMPS,
    started_at=st.none() | TIMESTAMPS,
    finished_at=st.none() | TIMESTAMPS,
    deadline=st.none() | TIMESTAMPS,
    not_before=st.none() | TIMESTAMPS,
    slot_released=st.booleans(),
    logs=st.lists(TEXT, max_size=5),
    conditions=CONDITIONS,
    observed_generation=st.none() | st.integers(min_value=0, max_value=INT64_MAX),
)
RATE_LIMIT_STATUSES = model(
    RateLimitStatus,
    window_start=st.none() | TIMESTAMPS,
    used=COUNTS,
    remaining=st.none() | COUNTS,
)

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_stored_unchanged(
    kube_api: client.ApiClient, namespace: str, resource: Task | TaskRun | RateLimit
) -> None:
    """Create resource, write its status, read it back: the model must not have changed."""
    stored = create(kube_api, namespace, resource)
    assert type(resource).from_manifest(stored).spec == resource.spec

    replace_status(kube_api, namespace, resource, stored)

    read_back = type(resource).from_manifest(
        read(kube_api, namespace, resource.kind, stored["metadata"]["name"])
    )
    assert read_back.spec == resource.spec
    assert read_back.status == resource.status


@pytest.mark.timeout(600)
@PROPERTY_SETTINGS
@given(spec=TASK_SPECS, status=TASK_STATUSES, labels=LABELS)
def test_any_task_the_models_accept_is_stored_unchanged(
    kube_api: client.ApiClient,
    namespace: str,
    spec: TaskSpec,
    status: TaskStatus,
    labels: dict[str, str],
) -> None:
    metadata = ObjectMeta(name=unique_name("task"), labels=labels)
    task = Task(metadata=metadata, spec=spec, status=status)

    assert_stored_unchanged(kube_api, namespace, task)
    stored = Task.from_manifest(read(kube_api, namespace, "Task", metadata.name or ""))
    assert stored.metadata.labels == labels


@pytest.mark.timeout(600)
@PROPERTY_SETTINGS
@given(spec=TASK_RUN_SPECS, status=TASK_RUN_STATUSES)
def test_any_task_run_the_models_accept_is_stored_unchanged(
    kube_api: client.ApiClient, namespace: str, spec: TaskRunSpec, status: TaskRunStatus
) -> None:
    task_run = TaskRun(metadata=ObjectMeta(name=unique_name("run")), spec=spec, status=status)

    assert_stored_unchanged(kube_api, namespace, task_run)


@pytest.mark.timeout(600)
@PROPERTY_SETTINGS
@given(spec=RATE_LIMIT_SPECS, status=RATE_LIMIT_STATUSES)
def test_any_rate_limit_the_models_accept_is_stored_unchanged(
    kube_api: client.ApiClient, namespace: str, spec: RateLimitSpec, status: RateLimitStatus
) -> None:
    limit = RateLimit(metadata=ObjectMeta(name=unique_name("limit")), spec=spec, status=status)

    assert_stored_unchanged(kube_api, namespace, limit)


# --- (d) kubectl shows the columns users look for -------------------------------------------------

TASK_COLUMNS = ["NAME", "RETRIES", "TIMEOUT", "WORKERS", "AGE"]
TASK_RUN_COLUMNS = ["NAME", "TASK", "PHASE", "ATTEMPT", "WORKER", "AGE"]
RATE_LIMIT_COLUMNS = ["NAME", "LIMIT", "DURATION", "REMAINING", "AGE"]


def headers(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines() if line.startswith("NAME")]


@pytest.fixture
def one_of_each_kind(kubectl: Any, namespace: str) -> str:
    """A namespace holding a RateLimit, a Task using it and a TaskRun of that Task."""
    kubectl("apply", "-n", namespace, "-f", str(EXAMPLES[0].parent / "rate-limit-static.yaml"))
    return namespace


@pytest.mark.timeout(60)
def test_short_names_list_every_kind_with_its_columns(kubectl: Any, one_of_each_kind: str) -> None:
    table = kubectl("get", "tk,tr,rl", "-n", one_of_each_kind).stdout

    assert headers(table) == [TASK_COLUMNS, TASK_RUN_COLUMNS, RATE_LIMIT_COLUMNS]


@pytest.mark.timeout(60)
def test_category_lists_every_kind(kubectl: Any, one_of_each_kind: str) -> None:
    table = kubectl("get", "kubetask", "-n", one_of_each_kind).stdout

    assert sorted(headers(table)) == sorted([TASK_COLUMNS, TASK_RUN_COLUMNS, RATE_LIMIT_COLUMNS])
    assert "resize-rate-limited" in table
    assert "image-api" in table


@pytest.mark.timeout(60)
def test_wide_output_adds_the_reason_of_a_run(kubectl: Any, one_of_each_kind: str) -> None:
    table = kubectl("get", "tr", "-o", "wide", "-n", one_of_each_kind).stdout

    assert headers(table) == [[*TASK_RUN_COLUMNS, "REASON"]]


@pytest.mark.timeout(60)
def test_columns_show_spec_values(kubectl: Any, one_of_each_kind: str) -> None:
    tasks = kubectl("get", "tk", "-n", one_of_each_kind, "--no-headers").stdout.split()
    limits = kubectl("get", "rl", "-n", one_of_each_kind, "--no-headers").stdout.split()

    # The Task's defaults are filled in by the server: no retries, a 60s execution timeout.
    assert tasks[:3] == ["resize", "0", "60s"]
    assert limits[:3] == ["image-api", "100", "minute"]


@pytest.mark.timeout(60)
def test_explain_shows_the_field_descriptions(kubectl: Any) -> None:
    # NB: the API server publishes a new CRD's OpenAPI a moment after the CRD is established.
    for _ in range(20):
        explained = kubectl("explain", "taskrun.spec.cancel", check=False)
        if explained.returncode == 0:
            break
        time.sleep(0.5)

    assert "cannot be set back to false" in " ".join(explained.stdout.split()), explained.stderr


# --- selectable fields ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_runs_can_be_selected_by_task_worker_and_phase(
    kubectl: Any, kube_api: client.ApiClient, namespace: str
) -> None:
    for name, task_name in [("resize-a", "resize"), ("embed-a", "embed")]:
        run_of_task = TaskRun(metadata=ObjectMeta(name=name), spec=TaskRunSpec(task=task_name))
        create(kube_api, namespace, run_of_task)
    stored = read(kube_api, namespace, "TaskRun", "embed-a")
    running = TaskRun.from_manifest(stored).model_copy(
        update={"status": TaskRunStatus(phase=TaskRunPhase.RUNNING, worker="images-0", attempt=1)}
    )
    replace_status(kube_api, namespace, running, stored)

    def names(selector: str) -> list[str]:
        listed = kubectl(
            "get", "tr", "-n", namespace, "--field-selector", selector, "-o", "name"
        ).stdout
        return sorted(line.rsplit("/", 1)[-1] for line in listed.split())

    assert names("spec.task=resize") == ["resize-a"]
    assert names("status.worker=images-0") == ["embed-a"]
    assert names("status.phase=Running") == ["embed-a"]
    assert names("status.phase!=Running") == ["resize-a"]
