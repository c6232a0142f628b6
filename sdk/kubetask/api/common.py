"""What every kubetask kind shares: the API group, object metadata, conditions, timestamps.

The models here and in the per-kind modules are the one definition of the kubetask API: the CRDs
under ``crds/`` are generated from them by :mod:`kubetask.api.crd`, so a constraint written here is
enforced both in Python and by the API server.
"""

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

GROUP: Final = "kubetask.io"
VERSION: Final = "v1alpha1"
# GROUP/VERSION spelt out, so that the type checker knows the literal that apiVersion must be.
API_VERSION: Final = "kubetask.io/v1alpha1"

# Counters and limits are int32 on the wire, as Kubernetes' API conventions ask; the bound also
# keeps a Python int too large for the API server from ever leaving the SDK.
INT32_MAX = 2**31 - 1
# Generations are int64, the largest integer the API server reads.
INT64_MAX = 2**63 - 1

# The name of an object in the namespace (RFC 1123 subdomain), e.g. the RateLimit a task names.
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
OBJECT_NAME_MAX_LENGTH = 253

# Machine-readable reasons and condition types are single PascalCase words, e.g. WorkerLost.
PASCAL_CASE_PATTERN = r"^[A-Z][A-Za-z0-9]*$"


def cel_rule(
    rule: str,
    message: str,
    *,
    field_path: str | None = None,
    reason: str | None = None,
) -> JsonDict:
    """One entry of ``x-kubernetes-validations``: a CEL rule the API server checks.

    ``field_path`` (relative to the object the rule sits on, e.g. ``.limit``) makes the server's
    error name that field instead of the object; ``reason`` picks the error kind users see
    (``FieldValueRequired``, ``FieldValueForbidden``, ...; the server's default is
    ``FieldValueInvalid``).
    """
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


class SpecModel(BaseModel):
    """A part of a spec: camelCase on the wire, snake_case in Python, unknown fields refused.

    Refusing unknown fields catches a misspelt field in Python just as the API server's strict field
    validation does for ``kubectl apply``.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class StatusModel(BaseModel):
    """A part of a status: written by the operator, read by everyone.

    Unknown fields are ignored so that a client keeps reading the status of a newer operator.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def _fits_int64(value: int) -> int:
    if value > INT64_MAX:
        raise ValueError(f"{value} is larger than the API server can store (2^63 - 1)")
    return value


Generation = Annotated[
    int,
    # NB: not le=INT64_MAX: the API server reads schema bounds as float64, which rounds 2^63 - 1 up
    # to a bound it then refuses. format: int64 says the same thing exactly.
    Field(ge=0, json_schema_extra={"format": "int64"}),
    AfterValidator(_fits_int64),
]
"""A metadata.generation value."""


def _in_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


Timestamp = Annotated[AwareDatetime, AfterValidator(_in_utc)]
"""A moment in time: timezone-aware, kept in UTC, written as RFC 3339 ending in ``Z``."""


class ConditionStatus(StrEnum):
    """Whether a condition holds, as in every Kubernetes condition."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """One aspect of an object's state, in the shape every Kubernetes condition has."""

    type: str = Field(
        pattern=PASCAL_CASE_PATTERN,
        max_length=316,
        description="Which aspect this condition describes, in PascalCase, e.g. Ready.",
    )
    status: ConditionStatus = Field(
        description="Whether the condition holds: True, False or Unknown."
    )
    reason: str = Field(
        pattern=PASCAL_CASE_PATTERN,
        max_length=1024,
        description="Why the condition last changed, in PascalCase, for programs to match on.",
    )
    message: str = Field(
        max_length=32768,
        description="Why the condition last changed, in words for people; may be empty.",
    )
    last_transition_time: Timestamp = Field(
        description="When status last changed from one value to another.",
    )
    observed_generation: Generation | None = Field(
        default=None,
        description="The metadata.generation the condition was computed from.",
    )


def _one_per_type(conditions: list[Condition]) -> list[Condition]:
    seen: set[str] = set()
    for condition in conditions:
        if condition.type in seen:
            raise ValueError(f"conditions has type {condition.type!r} twice; keep one per type")
        seen.add(condition.type)
    return conditions


Conditions = Annotated[
    list[Condition],
    Field(
        max_length=32,
        json_schema_extra={
            # A map keyed by type: server-side apply merges conditions one type at a time.
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    ),
    AfterValidator(_one_per_type),
]
"""The conditions of an object, at most one per type."""


# The rules the API server applies to every object's metadata, so that a manifest built in Python
# is not refused for its name or labels.
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_OBJECT_NAME = re.compile(OBJECT_NAME_PATTERN)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_VALUE_MAX_LENGTH = 63
_ANNOTATIONS_MAX_BYTES = 256 * 1024
# The API server appends five random characters to generateName.
_GENERATED_SUFFIX_LENGTH = 5


def _is_qualified_name(key: str) -> bool:
    """A label or annotation key: an optional DNS subdomain prefix and "/", then a short name."""
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > OBJECT_NAME_MAX_LENGTH or not _OBJECT_NAME.fullmatch(prefix)):
        return False
    return len(name) <= _LABEL_VALUE_MAX_LENGTH and bool(_LABEL_NAME.fullmatch(name))


def _valid_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not _is_qualified_name(key):
            raise ValueError(f"label key {key!r} is not a qualified name such as example.com/team")
        if len(value) > _LABEL_VALUE_MAX_LENGTH or not _LABEL_VALUE.fullmatch(value):
            raise ValueError(
                f"label {key}={value!r}: values are at most 63 letters, digits, '-', '_' or '.', "
                "beginning and ending with a letter or digit"
            )
    return labels


def _valid_annotations(annotations: dict[str, str]) -> dict[str, str]:
    for key in annotations:
        if not _is_qualified_name(key):
            raise ValueError(
                f"annotation key {key!r} is not a qualified name such as example.com/a"
            )
    size = sum(len(key.encode()) + len(value.encode()) for key, value in annotations.items())
    if size > _ANNOTATIONS_MAX_BYTES:
        raise ValueError(f"annotations take {size} bytes; the API server allows 256 KiB")
    return annotations


class ObjectMeta(BaseModel):
    """The part of Kubernetes' object metadata kubetask reads; every other field is kept as is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = Field(
        default=None,
        pattern=OBJECT_NAME_PATTERN,
        max_length=OBJECT_NAME_MAX_LENGTH,
        description="The object's name in its namespace: lower case letters, digits, '-' and '.'.",
    )
    generate_name: str | None = Field(
        default=None,
        max_length=OBJECT_NAME_MAX_LENGTH - _GENERATED_SUFFIX_LENGTH,
        description="A prefix from which the API server makes a unique name when name is not set.",
    )
    namespace: str | None = Field(
        default=None,
        pattern=NAMESPACE_PATTERN,
        max_length=63,
        description="The namespace the object lives in.",
    )
    labels: Annotated[dict[str, str], AfterValidator(_valid_labels)] = Field(
        default_factory=dict,
        description="Labels for selecting.",
    )
    annotations: Annotated[dict[str, str], AfterValidator(_valid_annotations)] = Field(
        default_factory=dict,
        description="Free-form annotations.",
    )
    resource_version: str | None = Field(
        default=None, description="Version for optimistic locking."
    )
    uid: str | None = Field(default=None, description="The object's unique id, set by the server.")
    generation: int | None = Field(
        default=None,
        description="Counts changes to the spec; set by the server.",
    )
    creation_timestamp: Timestamp | None = Field(
        default=None,
        description="When the object was created; set by the server.",
    )

    @model_validator(mode="after")
    def _named(self) -> Self:
        if self.name is None and self.generate_name is None:
            raise ValueError("metadata needs name or generateName")
        # A stand-in for the random suffix: the name the server makes must be a valid name.
        if self.generate_name is not None and not _OBJECT_NAME.fullmatch(f"{self.generate_name}x"):
            raise ValueError(
                f"generateName {self.generate_name!r} does not start a valid name: use lower case "
                "letters, digits, '-' and '.', beginning with a letter or digit"
            )
        return self


class Resource(BaseModel):
    """A kubetask object as a whole: apiVersion, kind, metadata, spec and status.

    Subclasses fix ``kind`` and add ``spec`` and ``status``.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    plural: ClassVar[str]
    """The resource name in API paths, e.g. ``taskruns`` in /apis/kubetask.io/v1alpha1/..."""

    api_version: Literal["kubetask.io/v1alpha1"] = Field(
        default=API_VERSION,
        description="The API group and version of kubetask objects.",
    )
    metadata: ObjectMeta = Field(description="Standard Kubernetes object metadata.")

    def to_manifest(self) -> dict[str, Any]:
        """The object as the Kubernetes API takes it: camelCase keys, unset fields left out.

        A status that holds only defaults is left out too: it says nothing, and the API server
        ignores status on create anyway.
        """
        manifest = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        status = getattr(self, "status", None)
        if isinstance(status, BaseModel) and status == type(status)():
            manifest.pop("status", None)
        return manifest

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Self:
        """Read an object as the Kubernetes API returns it (or as a user wrote it)."""
        return cls.model_validate(manifest)
