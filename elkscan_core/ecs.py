"""``format: ecs``: a record as an Elastic Common Schema document (the mapping is in docs/records.md).

Built from the JSON-lines fields (``render.record_fields``), so it is as safe for any file name: every
string valid Unicode, exact bytes in ``*_bytes``. Whatever ECS has no field for is kept under
``elkscan.*``: nothing of the record is lost.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

from .model import CLEAN, DETECTED, ERROR, FILE_EVENT, NOT_SCANNED, RANSOM_EVENT, UNREADABLE

ECS_VERSION = "8.11.0"
#: A scan result's status -> event.outcome: did judging the file succeed.
_OUTCOME = {DETECTED: "success", CLEAN: "success", NOT_SCANNED: "unknown", ERROR: "failure"}
#: Process facts (the process enricher, a file event's writer) -> ECS.
_PROCESS = {"pid": "process.pid", "ppid": "process.parent.pid", "pgid": "process.pgid",
            "comm": "process.name", "docker_id": "container.id"}


def _put(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        document = document.setdefault(key, {})
    document[leaf] = value


def _time(seconds: Any) -> str | None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _known(value: Any) -> bool:
    """A fact that was read (Elkeid writes -3 for one that could not be)."""
    return value not in (None, "", UNREADABLE, str(UNREADABLE)) and not isinstance(value, bool)


def ecs_document(fields: Mapping[str, Any], host: str) -> dict[str, Any]:
    """The ECS document of one record's JSON-lines ``fields``, found on ``host`` (the fields' own
    ``host`` when they name one: a file of another host, judged here, the ``verifier``)."""
    rest = dict(fields)
    take = rest.pop
    kind = take("kind", "")
    scan = "judged_by" in fields  # a judged target: ``status`` is the verdict, not an event's fact
    status = take("status") if scan else None
    written = isinstance(fields.get("file_path"), str)  # the file was written; the target is its writer
    doc: dict[str, Any] = {"@timestamp": _time(take("time", None)), "ecs": {"version": ECS_VERSION}}
    _put(doc, "host.name", take("host", host))
    if "verifier" in rest:
        _put(doc, "observer.hostname", take("verifier"))
    _put(doc, "agent.type", "elkscan")
    _put(doc, "event.module", "elkscan")
    _put(doc, "event.dataset", f"elkscan.{kind}")
    _put(doc, "event.action", kind)
    if "id" in rest:
        _put(doc, "event.id", take("id"))
    _put(doc, "event.kind", "alert" if status == DETECTED or kind == RANSOM_EVENT else "event")
    if kind in (FILE_EVENT, RANSOM_EVENT):
        _put(doc, "event.category", ["malware", "file"] if kind == RANSOM_EVENT else ["file"])
        _put(doc, "event.type", ["change"])
    elif scan:
        _put(doc, "event.category", ["malware", "file"] if status == DETECTED else ["file"])
        _put(doc, "event.type", ["info"])
    if scan:
        _put(doc, "event.outcome", _OUTCOME.get(status, "unknown"))
        if "reason" in rest:
            _put(doc, "event.reason", take("reason"))
    if "error" in rest:
        _put(doc, "error.message", take("error"))
    path = take("path", None) if scan else None
    take("static_file", None)
    if written:
        _file(doc, take("file_path"))
        if "file_hash" in rest:
            _put(doc, "file.hash.sha256", take("file_hash"))
        executable = path if path is not None else take("exe", None)
        if _known(executable):
            _put(doc, "process.executable", executable)
            rest.pop("exe", None)
        for fact, name in (("md5_hash", "process.hash.md5"), ("sha256", "process.hash.sha256")):
            if fact in rest and path is not None:
                _put(doc, name, take(fact))
    elif path is not None:
        rest.pop("exe", None)
        _file(doc, path)
        for fact, name in (("exe_size", "file.size"), ("md5_hash", "file.hash.md5"),
                           ("sha256", "file.hash.sha256")):
            if fact in rest:
                _put(doc, name, take(fact))
        for fact, name in (("create_at", "file.created"), ("modify_at", "file.mtime")):
            moment = _time(fields.get(fact))
            if moment is not None:
                _put(doc, name, moment)
                del rest[fact]
        if "pid" in rest:  # a running process's executable
            _put(doc, "process.executable", path)
    _process(doc, rest)
    if status == DETECTED:
        _put(doc, "rule.name", fields.get("signature"))
        _put(doc, "rule.ruleset", fields.get("engine"))
        _put(doc, "rule.category", ".".join(p for p in (fields.get("types"), fields.get("class"))
                                             if p and isinstance(p, str)))  # facts may carry others' names
        _put(doc, "threat.indicator.type", "file")
        _put(doc, "threat.indicator.name", fields.get("signature"))
        _put(doc, "threat.indicator.provider", fields.get("engine"))
    if scan:
        for key in ("engine", "signature", "types", "class", "name", "hit_data"):  # rule.*, detections
            rest.pop(key, None)
    _put(doc, "message", _message(fields, scan))
    if scan:
        rest["status"] = status
    if rest:
        doc["elkscan"] = rest
    return doc


def _file(doc: dict[str, Any], path: Any) -> None:
    _put(doc, "file.path", path)
    if isinstance(path, str):
        _put(doc, "file.name", os.path.basename(path))
        _put(doc, "file.directory", os.path.dirname(path))


def _process(doc: dict[str, Any], rest: dict[str, Any]) -> None:
    """``process.*``, ``user.id`` and ``container.id`` from process facts that were read."""
    for fact, name in _PROCESS.items():
        if _known(rest.get(fact)):
            _put(doc, name, rest.pop(fact))
    argv = rest.get("argv")
    if isinstance(argv, str) and _known(argv):
        _put(doc, "process.command_line", argv)
        _put(doc, "process.args", argv.split())
        del rest["argv"]
    if _known(rest.get("uid")):
        _put(doc, "user.id", str(rest.pop("uid")))


def _message(fields: Mapping[str, Any], scan: bool) -> str:
    """One line for people: what happened to which file."""
    where = fields.get("file_path") or fields.get("path") or ""
    status = fields.get("status") if scan else None
    if status == DETECTED:
        return f"{fields.get('signature')} detected in {fields.get('path')} by {fields.get('engine')}"
    if status == NOT_SCANNED:
        return f"{where} not scanned: {fields.get('reason', '')}"
    if status == ERROR:
        return f"{where} could not be scanned: {fields.get('error', '')}"
    if status == CLEAN:
        return f"{where} is clean"
    return f"{fields.get('kind', '')} {where}".strip()
