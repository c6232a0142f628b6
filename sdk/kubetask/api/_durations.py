"""Durations as the API spells them: Go-style strings such as ``500ms``, ``45s`` or ``1h30m``.

The API keeps timeouts as strings so that a manifest reads back exactly as it was written; code that
needs the length of a timeout converts with :func:`parse_duration` and :func:`format_duration`.
"""

import re
from datetime import timedelta
from typing import Annotated

import durationpy
from pydantic import AfterValidator, Field

from kubetask.api.common import cel_rule

# Units are the ones Go's time.ParseDuration knows, minus the non-ASCII spellings of microseconds:
# the operator and the API server both read these strings, so only the common subset is allowed.
# durationpy also knows d, w, mm and y, which the pattern keeps out for the same reason.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"

# Long enough for anything sensible ("2562047h47m16s854ms775us807ns" is Go's maximum and is 29
# characters); the bound also keeps the server's cost estimate for the CEL rule below small.
DURATION_MAX_LENGTH = 32

_DURATION = re.compile(DURATION_PATTERN)


def parse_duration(text: str) -> timedelta:
    """Read a duration such as ``500ms``, ``45s`` or ``1h30m`` into a timedelta.

    Raises ValueError (naming the text) for anything the API's pattern does not accept. Parts finer
    than a microsecond are lost, because timedelta cannot hold them.
    """
    if len(text) > DURATION_MAX_LENGTH or not _DURATION.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit (ns, us, ms, s, m, h), "
            "for example 500ms, 45s or 1h30m"
        )
    try:
        delta: timedelta = durationpy.from_str(text)
    except durationpy.DurationError as error:
        raise ValueError(f"{text!r} is not a duration: {error}") from error
    return delta


def format_duration(delta: timedelta) -> str:
    """Write a positive timedelta the way the API spells durations, e.g. ``1h30m`` or ``500ms``.

    The result is exact for whole milliseconds; durationpy writes the seconds part with six
    significant digits, so microseconds of a duration longer than a second may be rounded.
    Raises ValueError for zero or negative lengths, which no field of the API accepts.
    """
    if delta <= timedelta(0):
        raise ValueError(f"a duration must be longer than zero, got {delta}")
    text: str = durationpy.to_str(delta)

    # NB: durationpy switches to exponent notation ("1e+06h") for a million hours and more.
    if not _DURATION.fullmatch(text):
        raise ValueError(f"{delta} is too long to write as a duration")
    return text


def _longer_than_zero(text: str) -> str:
    if parse_duration(text) <= timedelta(0):
        raise ValueError(f"{text!r} must be longer than zero, for example 500ms, 45s or 1h30m")
    return text


Duration = Annotated[
    str,
    Field(
        pattern=DURATION_PATTERN,
        max_length=DURATION_MAX_LENGTH,
        json_schema_extra={
            # With the pattern already holding, a non-zero digit anywhere means a positive length.
            "x-kubernetes-validations": [
                cel_rule(
                    "self.matches('[1-9]')",
                    "must be longer than zero, for example 500ms, 45s or 1h30m",
                )
            ]
        },
    ),
    AfterValidator(_longer_than_zero),
]
"""A positive Go-style duration string, validated the same way by pydantic and the API server."""
