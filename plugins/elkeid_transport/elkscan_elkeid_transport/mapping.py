"""Neutral records -> Elkeid data types and field sets (docs/elkeid-protocol.md section 4).

Every value leaves here as a string: integers in decimal, timestamps in unix seconds, lists as
compact JSON. Field sets are built from the names the protocol lists, so a fact some enricher adds
under another name never reaches the server by accident; a 6003 also carries every task key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

from elkscan_core import FILE_EVENT, FINDING, LOG, RANSOM_EVENT, TASK_DONE, UNREADABLE, Record

# Record kinds the transport itself produces (the core's are imported above).
TASK_RESULT = "task_result"      # a target of a 6053 task: becomes a 6003, clean or not
DB_VERSION = "db_version"        # a 6050 was handled: fields version, exe_hash (the task's sha256)
RANSOM_STATUS = "ransom_status"  # anti-ransomware on/off: fields status
SCAN_PROGRESS = "scan_progress"  # elkscan's own progress of a 6057 (off by default)

TASK_DONE_TYPE, FILE_HIT, PROCESS_HIT, TASK_RESULT_TYPE = 6000, 6001, 6002, 6003
RANSOM_TYPE, DB_VERSION_TYPE, RANSOM_STATUS_TYPE, FILE_EVENT_TYPE = 6005, 6010, 6011, 6012
#: elkscan's addition: progress of a 6057 full/quick scan (docs/elkeid.md). Not an Elkeid type.
PROGRESS_TYPE = 6058
LOG_TYPE = 1010

NOT_DETECTED = "not_detected"
FILE_FACTS = ("exe_size", "exe_hash", "md5_hash", "create_at", "modify_at")
PROCESS_FACTS = ("pid", "ppid", "pgid", "tgid", "argv", "comm", "sessionid", "uid", "pns")
#: What Elkeid sends for file facts nobody measured (no hash enricher in the pipeline).
FILE_DEFAULTS = {"exe_size": "0", "exe_hash": str(UNREADABLE), "md5_hash": "", "create_at": "0",
                 "modify_at": "0"}
EVENT_FIELDS = {FILE_EVENT_TYPE: ("exe", "exe_size", "create_at", "modify_at", *PROCESS_FACTS, "docker_id",
                                  "file_path", "file_hash", "file_mask")}


def text(value: Any) -> str:
    """One field value as Elkeid writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), separators=(",", ":"), ensure_ascii=False)
    return str(value)


def _strings(fields: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): text(v) for k, v in fields.items()}


def _verdict(record: Record) -> dict[str, Any]:
    """types/class/name (and hit_data when a YARA rule matched) of the record's first detection."""
    if not record.detections:
        return {"types": NOT_DETECTED, "class": "", "name": ""}
    first = record.detections[0]
    fields: dict[str, Any] = {"types": first.types, "class": first.class_, "name": first.name}
    if first.hit_data:
        fields["hit_data"] = list(first.hit_data)
    return fields


def file_set(record: Record) -> dict[str, Any]:
    """The "file set": verdict, exe, static_file and the file facts (defaults when unmeasured)."""
    target = record.target
    facts = record.facts
    path = target.path if target is not None else text(facts.get("exe", ""))
    fields: dict[str, Any] = {**_verdict(record), "exe": path, "static_file": path}
    for name in FILE_FACTS:
        fields[name] = facts.get(name, FILE_DEFAULTS[name])
    if "exe_size" not in facts and target is not None and target.size is not None:
        fields["exe_size"] = target.size
    return fields


def process_set(record: Record) -> dict[str, Any]:
    pid = record.target.pid if record.target is not None else None
    facts = record.facts
    fields = {name: facts.get(name, UNREADABLE) for name in PROCESS_FACTS}
    if "pid" not in facts and pid is not None:
        fields["pid"] = pid
    return fields


def log_fields(message: str, *, target: str = "elkscan", file: str = "", line: Any = 0,
               level: str = "ERROR") -> dict[str, str]:
    """A 1010 error log line."""
    return {"level": level, "target": target, "file": file, "line": text(line), "msg": message}


def to_elkeid(record: Record) -> Optional[tuple[int, dict[str, str]]]:
    """(data_type, fields) for a neutral record, or None when Elkeid would send nothing for it."""
    kind = record.kind
    token = record.token or record.facts.get("token", "")
    if kind in (FINDING, TASK_RESULT):
        return _finding(record, token)
    if kind == TASK_DONE:
        return TASK_DONE_TYPE, _strings({"status": record.facts.get("status", "failed"),
                                         "msg": record.facts.get("msg", ""), "token": token})
    if kind == RANSOM_EVENT:
        fields = {**process_set(record), **file_set(record), "class": "anti_ransom",
                  "file_path": record.facts.get("file_path", ""),
                  "file_mask": record.facts.get("file_mask", "")}
        return RANSOM_TYPE, _strings(fields)
    if kind == DB_VERSION:
        return DB_VERSION_TYPE, _strings({"version": record.facts.get("version", ""),
                                          "exe_hash": record.facts.get("exe_hash", "")})
    if kind == RANSOM_STATUS:
        return RANSOM_STATUS_TYPE, _strings({"status": record.facts.get("status", "")})
    if kind == FILE_EVENT:
        facts = dict(record.facts)
        if record.target is not None:
            facts.setdefault("exe", record.target.path)
        return FILE_EVENT_TYPE, {name: text(facts.get(name, "")) for name in EVENT_FIELDS[FILE_EVENT_TYPE]}
    if kind == SCAN_PROGRESS:
        return PROGRESS_TYPE, _strings({**record.facts, "token": token})
    if kind == LOG:
        facts = record.facts
        return LOG_TYPE, log_fields(text(facts.get("msg", "")), target=text(facts.get("target", "elkscan")),
                                    file=text(facts.get("file", "")), line=facts.get("line", 0),
                                    level=text(facts.get("level", "ERROR")))
    return None


def _finding(record: Record, token: str) -> Optional[tuple[int, dict[str, str]]]:
    target = record.target
    task_result = record.kind == TASK_RESULT
    if not record.detections and not task_result:
        return None  # clean files never produce 6001/6002; the sink counts failed scans per task
    fields = file_set(record)
    if task_result:
        # As Elkeid: task keys override the file set (protocol section 3), then error, token and the
        # real hit_data go in, so a task key of one of those names never replaces it.
        hit_data = fields.pop("hit_data", None)
        fields.update(target.extra if target is not None else {})
        # a file no engine read whole is not clean: the 6003 says why in ``error``
        fields["error"] = record.error or (f"not scanned: {record.skipped}" if record.skipped else "")
        fields["token"] = token
        if hit_data is not None:
            fields["hit_data"] = hit_data
        return TASK_RESULT_TYPE, _strings(fields)
    if token:
        fields["token"] = token
    if target is not None and target.origin == "procscan":
        return PROCESS_HIT, _strings({**fields, **process_set(record)})
    return FILE_HIT, _strings(fields)
