"""The RateLimit kind: a named budget of units per window, shared by every task that names it."""

from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field

from kubetask.api.common import INT32_MAX, Resource, SpecModel, StatusModel, Timestamp


class RateLimitDuration(StrEnum):
    """The length of a rate limit window. Windows are fixed: a new one starts when the last ends."""

    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


class RateLimitSpec(SpecModel):
    """How many units the tasks naming this rate limit may consume per window, together."""

    limit: int = Field(
        ge=1,
        le=INT32_MAX,
        description="Units that may be consumed per window, summed over all tasks using it.",
    )
    duration: RateLimitDuration = Field(
        description="Window length: second, minute, hour, day, week, month or year.",
    )


class RateLimitStatus(StatusModel):
    """The window state the operator keeps; it decides whether a queued run may be assigned.

    A dynamic key (a CEL expression on a Task) gets a RateLimit of its own, made by the operator
    on first use and named after a hash of the key, with the key in the annotation
    kubetask.io/dynamic-key; its window is kept here like a static limit's.
    """

    window_start: Timestamp | None = Field(
        default=None,
        description="When the current window began; unset until a unit is first consumed.",
    )
    used: int = Field(
        default=0,
        ge=0,
        le=INT32_MAX,
        description="Units consumed in the current window.",
    )
    remaining: int | None = Field(
        default=None,
        ge=0,
        le=INT32_MAX,
        description="Units left in the current window (limit minus used).",
    )


class RateLimit(Resource):
    """A rate limit: at most spec.limit units per spec.duration across every task naming it."""

    plural: ClassVar[str] = "ratelimits"

    kind: Literal["RateLimit"] = Field(default="RateLimit", description="Always RateLimit.")
    spec: RateLimitSpec = Field(description="The limit and its window length.")
    status: RateLimitStatus | None = Field(
        default=None,
        description="Consumption in the current window, kept by the operator.",
    )
