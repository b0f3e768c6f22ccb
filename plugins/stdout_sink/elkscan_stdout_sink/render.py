"""Records as plain data with Elkeid's field names (the JSON-lines schema, docs/records.md)."""

from __future__ import annotations

from typing import Any

from elkscan_core import Detection, Record

NOT_DETECTED = "not_detected"


def detection_fields(detection: Detection) -> dict[str, Any]:
    return {"engine": detection.engine, "signature": detection.signature, "types": detection.types,
            "class": detection.class_, "name": detection.name, "hit_data": list(detection.hit_data)}


def record_fields(record: Record) -> dict[str, Any]:
    """One JSON object: kind, time, the target, the first detection flat, all detections, facts."""
    data: dict[str, Any] = {"kind": record.kind, "time": round(record.timestamp, 3)}
    target = record.target
    if target is not None:
        data.update(origin=target.origin, path=target.path, exe=target.path, static_file=target.path)
        if record.detections:
            data.update(detection_fields(record.detections[0]))
            data["detections"] = [detection_fields(d) for d in record.detections]
        else:
            data.update(types=NOT_DETECTED, **{"class": ""}, name="")
    data.update(record.facts)
    if record.errors:
        data["error"] = record.error
    if record.token:
        data["token"] = record.token
    return data
