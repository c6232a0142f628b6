"""The CRDs generated from kubetask.api: up to date in crds/, structural, saying what models say.

The CEL rules are also run here, with the `cel` package, so that a rule that disagrees with its
pydantic twin is caught without a cluster; the API server's own verdict is in
tests/integration/test_api_schema.py.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cel
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from kubetask.api import (
    DesiredWorkerLabel,
    RateLimit,
    Task,
    TaskRateLimit,
    TaskRun,
    TaskRunSpec,
    TaskSpec,
    WorkerLabelComparator,
)
from kubetask.api.crd import (
    crd_files,
    custom_resource_definitions,
    structural,
    write_crds,
)

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
EXAMPLES = REPO / "examples"
REGENERATE = "run `python -m kubetask.api.crd crds/` and commit the result"


def crd_of(kind: str) -> dict[str, Any]:
    (crd,) = [c for c in custom_resource_definitions() if c["spec"]["names"]["kind"] == kind]
    return crd


def version_of(kind: str) -> dict[str, Any]:
    (version,) = crd_of(kind)["spec"]["versions"]
    return version


def schema_of(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = version_of(kind)["schema"]["openAPIV3Schema"]
    return schema


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, e.g. ``.spec.rateLimits[].key``."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server's structural defaulting does to value: missing fields get defaults."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        value = {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def rules_at(kind: str, path: str) -> list[dict[str, Any]]:
    nodes = dict(walk(schema_of(kind)))
    rules: list[dict[str, Any]] = nodes[path]["x-kubernetes-validations"]
    return rules


def failing_rules(rules: list[dict[str, Any]], new: Any, old: Any = None) -> list[str]:
    """The messages of the rules that reject new (with old as the stored object, for updates)."""
    failed = []
    for rule in rules:
        context = {"self": new} if old is None else {"self": new, "oldSelf": old}
        if "oldSelf" in rule["rule"] and old is None:
            continue
        if cel.evaluate(rule["rule"], context) is not True:
            failed.append(rule["message"])
    return failed


# --- up to date -----------------------------------------------------------------------------------


def test_crds_directory_holds_exactly_what_the_models_generate() -> None:
    expected = crd_files()
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in CRDS.glob("*.yaml")}

    assert sorted(on_disk) == sorted(expected), REGENERATE
    for name, text in expected.items():
        assert on_disk[name] == text, f"crds/{name} is out of date: {REGENERATE}"


def test_module_entry_point_writes_one_file_per_kind(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "kubetask.api.crd", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )

    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == sorted(crd_files())
    assert len(completed.stdout.splitlines()) == 3


def test_write_crds_returns_the_files_it_wrote(tmp_path: Path) -> None:
    paths = write_crds(tmp_path)

    assert {path.name: path.read_text() for path in paths} == crd_files()


# --- structural -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Task", "TaskRun", "RateLimit"])
def test_schema_is_structural(kind: str) -> None:
    for path, node in walk(schema_of(kind)):
        forbidden = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "const"} & set(
            node
        )
        assert not forbidden, f"{kind}{path} has {forbidden}"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") is True, (
            f"{kind}{path} has neither a type nor x-kubernetes-preserve-unknown-fields"
        )
        assert not ("properties" in node and "additionalProperties" in node), f"{kind}{path}"
        assert node.get("type") != "null", f"{kind}{path}"


@pytest.mark.parametrize("kind", ["Task", "TaskRun", "RateLimit"])
def test_bounds_survive_the_servers_float64(kind: str) -> None:
    # The API server keeps minimum and maximum as float64 and refuses an integer bound that
    # float64 rounds, such as 2^63 - 1.
    for path, node in walk(schema_of(kind)):
        for bound in ("minimum", "maximum"):
            if bound in node and node.get("type") == "integer":
                assert float(node[bound]) == node[bound], f"{kind}{path} {bound}"


@pytest.mark.parametrize("kind", ["Task", "TaskRun", "RateLimit"])
def test_every_field_tells_users_what_it_is(kind: str) -> None:
    for path, node in walk(schema_of(kind)):
        # Items of lists and maps are described by the field holding them.
        if path in (".metadata",) or (path.endswith(("[]", "{}")) and "properties" not in node):
            continue
        assert node.get("description"), f"{kind}{path} has no description for kubectl explain"
        assert "``" not in node["description"], f"{kind}{path} has markup users would see"


@pytest.mark.parametrize("kind", ["Task", "TaskRun", "RateLimit"])
def test_rules_name_fields_that_exist(kind: str) -> None:
    nodes = dict(walk(schema_of(kind)))
    for path, node in nodes.items():
        for rule in node.get("x-kubernetes-validations", []):
            assert set(rule) <= {"rule", "message", "fieldPath", "reason"}
            assert rule["message"]
            if "fieldPath" in rule:
                assert f"{path}{rule['fieldPath']}" in nodes, rule


def test_structural_refuses_unions_a_crd_cannot_express() -> None:
    with pytest.raises(ValueError, match="Optional unions"):
        structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})


def test_structural_refuses_recursive_models() -> None:
    definitions = {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}}

    with pytest.raises(ValueError, match="refers to itself"):
        structural({"$ref": "#/$defs/Node"}, definitions)


def test_structural_unwraps_optional_and_keeps_the_field_description() -> None:
    definitions = {"Backoff": {"type": "object", "description": "class doc", "title": "Backoff"}}
    field = {"anyOf": [{"$ref": "#/$defs/Backoff"}, {"type": "null"}], "default": None}

    assert structural({**field, "description": "field doc"}, definitions) == {
        "description": "field doc",
        "type": "object",
    }


def test_structural_writes_exclusive_bounds_the_openapi_v3_way() -> None:
    assert structural({"type": "number", "exclusiveMinimum": 0}, {}) == {
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
    }


# --- what the CRDs say ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "plural", "short_name"),
    [("Task", "tasks", "tk"), ("TaskRun", "taskruns", "tr"), ("RateLimit", "ratelimits", "rl")],
)
def test_names_short_names_and_category(kind: str, plural: str, short_name: str) -> None:
    crd = crd_of(kind)

    assert crd["metadata"]["name"] == f"{plural}.kubetask.io"
    assert crd["spec"]["group"] == "kubetask.io"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == [short_name]
    assert crd["spec"]["names"]["categories"] == ["kubetask"]
    assert version_of(kind)["name"] == "v1alpha1"
    assert version_of(kind)["subresources"] == {"status": {}}


@pytest.mark.parametrize(
    ("kind", "columns", "wide"),
    [
        ("Task", ["Retries", "Timeout", "Workers", "Age"], []),
        ("TaskRun", ["Task", "Phase", "Attempt", "Worker", "Age"], ["Reason"]),
        ("RateLimit", ["Limit", "Duration", "Remaining", "Age"], []),
    ],
)
def test_printer_columns(kind: str, columns: list[str], wide: list[str]) -> None:
    printed = version_of(kind)["additionalPrinterColumns"]

    assert [c["name"] for c in printed if not c.get("priority")] == columns
    assert [c["name"] for c in printed if c.get("priority") == 1] == wide


def test_task_run_fields_clients_select_on() -> None:
    selectable = [field["jsonPath"] for field in version_of("TaskRun")["selectableFields"]]

    assert selectable == [".spec.task", ".status.worker", ".status.phase"]


def test_enums_defaults_and_bounds_reach_the_schema() -> None:
    nodes = dict(walk(schema_of("Task")))

    assert nodes[".spec.concurrency[].strategy"]["enum"] == [
        "GroupRoundRobin",
        "CancelInProgress",
        "CancelNewest",
    ]
    assert nodes[".spec.concurrency[].strategy"]["default"] == "GroupRoundRobin"
    assert nodes[".spec.executionTimeout"]["default"] == "60s"
    assert nodes[".spec.executionTimeout"]["pattern"]
    assert nodes[".spec.defaultPriority"] | {"description": ""} == {
        "description": "",
        "type": "integer",
        "default": 1,
        "minimum": 1,
        "maximum": 3,
    }
    assert nodes[".spec.backoff.factor"]["minimum"] == 1
    assert dict(walk(schema_of("TaskRun")))[".status.logs"]["maxItems"] == 1000
    assert dict(walk(schema_of("TaskRun")))[".spec.runAt"]["format"] == "date-time"
    assert "default" not in dict(walk(schema_of("TaskRun")))[".spec.priority"]


def test_free_form_json_is_kept_by_the_server() -> None:
    nodes = dict(walk(schema_of("TaskRun")))

    assert nodes[".spec.input"]["x-kubernetes-preserve-unknown-fields"] is True
    assert nodes[".spec.input"]["type"] == "object"
    assert nodes[".status.output"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "type" not in nodes[".status.output"]


# --- defaults: the server fills in what pydantic fills in -----------------------------------------

MODELS: dict[str, type[Task] | type[TaskRun] | type[RateLimit]] = {
    "Task": Task,
    "TaskRun": TaskRun,
    "RateLimit": RateLimit,
}


def example_documents() -> list[dict[str, Any]]:
    return [
        document
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
    ]


@pytest.mark.parametrize("document", example_documents(), ids=lambda d: d["metadata"]["name"])
def test_server_defaults_equal_model_defaults_for_every_example(document: dict[str, Any]) -> None:
    kind = document["kind"]
    schema = schema_of(kind)

    defaulted = apply_defaults(schema, {"spec": document.get("spec")} if "spec" in document else {})

    assert defaulted["spec"] == MODELS[kind].from_manifest(document).to_manifest()["spec"]


@pytest.mark.parametrize("model", [TaskSpec, TaskRunSpec])
def test_every_model_default_is_a_schema_default(model: type[BaseModel]) -> None:
    kind = {TaskSpec: "Task", TaskRunSpec: "TaskRun"}[model]
    properties = schema_of(kind)["properties"]["spec"]["properties"]

    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        alias = field.alias or name
        if default is None:
            assert "default" not in properties[alias], alias
        else:
            assert properties[alias]["default"] == default, alias


# --- CEL rules agree with the pydantic validators -------------------------------------------------

RATE_LIMIT_FIELDS = {
    "key": "image-api",
    "dynamicKey": "input.userId",
    "limit": 10,
    "duration": "hour",
}


@pytest.mark.parametrize(
    "present",
    [
        combination
        for size in range(len(RATE_LIMIT_FIELDS) + 1)
        for combination in itertools.combinations(RATE_LIMIT_FIELDS, size)
    ],
    ids=lambda present: "+".join(present) or "nothing",
)
def test_rate_limit_rules_accept_exactly_what_pydantic_accepts(present: tuple[str, ...]) -> None:
    item = {"units": 1, **{name: RATE_LIMIT_FIELDS[name] for name in present}}
    try:
        TaskRateLimit.model_validate(item)
        pydantic_accepts = True
    except ValidationError:
        pydantic_accepts = False

    failed = failing_rules(rules_at("Task", ".spec.rateLimits[]"), item)

    assert (not failed) == pydantic_accepts, failed


@pytest.mark.parametrize("comparator", list(WorkerLabelComparator))
@pytest.mark.parametrize("value", ["16", "-3", "a100", "1.5", "", "+3", "1" * 18, "1" * 19, "x16"])
def test_worker_label_rule_accepts_exactly_what_pydantic_accepts(
    comparator: WorkerLabelComparator, value: str
) -> None:
    item = {"key": "memoryGb", "value": value, "comparator": comparator.value}
    try:
        DesiredWorkerLabel.model_validate(item)
        pydantic_accepts = True
    except ValidationError:
        pydantic_accepts = False

    failed = failing_rules(rules_at("Task", ".spec.workerAffinity[]"), item)

    assert (not failed) == pydantic_accepts, failed


@pytest.mark.parametrize(("value", "positive"), [("5m", True), ("0s", False), ("0h0m10s", True)])
def test_duration_rule_refuses_zero(value: str, positive: bool) -> None:
    failed = failing_rules(rules_at("Task", ".spec.executionTimeout"), value)

    assert (not failed) == positive


STORED_RUN = {
    "task": "resize",
    "input": {"image": "a.png", "sizes": [1, 2]},
    "priority": 2,
    "runAt": "2030-01-01T00:00:00Z",
    "metadata": {"team": "media"},
    "cancel": False,
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"task": "embed"}, "spec.task"),
        ({"input": {"image": "b.png", "sizes": [1, 2]}}, "spec.input"),
        ({"input": {"image": "a.png", "sizes": [1, 2, 3]}}, "spec.input"),
        ({"priority": 3}, "spec.priority"),
        ({"priority": None}, "spec.priority"),
        ({"runAt": "2031-01-01T00:00:00Z"}, "spec.runAt"),
        ({"runAt": None}, "spec.runAt"),
        ({"metadata": {"team": "search"}}, "spec.metadata"),
        ({"metadata": {}}, "spec.metadata"),
    ],
)
def test_task_run_spec_cannot_change_after_creation(change: dict[str, Any], field: str) -> None:
    new = {k: v for k, v in {**STORED_RUN, **change}.items() if v is not None}

    failed = failing_rules(rules_at("TaskRun", ".spec"), new, STORED_RUN)

    assert len(failed) == 1
    assert failed[0].startswith(field)


def test_optional_task_run_fields_cannot_be_added_later() -> None:
    stored = {k: v for k, v in STORED_RUN.items() if k not in ("priority", "runAt")}

    failed = failing_rules(rules_at("TaskRun", ".spec"), STORED_RUN, stored)

    assert [message.split()[0] for message in failed] == ["spec.priority", "spec.runAt"]


def test_task_run_may_be_cancelled_but_not_uncancelled() -> None:
    rules = rules_at("TaskRun", ".spec")
    cancelled = {**STORED_RUN, "cancel": True}

    assert failing_rules(rules, cancelled, STORED_RUN) == []
    assert failing_rules(rules, STORED_RUN, STORED_RUN) == []
    (message,) = failing_rules(rules, STORED_RUN, cancelled)
    assert message.startswith("spec.cancel")


def test_the_helm_chart_carries_the_generated_crds() -> None:
    chart = Path(__file__).resolve().parents[2] / "charts" / "kubetask" / "crds"
    generated = Path(__file__).resolve().parents[2] / "crds"
    names = sorted(p.name for p in generated.glob("*.yaml"))
    assert names == sorted(p.name for p in chart.glob("*.yaml"))
    for name in names:
        assert (chart / name).read_text() == (generated / name).read_text(), (
            f"charts/kubetask/crds/{name} is stale; run `make crds`"
        )
