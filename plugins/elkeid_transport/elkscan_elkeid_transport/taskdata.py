"""Reading a task's JSON ``data``: errors that become a 6000 ``failed`` message or an error log line."""

from __future__ import annotations

import json
import math
from typing import Any

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


def positive_number(data: dict[str, Any], key: str, default: float, task_type: int) -> float:
    """A positive number given as a JSON number or a string (Elkeid sends strings)."""
    value = data.get(key)
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TaskError(f"{task_type} {key} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise TaskError(f"{task_type} {key} must be positive, got {value!r}")
    return number
