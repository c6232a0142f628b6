"""The Task kind: how runs of one task are retried, timed out, prioritised, limited and placed."""

from datetime import timedelta
from enum import StrEnum
from typing import ClassVar, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from kubetask.api._durations import Duration
from kubetask.api.common import (
    INT32_MAX,
    OBJECT_NAME_MAX_LENGTH,
    OBJECT_NAME_PATTERN,
    Conditions,
    Resource,
    SpecModel,
    StatusModel,
    cel_rule,
)
from kubetask.api.ratelimit import RateLimitDuration

# Hatchet's cap on a retry's wait when the task sets no maxSeconds: one day.
DEFAULT_BACKOFF_MAX_SECONDS = 86400

# A CEL expression longer than this is a program, not a key.
EXPRESSION_MAX_LENGTH = 4096

# Bounds on the lists of a task spec. They are far above what a task needs; the API server needs
# them to bound the estimated cost of the CEL rules that check each item.
MAX_CONCURRENCY_RULES = 16
MAX_RATE_LIMITS = 16
MAX_DESIRED_WORKER_LABELS = 32

# An integer a worker label can be compared with; 18 digits always fit in 64 bits.
INTEGER_LABEL_PATTERN = r"^-?[0-9]{1,18}$"


class Backoff(SpecModel):
    """How long a failed run waits before its next attempt: min(maxSeconds, factor^n) seconds."""

    factor: float = Field(
        ge=1,
        allow_inf_nan=False,
        description="Base of the exponential wait: retry n waits factor^n seconds.",
    )
    max_seconds: int | None = Field(
        default=None,
        ge=1,
        le=INT32_MAX,
        description=(
            f"Longest wait in seconds, whatever n is; {DEFAULT_BACKOFF_MAX_SECONDS} if unset."
        ),
    )

    def delay(self, retry: int) -> timedelta:
        """The wait before retry number ``retry``; the first retry (the second attempt) is 1."""
        if retry < 1:
            raise ValueError(f"retries are numbered from 1, got {retry}")
        longest = self.max_seconds or DEFAULT_BACKOFF_MAX_SECONDS
        try:
            seconds = min(float(longest), self.factor**retry)
        except OverflowError:
            # factor^n beyond a float's range is certainly past the cap.
            seconds = float(longest)
        return timedelta(seconds=seconds)


class ConcurrencyStrategy(StrEnum):
    """What happens when a run arrives while its concurrency key already has maxRuns running."""

    GROUP_ROUND_ROBIN = "GroupRoundRobin"
    """The run waits; freed capacity goes round-robin across the keys that have runs waiting."""

    CANCEL_IN_PROGRESS = "CancelInProgress"
    """The oldest running run of the key is cancelled to make room for the new one."""

    CANCEL_NEWEST = "CancelNewest"
    """The new run is cancelled at once."""


class ConcurrencyRule(SpecModel):
    """A limit on runs that share a key computed from the run; a run starts when all admit it."""

    expression: str = Field(
        min_length=1,
        max_length=EXPRESSION_MAX_LENGTH,
        description=(
            "CEL expression over input and metadata giving the run's key, "
            "e.g. input.customerId or metadata.team."
        ),
    )
    max_runs: int = Field(
        ge=1,
        le=INT32_MAX,
        description="Most runs with the same key running at once.",
    )
    strategy: ConcurrencyStrategy = Field(
        default=ConcurrencyStrategy.GROUP_ROUND_ROBIN,
        description=(
            "At the limit: GroupRoundRobin queues the run, CancelInProgress cancels the oldest "
            "running run of the key, CancelNewest cancels the new run."
        ),
    )


class TaskRateLimit(SpecModel):
    """Units a run consumes from a rate limit when it is assigned to a worker.

    Either key names a RateLimit object in the namespace (a static limit shared by every task
    naming it), or dynamicKey computes the key from the run, with limit and duration given here
    (a dynamic limit shared by every task rendering the same key).
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    "has(self.key) || has(self.dynamicKey)",
                    "set key (the name of a RateLimit) or dynamicKey (a CEL expression)",
                    reason="FieldValueRequired",
                ),
                cel_rule(
                    "!has(self.key) || !has(self.dynamicKey)",
                    "dynamicKey cannot be combined with key: set only one of them",
                    field_path=".dynamicKey",
                    reason="FieldValueForbidden",
                ),
                cel_rule(
                    "!has(self.dynamicKey) || has(self.limit)",
                    "limit is required with dynamicKey",
                    field_path=".limit",
                    reason="FieldValueRequired",
                ),
                cel_rule(
                    "!has(self.dynamicKey) || has(self.duration)",
                    "duration is required with dynamicKey",
                    field_path=".duration",
                    reason="FieldValueRequired",
                ),
                cel_rule(
                    "!has(self.key) || has(self.dynamicKey) || !has(self.limit)",
                    "limit belongs to the RateLimit named by key; set it there",
                    field_path=".limit",
                    reason="FieldValueForbidden",
                ),
                cel_rule(
                    "!has(self.key) || has(self.dynamicKey) || !has(self.duration)",
                    "duration belongs to the RateLimit named by key; set it there",
                    field_path=".duration",
                    reason="FieldValueForbidden",
                ),
            ]
        }
    )

    key: str | None = Field(
        default=None,
        pattern=OBJECT_NAME_PATTERN,
        max_length=OBJECT_NAME_MAX_LENGTH,
        description="Name of a RateLimit object in the task's namespace. Excludes dynamicKey.",
    )
    dynamic_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=EXPRESSION_MAX_LENGTH,
        description=(
            "CEL expression over input and metadata giving the key, e.g. input.userId. "
            "Needs limit and duration; excludes key."
        ),
    )
    units: int = Field(
        default=1,
        ge=1,
        le=INT32_MAX,
        description="Units one run consumes when it is assigned.",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        le=INT32_MAX,
        description="With dynamicKey: units per window for each rendered key.",
    )
    duration: RateLimitDuration | None = Field(
        default=None,
        description="With dynamicKey: the window (second, minute, hour, day, week, month or year).",
    )

    @model_validator(mode="after")
    def _static_or_dynamic(self) -> Self:
        # The same rules as the CEL rules above, so that Python refuses what the server would.
        if self.key is None and self.dynamic_key is None:
            raise ValueError("set key (the name of a RateLimit) or dynamicKey (a CEL expression)")
        if self.key is not None and self.dynamic_key is not None:
            raise ValueError("dynamicKey cannot be combined with key: set only one of them")
        if self.dynamic_key is not None and (self.limit is None or self.duration is None):
            raise ValueError("limit and duration are required with dynamicKey")
        if self.key is not None and (self.limit is not None or self.duration is not None):
            raise ValueError(
                "limit and duration belong to the RateLimit named by key; set them there"
            )
        return self


class WorkerLabelComparator(StrEnum):
    """How a worker's label value is compared with the value a task asks for."""

    EQUAL = "Equal"
    NOT_EQUAL = "NotEqual"
    GREATER_THAN = "GreaterThan"
    GREATER_THAN_OR_EQUAL = "GreaterThanOrEqual"
    LESS_THAN = "LessThan"
    LESS_THAN_OR_EQUAL = "LessThanOrEqual"

    @property
    def orders(self) -> bool:
        """Whether the comparator orders values, which then must be integers."""
        return self not in (WorkerLabelComparator.EQUAL, WorkerLabelComparator.NOT_EQUAL)


_ORDERING_COMPARATORS = [c.value for c in WorkerLabelComparator if c.orders]


class DesiredWorkerLabel(SpecModel):
    """A worker label a task asks for: required ones exclude workers, the rest rank them."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    f"!(self.comparator in {_ORDERING_COMPARATORS}) "
                    f"|| self.value.matches('{INTEGER_LABEL_PATTERN}')",
                    "value must be an integer (such as 16) when comparator orders values ("
                    + ", ".join(_ORDERING_COMPARATORS)
                    + ")",
                    field_path=".value",
                )
            ]
        }
    )

    key: str = Field(
        min_length=1,
        max_length=OBJECT_NAME_MAX_LENGTH,
        description="The worker label's key, e.g. gpu or model.",
    )
    value: str = Field(
        max_length=OBJECT_NAME_MAX_LENGTH,
        description="The value to compare the worker's label with; an integer to order by.",
    )
    comparator: WorkerLabelComparator = Field(
        default=WorkerLabelComparator.EQUAL,
        description=(
            "How the worker's value compares with value: Equal, NotEqual, GreaterThan, "
            "GreaterThanOrEqual, LessThan or LessThanOrEqual (the last four on integers)."
        ),
    )
    required: bool = Field(
        default=False,
        description="Whether a worker whose label does not match is excluded, not ranked lower.",
    )
    weight: int = Field(
        default=100,
        ge=0,
        le=INT32_MAX,
        description="What a match adds when workers are ranked by the sum of matched weights.",
    )

    @model_validator(mode="after")
    def _integer_for_ordering(self) -> Self:
        if self.comparator.orders and not _is_integer_label(self.value):
            raise ValueError(
                f"value must be an integer (such as 16) when comparator is {self.comparator}, "
                f"got {self.value!r}"
            )
        return self


def _is_integer_label(value: str) -> bool:
    digits = value.removeprefix("-")
    return 1 <= len(digits) <= 18 and digits.isascii() and digits.isdigit()


class TaskSpec(SpecModel):
    """How the runs of this task are retried, timed out, prioritised, limited and placed."""

    retries: int = Field(
        default=0,
        ge=0,
        le=INT32_MAX,
        description="Attempts after the first one that a failed run gets.",
    )
    backoff: Backoff | None = Field(
        default=None,
        description="Wait before a failed run's next attempt; unset, it is re-queued at once.",
    )
    schedule_timeout: Duration = Field(
        default="5m",
        description="How long a run may stay queued before it is cancelled, e.g. 5m.",
    )
    execution_timeout: Duration = Field(
        default="60s",
        description=(
            "How long one attempt may run before it fails (spending a retry) and its worker is "
            "told to cancel, e.g. 60s."
        ),
    )
    default_priority: int = Field(
        default=1,
        ge=1,
        le=3,
        description="Priority of runs that set none: 1 (low), 2 (medium) or 3 (high).",
    )
    concurrency: list[ConcurrencyRule] = Field(
        default_factory=list,
        max_length=MAX_CONCURRENCY_RULES,
        description="Limits on runs running at once per key; a run starts only when all admit it.",
    )
    rate_limits: list[TaskRateLimit] = Field(
        default_factory=list,
        max_length=MAX_RATE_LIMITS,
        description="Rate limits a run consumes units from when it is assigned.",
    )
    worker_affinity: list[DesiredWorkerLabel] = Field(
        default_factory=list,
        max_length=MAX_DESIRED_WORKER_LABELS,
        description="Worker labels the task asks for: required ones exclude, the others rank.",
    )


class TaskStatus(StatusModel):
    """What the operator knows about the task's workers."""

    workers: int = Field(
        default=0,
        ge=0,
        le=INT32_MAX,
        description="Ready workers that serve this task.",
    )
    conditions: Conditions = Field(
        default_factory=list,
        description="The task's conditions, one per type.",
    )


class Task(Resource):
    """A task: the name workers register a function under, and how its runs are handled."""

    plural: ClassVar[str] = "tasks"

    kind: Literal["Task"] = Field(default="Task", description="Always Task.")
    spec: TaskSpec = Field(
        default_factory=TaskSpec,
        # An empty spec is complete: the API server fills in every field's default.
        json_schema_extra={"default": {}},
        description="How runs of the task are handled.",
    )
    status: TaskStatus | None = Field(
        default=None,
        description="Workers serving the task, kept by the operator.",
    )
