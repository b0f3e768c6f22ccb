"""Record ids: every delivered record has one, the same finding found again has the same one, and what
makes it another finding (the host, the file, the rules) makes another id."""

import os

from elkscan_core import Detection, Engine, Record, Target, hookimpl
from elkscan_core.model import record_id
from elkscan_core.render import record_fields
from elkscan_core.testing import run


class Versioned(Engine):
    """Detects 'bad'; its rule version is whatever the test sets."""
    id = "versioned"
    rules = "v1"

    def scan(self, subject):
        return [Detection.from_signature(self.id, "Txt.Test.Bad")] if b"bad" in subject.read(4096) else []

    def version(self):
        return f"rules {Versioned.rules}"


class Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Versioned)


def scan(tree):
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}],
                "engines": ["versioned"]}
    result = run(pipeline, extra_plugins=[Plugin()], report_clean=True)
    return {os.path.basename(r.target.path): r.id for r in result.records}


def test_the_same_finding_has_the_same_id_in_every_session_and_new_rules_make_a_new_one(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"this is bad content")
    (tmp_path / "good.txt").write_bytes(b"this is fine content")
    Versioned.rules = "v1"
    first, again = scan(tmp_path), scan(tmp_path)
    assert first == again and len(set(first.values())) == 2
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in first.values())
    Versioned.rules = "v2"
    updated = scan(tmp_path)
    assert updated["bad.txt"] != first["bad.txt"]  # a detection under other rules is news
    assert updated["good.txt"] == first["good.txt"]  # a clean file names no rule version


def test_the_id_depends_on_host_path_and_signature_but_not_on_time_or_facts():
    hit = Detection.from_signature("yara", "Linux_Trojan_X", yara_rule=True)
    base = Record(kind="finding", target=Target("/srv/x"), detections=[hit], facts={"pid": 1}, timestamp=1.0)
    same = Record(kind="finding", target=Target("/srv/x", pid=7), detections=[hit], facts={"pid": 2},
                  timestamp=2.0)
    assert record_id(base, "h1", {"yara": "r"}) == record_id(same, "h1", {"yara": "r"})
    others = [record_id(base, "h2", {"yara": "r"}),
              record_id(Record(kind="finding", target=Target("/srv/y"), detections=[hit]), "h1", {"yara": "r"}),
              record_id(Record(kind="finding", target=Target("/srv/x"),
                               detections=[Detection("yara", "Other")]), "h1", {"yara": "r"}),
              record_id(Record(kind="finding", target=Target("/srv/x")), "h1", {}),
              record_id(Record(kind="finding", target=Target("/srv/x"), skipped="excluded"), "h1", {})]
    assert len({record_id(base, "h1", {"yara": "r"}), *others}) == 6


def test_names_that_are_not_utf8_and_events_get_distinct_ids():
    a = Record(kind="finding", target=Target(os.fsdecode(b"/x\xff")))
    b = Record(kind="finding", target=Target(os.fsdecode(b"/x\xfe")))
    assert record_id(a, "h", {}) != record_id(b, "h", {})
    one = Record(kind="log", facts={"msg": "disk full"}, timestamp=1.0)
    two = Record(kind="log", facts={"msg": "disk full"}, timestamp=2.0)
    assert record_id(one, "h", {}) != record_id(two, "h", {})  # two occurrences of an event
    assert record_id(Record(kind="log", facts={1: b"\xff", "a": object}), "h", {})  # any facts hash


def test_the_json_line_carries_the_id():
    assert record_fields(Record(kind="finding", target=Target("/x"), id="ab" * 16))["id"] == "ab" * 16
