"""Human units in configuration: sizes (``18MiB``), durations (``5s``, ``24h``) and percentages.

Each is a plain ``int``/``float`` subclass, so components use them as numbers; the pipeline loader
parses them from strings and reports the YAML path when one does not parse.
"""

from __future__ import annotations

import math
import re
import reprlib

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
#: The longest duration: ten years fits every timer and C ``int`` of seconds a component hands it to.
MAX_DURATION = 3650 * 86400
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z%]*)\s*$")


_PERCENT_UNITS = {"%": 0.01, "": 0.01}

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 2, 4, 4


def shown(value: object) -> str:
    """A configuration value as an error message quotes it: ``repr``, cut short, so a long string or a
    YAML alias bomb (a few hundred bytes that share lists a billion times over) stays one short line."""
    return _SHOW.repr(value)


def _scaled(value: object, kind: str, example: str, units: dict[str, float]) -> float:
    """``value`` (a number, or a number and a unit) times its unit's factor; ValueError says why not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a {kind} such as {example!r}, got {shown(value)}")
    if isinstance(value, (int, float)):
        number, unit = value, ""
    else:
        match = _NUMBER_UNIT.match(value)
        if not match:
            raise ValueError(f"expected a {kind} such as {example!r}, got {shown(value)}")
        number, unit = float(match.group(1)), match.group(2).lower()
    if number < 0:
        raise ValueError(f"a {kind} cannot be negative, got {shown(value)}")
    if unit not in units:
        known = ", ".join(u for u in units if u) or "none"
        raise ValueError(f"unknown {kind} unit {unit!r} in {shown(value)} (use {known})")
    try:
        scaled = float(number) * units[unit]
    except OverflowError:  # an integer beyond any float
        scaled = math.inf
    if math.isnan(scaled):
        raise ValueError(f"expected a {kind} such as {example!r}, got {shown(value)}")
    if math.isinf(scaled):
        raise ValueError(f"a {kind} must be a finite number, got {shown(value)}")
    return scaled


class Size(int):
    """A number of bytes: ``4096``, ``512KiB``, ``18MiB``, ``1G``."""

    @classmethod
    def parse(cls, value: object) -> Size:
        return cls(int(_scaled(value, "size", "18MiB", _SIZE_UNITS)))


class Duration(float):
    """A number of seconds: ``500ms``, ``5s``, ``10m``, ``24h``, ``3d`` (a bare number is seconds)."""

    @classmethod
    def parse(cls, value: object) -> Duration:
        seconds = _scaled(value, "duration", "5s", _DURATION_UNITS)
        if seconds > MAX_DURATION:
            raise ValueError(f"a duration can be at most {MAX_DURATION // 86400}d (ten years), got {shown(value)}")
        return cls(seconds)


class Percent(float):
    """A fraction written as a percentage: ``10%`` is ``0.1``. A bare number is taken as percent."""

    @classmethod
    def parse(cls, value: object) -> Percent:
        return cls(_scaled(value, "percentage", "10%", _PERCENT_UNITS))


MiB = 1024 * 1024
