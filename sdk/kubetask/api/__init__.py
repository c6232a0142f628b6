"""The kubetask API: Task, TaskRun and RateLimit as pydantic models.

These models are the one definition of the API. The CRDs under ``crds/`` are generated from them
(``python -m kubetask.api.crd crds/``), so an object built and validated here is one the API server
accepts. Python attributes are snake_case; manifests use the camelCase names Kubernetes users know::

    run = TaskRun(metadata=ObjectMeta(name="resize-1"), spec=TaskRunSpec(task="resize"))
    run.to_manifest()  # {"apiVersion": "kubetask.io/v1alpha1", "kind": "TaskRun", ...}

This package imports nothing else from kubetask, so the operator, the SDK and the CLI can all
depend on it.
"""

from kubetask.api._durations import (
    DURATION_PATTERN,
    Duration,
    format_duration,
    parse_duration,
)
from kubetask.api.common import (
    API_VERSION,
    GROUP,
    VERSION,
    Condition,
    ConditionStatus,
    ObjectMeta,
    Resource,
)
from kubetask.api.ratelimit import (
    RateLimit,
    RateLimitDuration,
    RateLimitSpec,
    RateLimitStatus,
)
from kubetask.api.task import (
    DEFAULT_BACKOFF_MAX_SECONDS,
    Backoff,
    ConcurrencyRule,
    ConcurrencyStrategy,
    DesiredWorkerLabel,
    Task,
    TaskRateLimit,
    TaskSpec,
    TaskStatus,
    WorkerLabelComparator,
)
from kubetask.api.taskrun import (
    MAX_LOG_LINES,
    TaskRun,
    TaskRunError,
    TaskRunPhase,
    TaskRunReason,
    TaskRunSpec,
    TaskRunStatus,
)

__all__ = [
    "API_VERSION",
    "DEFAULT_BACKOFF_MAX_SECONDS",
    "DURATION_PATTERN",
    "GROUP",
    "MAX_LOG_LINES",
    "VERSION",
    "Backoff",
    "ConcurrencyRule",
    "ConcurrencyStrategy",
    "Condition",
    "ConditionStatus",
    "DesiredWorkerLabel",
    "Duration",
    "ObjectMeta",
    "RateLimit",
    "RateLimitDuration",
    "RateLimitSpec",
    "RateLimitStatus",
    "Resource",
    "Task",
    "TaskRateLimit",
    "TaskRun",
    "TaskRunError",
    "TaskRunPhase",
    "TaskRunReason",
    "TaskRunSpec",
    "TaskRunStatus",
    "TaskSpec",
    "TaskStatus",
    "WorkerLabelComparator",
    "format_duration",
    "parse_duration",
]
