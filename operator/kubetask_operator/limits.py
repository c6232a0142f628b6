"""Flow control inputs: concurrency keys and rate-limit keys rendered with CEL, and fixed windows.

Expressions are evaluated by the `cel` library (common-expression-language) over `input` (the
run's input object) and `metadata` (its string map). A rendered key is the expression's value as
text: strings as they are, anything else as compact JSON, so `input.user` and `input.userId`
give readable keys.
"""

from __future__ import annotations

import calendar
import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import cel

#: Longest rendered key kept; longer ones are cut and suffixed with a hash so that they stay
#: distinct. Keys end up in status objects, so they must stay small.
MAX_KEY_LENGTH = 200


class ExpressionError(ValueError):
    """An expression does not compile, or does not evaluate for a run's input."""


@functools.lru_cache(maxsize=4096)
def compile_expression(expression: str) -> Any:
    """The compiled program; raises ExpressionError with the parser's message."""
    try:
        return cel.compile(expression)
    except (ValueError, RuntimeError) as exc:
        raise ExpressionError(f"{expression!r} is not a valid CEL expression: {exc}") from exc


def render_key(expression: str, *, input: Mapping[str, Any], metadata: Mapping[str, str]) -> str:
    """The key `expression` gives for one run; raises ExpressionError saying why it cannot."""
    program = compile_expression(expression)
    try:
        value = program.execute({"input": dict(input), "metadata": dict(metadata)})
    except KeyError as exc:
        raise ExpressionError(f"{expression!r} failed: no field {exc} in the run") from exc
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ExpressionError(f"{expression!r} failed: {exc}") from exc
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if len(text) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        text = f"{text[: MAX_KEY_LENGTH - 17]}~{digest}"
    return text


@dataclasses.dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime


_FIXED = {
    "second": timedelta(seconds=1),
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(weeks=1),
}


def window_at(duration: str, now: datetime) -> Window:
    """The fixed window of `duration` that holds `now`, aligned in UTC.

    Seconds to days align to the epoch; weeks start on Monday; months and years on the calendar.
    """
    now = now.astimezone(UTC)
    if duration in ("second", "minute", "hour", "day"):
        step = _FIXED[duration]
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        start = epoch + ((now - epoch) // step) * step
        return Window(start, start + step)
    if duration == "week":
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - timedelta(days=day.weekday())
        return Window(start, start + _FIXED["week"])
    if duration == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        return Window(start, start + timedelta(days=days))
    if duration == "year":
        start = now.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        return Window(start, start.replace(year=start.year + 1))
    raise ValueError(f"unknown rate limit duration {duration!r}")


def dynamic_limit_name(key: str) -> str:
    """The RateLimit object that holds a dynamic key's window: a stable, valid object name."""
    return "dynamic-" + hashlib.sha256(key.encode()).hexdigest()[:20]
