"""Generates the CustomResourceDefinitions of kubetask from the pydantic models.

The models are the one definition of the API; this module turns their JSON schemas into the
structural OpenAPI v3 schemas the API server wants (no references, no unions, a type on every
field) and adds what only a CRD has: names, printer columns, selectable fields, the status
subresource.

    python -m kubetask.api.crd crds/      # writes one YAML file per kind into crds/
"""

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from kubetask.api.common import GROUP, VERSION, Resource
from kubetask.api.ratelimit import RateLimit
from kubetask.api.task import Task
from kubetask.api.taskrun import TaskRun

__all__ = [
    "CATEGORY",
    "KINDS",
    "PrinterColumn",
    "ResourceKind",
    "crd_files",
    "custom_resource_definition",
    "custom_resource_definitions",
    "main",
    "openapi_schema",
    "structural",
    "write_crds",
]

# `kubectl get kubetask` lists every kind in this category.
CATEGORY = "kubetask"

_HEADER = (
    "# Generated from the models in kubetask.api by `python -m kubetask.api.crd crds/`.\n"
    "# Do not edit: change the models and generate again.\n"
)


@dataclass(frozen=True)
class PrinterColumn:
    """A column of `kubectl get`; priority 1 shows it only with `-o wide`."""

    name: str
    type: str
    json_path: str
    description: str
    _: KW_ONLY
    priority: int = 0


@dataclass(frozen=True)
class ResourceKind:
    """What a CRD says about a kind beyond its schema."""

    resource: type[Resource]
    short_name: str
    columns: tuple[PrinterColumn, ...]
    selectable_fields: tuple[str, ...] = ()


_AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation.")

KINDS = (
    ResourceKind(
        Task,
        short_name="tk",
        columns=(
            PrinterColumn("Retries", "integer", ".spec.retries", "Retries a failed run gets."),
            PrinterColumn("Timeout", "string", ".spec.executionTimeout", "Execution timeout."),
            PrinterColumn("Workers", "integer", ".status.workers", "Ready workers serving it."),
            _AGE,
        ),
    ),
    ResourceKind(
        TaskRun,
        short_name="tr",
        columns=(
            PrinterColumn("Task", "string", ".spec.task", "The task this run runs."),
            PrinterColumn("Phase", "string", ".status.phase", "Where the run is in its life."),
            PrinterColumn("Attempt", "integer", ".status.attempt", "Current or last attempt."),
            PrinterColumn("Worker", "string", ".status.worker", "Worker pod running it."),
            _AGE,
            PrinterColumn(
                "Reason",
                "string",
                ".status.reason",
                "Why the last transition happened.",
                priority=1,
            ),
        ),
        # Workers and the operator watch runs of one task, one worker or one phase.
        selectable_fields=(".spec.task", ".status.worker", ".status.phase"),
    ),
    ResourceKind(
        RateLimit,
        short_name="rl",
        columns=(
            PrinterColumn("Limit", "integer", ".spec.limit", "Units per window."),
            PrinterColumn("Duration", "string", ".spec.duration", "Window length."),
            PrinterColumn("Remaining", "integer", ".status.remaining", "Units left in window."),
            _AGE,
        ),
    ),
)

# What a structural schema may say. Anything else pydantic produces stops the generator rather
# than reaching the API server, where it would be rejected or, worse, silently mean nothing.
_KEPT_KEYWORDS = (
    "description",
    "type",
    "format",
    "default",
    "enum",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
)
_DROPPED_KEYWORDS = frozenset({"title", "$defs"})


class _SchemaGenerator(GenerateJsonSchema):
    """pydantic's generator, also writing the defaults of fields that have a default factory.

    Without this, list and dict fields (``default_factory=list``) would have no default in the CRD,
    and an object read from the server would differ from the same object built in Python.
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return cast(Callable[[], Any], factory)()
        return super().get_default_value(schema)


def openapi_schema(resource: type[Resource]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one kind, as a CRD version carries it."""
    raw = resource.model_json_schema(by_alias=True, schema_generator=_SchemaGenerator)
    definitions = raw.get("$defs", {})
    properties = raw["properties"]

    # NB: the API server owns metadata's schema; a CRD may only say that it is an object.
    return {
        "description": raw["description"],
        "type": "object",
        **({"required": ["spec"]} if "spec" in raw.get("required", []) else {}),
        "properties": {
            "apiVersion": {
                "description": properties["apiVersion"]["description"],
                "type": "string",
            },
            "kind": {"description": properties["kind"]["description"], "type": "string"},
            "metadata": {"type": "object"},
            "spec": structural(properties["spec"], definitions),
            "status": structural(properties["status"], definitions),
        },
    }


def structural(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a pydantic JSON schema into a structural one: references inlined, Optional unwrapped."""
    return _structural(node, definitions, within=())


def _structural(
    node: Mapping[str, Any],
    definitions: Mapping[str, Any],
    *,
    within: tuple[str, ...],
) -> dict[str, Any]:
    """structural() for a node nested in the definitions named by ``within``."""
    node, within = _inline(node, definitions, within=within)
    result: dict[str, Any] = {}
    for keyword, value in node.items():
        if keyword in _DROPPED_KEYWORDS:
            continue
        if keyword not in _KEPT_KEYWORDS and not keyword.startswith("x-kubernetes-"):
            raise ValueError(f"the JSON schema keyword {keyword!r} has no place in a CRD schema")

        if keyword == "properties":
            result[keyword] = {
                name: _structural(sub, definitions, within=within) for name, sub in value.items()
            }
        elif keyword == "items":
            result[keyword] = _structural(value, definitions, within=within)
        elif keyword == "additionalProperties":
            # False comes from extra="forbid"; the server refuses unknown fields without being told.
            if value is not False:
                result[keyword] = _structural(value, definitions, within=within)
        elif keyword in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020 gives the bound itself; OpenAPI v3.0 a flag beside minimum/maximum.
            result[keyword.removeprefix("exclusive").lower()] = value
            result[keyword] = True
        elif keyword == "default" and value is None:
            continue
        elif keyword == "description":
            result[keyword] = _one_line_paragraphs(value)
        elif keyword == "x-kubernetes-validations":
            result[keyword] = [_ordered_rule(rule) for rule in value]
        else:
            result[keyword] = value
    return _ordered(result)


def _inline(
    node: Mapping[str, Any],
    definitions: Mapping[str, Any],
    *,
    within: tuple[str, ...],
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Replace a reference, a one-item allOf or an Optional anyOf at the top of node by its target.

    Keywords beside the reference win over the target's: a field's description is more precise than
    the docstring of its class. Validation rules of both are kept. Also returns ``within`` with the
    definitions entered on the way, so that a model containing itself is noticed.
    """
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").removeprefix("#/$defs/")
        if name in within:
            raise ValueError(f"{name} refers to itself; a CRD schema cannot be recursive")
        target, within = _inline(definitions[name], definitions, within=(*within, name))
        return _merge(target, node), within
    if "allOf" in node and len(node["allOf"]) == 1:
        (only,) = node.pop("allOf")
        target, within = _inline(only, definitions, within=within)
        return _merge(target, node), within
    if "anyOf" in node:
        options = [option for option in node.pop("anyOf") if option != {"type": "null"}]
        if len(options) != 1:
            raise ValueError(f"only Optional unions fit a CRD schema, got {options}")
        target, within = _inline(options[0], definitions, within=within)
        return _merge(target, node), within
    return node, within


def _merge(target: Mapping[str, Any], beside: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**target, **beside}
    rules = [
        *target.get("x-kubernetes-validations", []),
        *beside.get("x-kubernetes-validations", []),
    ]
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _one_line_paragraphs(text: str) -> str:
    """Docstrings wrap at 100 columns; `kubectl explain` wraps on its own, so join their lines."""
    paragraphs = text.split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


def _ordered_rule(rule: Mapping[str, Any]) -> dict[str, Any]:
    """pydantic sorts keys; a CEL rule reads better with the rule first and its message next."""
    order = ("rule", "message", "fieldPath", "reason")
    return {key: rule[key] for key in order if key in rule}


def _ordered(schema: dict[str, Any]) -> dict[str, Any]:
    """Keywords in one fixed order, so that the YAML reads the same way for every field."""
    rank = {keyword: index for index, keyword in enumerate(_KEPT_KEYWORDS)}
    return dict(sorted(schema.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def custom_resource_definition(kind: ResourceKind) -> dict[str, Any]:
    """The CRD of one kind."""
    resource = kind.resource
    name = resource.model_fields["kind"].default
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": openapi_schema(resource)},
        "subresources": {"status": {}},
        "additionalPrinterColumns": [_printer_column(column) for column in kind.columns],
    }
    if kind.selectable_fields:
        version["selectableFields"] = [{"jsonPath": path} for path in kind.selectable_fields]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{resource.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "kubetask"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": name,
                "listKind": f"{name}List",
                "plural": resource.plural,
                "singular": name.lower(),
                "shortNames": [kind.short_name],
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [version],
        },
    }


def _printer_column(column: PrinterColumn) -> dict[str, Any]:
    printed: dict[str, Any] = {
        "name": column.name,
        "type": column.type,
        "jsonPath": column.json_path,
        "description": column.description,
    }
    if column.priority:
        printed["priority"] = column.priority
    return printed


def custom_resource_definitions() -> list[dict[str, Any]]:
    """The CRDs of every kubetask kind: Task, TaskRun, RateLimit."""
    return [custom_resource_definition(kind) for kind in KINDS]


def crd_files() -> dict[str, str]:
    """The YAML text of each CRD by its file name, e.g. ``tasks.kubetask.io.yaml``."""
    return {
        f"{crd['metadata']['name']}.yaml": _HEADER
        + yaml.safe_dump(crd, sort_keys=False, width=100, allow_unicode=True)
        for crd in custom_resource_definitions()
    }


def write_crds(directory: Path) -> list[Path]:
    """Write one YAML file per CRD into directory (created if missing); returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in crd_files().items():
        path = directory / file_name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kubetask.api.crd [DIRECTORY]`` (default ``crds``)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if len(arguments) > 1:
        sys.stderr.write("usage: python -m kubetask.api.crd [DIRECTORY]\n")
        return 2
    directory = Path(arguments[0] if arguments else "crds")
    for path in write_crds(directory):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
