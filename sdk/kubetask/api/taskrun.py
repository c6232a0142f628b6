"""The TaskRun kind: one request to run a task with an input, and what became of it."""

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field, JsonValue, WithJsonSchema

from kubetask.api.common import (
    INT32_MAX,
    OBJECT_NAME_MAX_LENGTH,
    OBJECT_NAME_PATTERN,
    PASCAL_CASE_PATTERN,
    Conditions,
    Generation,
    Resource,
    SpecModel,
    StatusModel,
    Timestamp,
    cel_rule,
)

# Hatchet keeps at most this many log lines per run.
MAX_LOG_LINES = 1000

# Bounds on run metadata; the API server needs them to estimate the cost of the rule that keeps
# metadata from changing after creation.
MAX_METADATA_ENTRIES = 64
METADATA_VALUE_MAX_LENGTH = 1024

JsonObject = Annotated[
    dict[str, JsonValue],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""Any JSON object; the API server keeps it as written."""

AnyJson = Annotated[JsonValue, WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True})]
"""Any JSON value; the API server keeps it as written."""


def _unchanged(field: str) -> JsonValue:
    """A rule refusing any change to a field the API server always fills (it has a default)."""
    return cel_rule(
        f"self.{field} == oldSelf.{field}",
        f"spec.{field} cannot change once the run exists; create a new TaskRun instead",
        field_path=f".{field}",
    )


def _unchanged_optional(field: str) -> JsonValue:
    """A rule refusing any change to an optional field, including setting or removing it later."""
    return cel_rule(
        f"has(self.{field}) == has(oldSelf.{field})"
        f" && (!has(self.{field}) || self.{field} == oldSelf.{field})",
        f"spec.{field} cannot be set, changed or removed once the run exists; "
        "create a new TaskRun instead",
        field_path=f".{field}",
    )


class TaskRunSpec(SpecModel):
    """What to run: the task, its input, and when and how urgently.

    The spec cannot change once the run exists, except that cancel may go from false to true.
    """

    model_config = ConfigDict(
        json_schema_extra={
            # Transition rules: the API server checks them on updates only, with oldSelf the
            # stored spec.
            "x-kubernetes-validations": [
                _unchanged("task"),
                _unchanged("input"),
                _unchanged_optional("priority"),
                _unchanged_optional("runAt"),
                _unchanged("metadata"),
                cel_rule(
                    "self.cancel || !oldSelf.cancel",
                    "spec.cancel cannot go back to false: a cancelled run stays cancelled",
                    field_path=".cancel",
                ),
            ]
        }
    )

    task: str = Field(
        pattern=OBJECT_NAME_PATTERN,
        max_length=OBJECT_NAME_MAX_LENGTH,
        description="Name of the task to run: the name of its Task object and of the function "
        "workers register.",
    )
    input: JsonObject = Field(
        default_factory=dict,
        description="The JSON object passed to the task function.",
    )
    priority: int | None = Field(
        default=None,
        ge=1,
        le=3,
        description="1 (low), 2 (medium) or 3 (high); the task's defaultPriority if unset.",
    )
    run_at: Timestamp | None = Field(
        default=None,
        description="Earliest time (RFC 3339) the run may be queued; now if unset.",
    )
    metadata: dict[str, Annotated[str, Field(max_length=METADATA_VALUE_MAX_LENGTH)]] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_ENTRIES,
        description="Free-form string pairs for the task and for concurrency and rate limit keys.",
    )
    cancel: bool = Field(
        default=False,
        description="Set to true to cancel the run; it cannot be set back to false.",
    )


class TaskRunPhase(StrEnum):
    """Where a run is in its life."""

    SCHEDULED = "Scheduled"
    """Waiting for runAt."""

    QUEUED = "Queued"
    """Waiting for a worker slot, a concurrency limit or a rate limit."""

    RUNNING = "Running"
    """Assigned to a worker."""

    COMPLETED = "Completed"
    """The task returned; output holds the result."""

    FAILED = "Failed"
    """The last attempt failed and no retry is left (or the error was not retryable)."""

    CANCELLED = "Cancelled"
    """Cancelled by the user, a timeout or a concurrency strategy."""

    @property
    def finished(self) -> bool:
        """Whether the run will not change phase any more."""
        return self in (TaskRunPhase.COMPLETED, TaskRunPhase.FAILED, TaskRunPhase.CANCELLED)


class TaskRunReason(StrEnum):
    """The reasons the operator writes to status.reason; other PascalCase words may follow."""

    SCHEDULED = "Scheduled"
    """The run waits for spec.runAt."""

    ASSIGNED = "Assigned"
    """The run was handed to a worker."""

    SUCCEEDED = "Succeeded"
    """The task returned."""

    RETRYING = "Retrying"
    """An attempt failed and the run waits for its next one."""

    OUTPUT_TOO_LARGE = "OutputTooLarge"
    """The task returned more than the run's status can hold."""

    SCHEDULE_TIMEOUT = "ScheduleTimeout"
    """Still queued when spec.scheduleTimeout of the task ran out: cancelled."""

    EXECUTION_TIMEOUT = "ExecutionTimeout"
    """An attempt ran longer than the task's executionTimeout: it failed, spending a retry."""

    CANCELLED = "Cancelled"
    """spec.cancel was set."""

    WORKER_LOST = "WorkerLost"
    """The worker stopped sending heartbeats; the run was re-queued without spending a retry."""

    RETRIES_EXHAUSTED = "RetriesExhausted"
    """The last attempt failed and no retry was left."""

    CONCURRENCY_CANCELLED = "ConcurrencyCancelled"
    """Cancelled by a CancelInProgress or CancelNewest concurrency rule."""

    NON_RETRYABLE = "NonRetryable"
    """The task raised an error marked as not retryable."""

    INVALID_INPUT = "InvalidInput"
    """The run cannot start as written, e.g. a key expression failed on its input."""


class TaskRunError(StatusModel):
    """The error that ended the last attempt."""

    message: str = Field(description="The error's message.")
    type: str | None = Field(
        default=None,
        description="The kind of error, e.g. the Python exception class name.",
    )
    retryable: bool = Field(
        default=True,
        description="False when the task raised an error that must not be retried.",
    )


class TaskRunStatus(StatusModel):
    """What became of the run, kept by the operator and the worker running it."""

    phase: TaskRunPhase = Field(
        default=TaskRunPhase.QUEUED,
        description=(
            "Scheduled, Queued, Running, Completed, Failed or Cancelled. A new run reads as "
            "Queued: the API server fills that in, so no write is spent on it."
        ),
    )
    attempt: int = Field(
        default=0,
        ge=0,
        le=INT32_MAX,
        description="Number of the current or last attempt, from 1; 0 before the first assignment.",
    )
    requeues: int = Field(
        default=0,
        ge=0,
        le=INT32_MAX,
        description="Times the run was re-queued because its worker was lost; spends no retry.",
    )
    worker: str | None = Field(default=None, description="Pod name of the worker running the run.")
    node: str | None = Field(default=None, description="Node of the worker running the run.")
    output: AnyJson = Field(
        default=None,
        description="What the task returned, once the phase is Completed.",
    )
    error: TaskRunError | None = Field(
        default=None,
        description="The error that ended the last failed attempt.",
    )
    reason: str | None = Field(
        default=None,
        pattern=PASCAL_CASE_PATTERN,
        max_length=1024,
        description=(
            "Why the last transition happened, for programs: e.g. ScheduleTimeout, "
            "ExecutionTimeout, Cancelled, WorkerLost, RetriesExhausted, NonRetryable."
        ),
    )
    message: str | None = Field(
        default=None,
        description="Why the last transition happened, in words for people.",
    )
    queued_at: Timestamp | None = Field(default=None, description="When the run was last queued.")
    started_at: Timestamp | None = Field(
        default=None,
        description="When the current or last attempt started.",
    )
    finished_at: Timestamp | None = Field(
        default=None,
        description="When the run reached Completed, Failed or Cancelled.",
    )
    deadline: Timestamp | None = Field(
        default=None,
        description=(
            "When the running attempt times out: its start plus the task's executionTimeout, "
            "pushed back by each refresh_timeout."
        ),
    )
    not_before: Timestamp | None = Field(
        default=None,
        description="Earliest time a re-queued run may be assigned again, after its backoff.",
    )
    slot_released: bool = Field(
        default=False,
        description=(
            "Whether the task released its worker slot early; such a run is not re-queued "
            "if its worker is lost."
        ),
    )
    logs: list[str] = Field(
        default_factory=list,
        max_length=MAX_LOG_LINES,
        description=f"Log lines of the task, the last {MAX_LOG_LINES} at most.",
    )
    conditions: Conditions = Field(
        default_factory=list,
        description="The run's conditions, one per type.",
    )
    observed_generation: Generation | None = Field(
        default=None,
        description="The metadata.generation the operator last acted on.",
    )


class TaskRun(Resource):
    """A run of a task: created to trigger it, then updated by the operator as it progresses."""

    plural: ClassVar[str] = "taskruns"

    kind: Literal["TaskRun"] = Field(default="TaskRun", description="Always TaskRun.")
    spec: TaskRunSpec = Field(description="What to run; fixed once the run exists.")
    status: TaskRunStatus = Field(
        default_factory=TaskRunStatus,
        description="What became of the run, kept by the operator and the worker running it.",
        # Defaulting `status` to an object lets the API server fill in its own defaults (phase
        # Queued, attempt 0) on every read of a new run, which has no status of its own yet.
        json_schema_extra={"default": {}},
    )
