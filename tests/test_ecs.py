"""``format: ecs``: the mapping of docs/records.md, and a document for any record whatever it holds."""

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from elkscan_core import Detection, Outcome, Record, Target
from elkscan_core.ecs import ecs_document
from elkscan_core.render import json_line, record_fields


def ecs(record):
    return ecs_document(record_fields(record), "web-1")


def test_a_detection_with_file_and_process_facts():
    hit = Detection.from_signature("clamav", "Unix.Trojan.Mirai-1-0")
    doc = ecs(Record(kind="finding", target=Target("/usr/bin/x", origin="procscan", pid=7), detections=[hit],
                     judged_by=["clamav"], id="ab" * 16, timestamp=1700000000.5,
                     facts={"md5_hash": "m", "sha256": "s", "exe_size": 10, "exe_hash": "e", "create_at": 1,
                            "modify_at": 2, "pid": 7, "ppid": 1, "pgid": -3, "argv": "x --serve", "comm": "x",
                            "uid": 0, "docker_id": "", "sessionid": 3}))
    assert doc["@timestamp"] == "2023-11-14T22:13:20.500Z" and doc["host"]["name"] == "web-1"
    assert doc["event"] == {"module": "elkscan", "dataset": "elkscan.finding", "action": "finding",
                            "id": "ab" * 16, "kind": "alert", "category": ["malware", "file"], "type": ["info"],
                            "outcome": "success"}
    assert doc["file"] == {"path": "/usr/bin/x", "name": "x", "directory": "/usr/bin", "size": 10,
                           "hash": {"md5": "m", "sha256": "s"}, "created": "1970-01-01T00:00:01.000Z",
                           "mtime": "1970-01-01T00:00:02.000Z"}
    assert doc["process"] == {"executable": "/usr/bin/x", "pid": 7, "parent": {"pid": 1}, "name": "x",
                              "command_line": "x --serve", "args": ["x", "--serve"]}
    assert doc["user"] == {"id": "0"} and "container" not in doc
    assert doc["rule"] == {"name": "Unix.Trojan.Mirai-1-0", "ruleset": "clamav", "category": "Unix.Trojan"}
    assert doc["threat"]["indicator"] == {"type": "file", "name": "Unix.Trojan.Mirai-1-0", "provider": "clamav"}
    assert doc["message"] == "Unix.Trojan.Mirai-1-0 detected in /usr/bin/x by clamav"
    extra = doc["elkscan"]  # nothing lost: what ECS has no field for
    assert extra["status"] == "detected" and extra["pgid"] == -3 and extra["exe_hash"] == "e"
    assert extra["sessionid"] == 3 and extra["origin"] == "procscan" and extra["judged_by"] == ["clamav"]
    assert extra["detections"][0]["signature"] == "Unix.Trojan.Mirai-1-0"


def test_outcomes_that_are_not_detections():
    clean = ecs(Record(kind="finding", target=Target("/a"), judged_by=["yara"]))
    assert clean["event"]["kind"] == "event" and clean["event"]["outcome"] == "success"
    assert "rule" not in clean and clean["message"] == "/a is clean" and clean["elkscan"]["status"] == "clean"
    skipped = ecs(Record(kind="finding", target=Target("/b"), skipped="above max_size"))
    assert skipped["event"]["outcome"] == "unknown" and skipped["event"]["reason"] == "above max_size"
    failed = ecs(Record(kind="finding", target=Target("/c"), errors=[Outcome("clamav", "timeout")]))
    assert failed["event"]["outcome"] == "failure" and failed["error"]["message"] == "clamav: timeout"


def test_events():
    written = ecs(Record(kind="file_event", facts={"file_path": "/var/www/up.php", "file_hash": "h",
                                                    "exe": "/usr/sbin/php-fpm", "pid": 9, "file_mask": "2"}))
    assert written["file"]["path"] == "/var/www/up.php" and written["file"]["hash"]["sha256"] == "h"
    assert written["process"] == {"executable": "/usr/sbin/php-fpm", "pid": 9}
    assert written["event"]["category"] == ["file"] and written["event"]["type"] == ["change"]
    ransom = ecs(Record(kind="ransom_event", target=Target("/tmp/enc", pid=5), judged_by=["yara"],
                        facts={"file_path": "/home/a/decoy.doc", "md5_hash": "m", "pid": 5}))
    assert ransom["file"]["path"] == "/home/a/decoy.doc" and ransom["process"]["executable"] == "/tmp/enc"
    assert ransom["process"]["hash"] == {"md5": "m"} and ransom["event"]["kind"] == "alert"
    done = ecs(Record(kind="task_done", facts={"status": "succeed", "msg": ""}, token="t"))
    assert "outcome" not in done["event"] and done["elkscan"] == {"status": "succeed", "msg": "", "token": "t"}


def test_a_name_that_is_not_utf8_keeps_its_exact_bytes():
    doc = ecs(Record(kind="finding", target=Target(os.fsdecode(b"/tmp/bad\xff.com"))))
    assert doc["file"]["path"] == "/tmp/bad\ufffd.com" and doc["elkscan"]["path_bytes"] == "/tmp/bad\\xff.com"


text = st.text(st.characters(blacklist_categories=()), max_size=20)
values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text | st.binary(max_size=8),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=8)


@settings(max_examples=800, deadline=None)
@given(st.builds(
    lambda kind, path, facts, detections, status: Record(
        kind=kind, target=Target(path) if path is not None else None, facts=facts,
        detections=[Detection.from_signature(e, s) for e, s in detections],
        errors=[Outcome("x", "failed")] if status == "error" else [],
        skipped="excluded" if status == "skip" else ""),
    st.sampled_from(["finding", "file_event", "ransom_event", "log", "task_done"]),
    st.none() | st.binary(min_size=1, max_size=30).map(lambda b: os.fsdecode(b"/" + b.replace(b"\0", b""))),
    st.dictionaries(st.sampled_from(["pid", "ppid", "argv", "uid", "file_path", "exe", "create_at", "status",
                                     "sha256", "docker_id", "comm"]) | text, values, max_size=6),
    st.lists(st.tuples(text, text), max_size=2),
    st.sampled_from(["", "error", "skip"])))
def test_fuzz_any_record_is_one_strict_utf8_ecs_line(record):
    line = json_line(ecs(record))
    assert line.count("\n") == 1
    doc = json.loads(line.encode("utf-8").decode("utf-8", "strict"))
    assert doc["host"]["name"] == "web-1" and doc["event"]["action"] == record.kind


def test_a_detection_whose_facts_name_class_or_types_is_one_ecs_line():
    """Found by the fuzz test above: a fact ``class`` that is not a string broke rule.category."""
    record = Record(kind="finding", target=Target("/x"), detections=(Detection.from_signature("yara", "A_B_C"),),
                    facts={"class": True, "types": 3})
    doc = json.loads(json_line(ecs(record)))
    assert doc["rule"]["name"] == "A_B_C"


def test_a_fact_never_stands_in_for_what_the_record_is():
    """Found by the fuzz test above: a fact named ``kind`` made an ECS event without an action."""
    doc = ecs(Record(kind="finding", facts={"kind": None, "time": "x", "id": 1}, id="abc"))
    assert doc["event"]["action"] == "finding" and doc["event"]["id"] == "abc"
