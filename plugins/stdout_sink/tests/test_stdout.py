"""The stdout sink's JSON-lines schema (docs/records.md) and its table."""

import json

from elkscan_core import Detection, Record, Target
from elkscan_stdout_sink.render import record_fields


def test_finding_uses_elkeid_field_names():
    detection = Detection.from_signature("clamav", "Unix.Trojan.Mirai-1-0", hit_data=["$a,1,2"])
    record = Record(kind="finding", target=Target(path="/usr/bin/x", origin="procscan", pid=7),
                    detections=[detection], facts={"md5_hash": "abc", "pid": 7}, token="t1")
    data = record_fields(record)
    assert {k: data[k] for k in ("kind", "exe", "static_file", "engine", "signature", "types", "class",
                                 "name", "hit_data", "md5_hash", "pid", "token")} == {
        "kind": "finding", "exe": "/usr/bin/x", "static_file": "/usr/bin/x", "engine": "clamav",
        "signature": "Unix.Trojan.Mirai-1-0", "types": "Unix", "class": "Trojan", "name": "Mirai-1-0",
        "hit_data": ["$a,1,2"], "md5_hash": "abc", "pid": 7, "token": "t1"}
    assert json.loads(json.dumps(data)) == data


def test_clean_and_event_records():
    clean = record_fields(Record(kind="finding", target=Target(path="/x")))
    assert (clean["types"], clean["class"], clean["name"]) == ("not_detected", "", "")
    event = record_fields(Record(kind="task_done", facts={"status": "succeed", "msg": ""}))
    assert event["status"] == "succeed" and "path" not in event
