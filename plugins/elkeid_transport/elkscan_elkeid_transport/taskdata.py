"""Reading a task's JSON ``data``: errors that become a 6000 ``failed`` message or an error log line."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from .wire import Task


class TaskError(Exception):
    """A task whose data cannot be used; the message says what is wrong with it."""


def parse_json(task: Task) -> dict[str, Any]:
    """The task's data as a JSON object (empty data is an empty object)."""
    try:
        data = json.loads(task.data) if task.data.strip() else {}
    except ValueError as exc:
        raise TaskError(f"task {task.data_type} data is not JSON ({exc}): {task.data[:200]!r}") from None
    if not isinstance(data, dict):
        raise TaskError(f"task {task.data_type} data is not a JSON object: {task.data[:200]!r}")
    return data


def positive(value: Any) -> Optional[float]:
    """A task setting as a positive number (Elkeid sends strings), or None when it is not one (missing,
    ``"0"``, negative, not a number): Elkeid then uses its default. Elkeid takes whole numbers only; a
    fraction is taken here."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None
