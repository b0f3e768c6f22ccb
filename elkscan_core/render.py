"""Records as plain data with Elkeid's field names: the JSON-lines schema (docs/records.md) that every
sink writing JSON shares (stdout, file, syslog, the network sinks)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .model import Detection, Record

from .text import escaped_bytes, has_surrogates, hidden, lossy, raw_bytes

NOT_DETECTED = "not_detected"
#: Fields that repeat ``path``: its raw bytes are given once, as ``path_bytes``.
_PATH_COPIES = ("exe", "static_file")


def detection_fields(detection: Detection, meta: bool = False) -> dict[str, Any]:
    """A detection's fields; with ``meta``, what else its engine said about it (YARA rule metadata, a
    modified package file's expected and actual digests), when it said anything."""
    fields = {"engine": detection.engine, "signature": detection.signature, "types": detection.types,
              "class": detection.class_, "name": detection.name, "hit_data": list(detection.hit_data)}
    if meta and detection.meta:
        fields["meta"] = dict(detection.meta)
    return fields


def outcome_fields(record: Record) -> dict[str, Any]:
    """``status`` (detected, clean, not_scanned, error), ``reason`` when a file was not (all) judged,
    ``judged_by``: the engines that read the whole file, and ``known_good``: the engine that vouched
    for it."""
    fields: dict[str, Any] = {"status": record.status}
    if record.skipped:
        fields["reason"] = record.skipped
    fields["judged_by"] = list(record.judged_by)
    if record.known_good:
        fields["known_good"] = record.known_good
    return fields


def record_fields(record: Record, own_host: str = "") -> dict[str, Any]:
    """One JSON object: kind, time, id, the target and its outcome, the first detection flat, all
    detections, facts. A file of another host (``Target.host``) carries that ``host``, and ``own_host``
    (this session's name) as ``verifier``; the sinks that name the host add this one's to the others.

    Every string is valid Unicode: a top-level string that is not (a file name with bytes that are not
    UTF-8) is given lossily (U+FFFD) and exactly, escaped, in ``<field>_bytes``.
    """
    identity = {"kind": record.kind, "time": round(record.timestamp, 3), **({"id": record.id} if record.id else {})}
    target = record.target
    if target is not None and target.host:
        identity["host"] = target.host
        if own_host:
            identity["verifier"] = own_host
    data: dict[str, Any] = dict(identity)
    verdict = outcome_fields(record) if target is not None else {}
    if target is not None:
        data.update(origin=target.origin, path=target.path, exe=target.path, static_file=target.path)
        data.update(verdict)
        if record.detections:
            data.update(detection_fields(record.detections[0]))
            data["detections"] = [detection_fields(d, meta=True) for d in record.detections]
        else:
            data.update(types=NOT_DETECTED, **{"class": ""}, name="")
    data.update(record.facts)
    data.update(verdict)  # the core's verdict: no fact stands in for it
    data.pop("host", None), data.pop("verifier", None)  # nor for where the file is and who judged it
    data.update(identity)  # nor for what the record is
    if record.errors:
        data["error"] = record.error
    if record.token:
        data["token"] = record.token
    return _unicode_fields(data)


def _unicode_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    exact: dict[str, str] = {}
    for key, value in data.items():
        key = lossy(str(key))
        if isinstance(value, str) and has_surrogates(value):
            fields[key] = lossy(value)
            if not (key in _PATH_COPIES and value == data.get("path")):
                fields[f"{key}_bytes"] = exact[f"{key}_bytes"] = escaped_bytes(raw_bytes(value))
        else:
            fields[key] = _plain(value)
    for key in [k for k in fields if k.endswith("_bytes") and k[:-6] in fields and k not in exact]:
        del fields[key]  # a fact cannot pose as the exact bytes of another field
    fields.update(exact)
    return fields


def _plain(value: Any) -> Any:
    """A JSON-able copy of a fact: valid Unicode strings, finite numbers, lists and objects."""
    if isinstance(value, str):
        return lossy(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray)):
        return escaped_bytes(bytes(value))
    if isinstance(value, Mapping):
        return {lossy(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return lossy(str(value))


def _json_escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def json_line(fields: Mapping[str, Any], ascii_only: bool = False) -> str:
    """One JSON object on one line, ending in a newline.

    Besides what JSON escapes itself, control and format characters (NEL, U+2028, bidi overrides) are
    written as ``\\uXXXX``: no line splitter breaks the record, and ``cat`` on a terminal shows it as is.
    """
    line = json.dumps(fields, ensure_ascii=ascii_only, allow_nan=False)
    if not line.isascii() or "\x7f" in line:
        line = "".join(_json_escape(c) if c >= "\x7f" and hidden(c) else c for c in line)
    return line + "\n"
