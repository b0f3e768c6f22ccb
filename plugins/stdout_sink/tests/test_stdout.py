"""The stdout sink's JSON-lines schema (docs/records.md) and its table."""

import json

from elkscan_core import Detection, Outcome, Record, Target
from elkscan_core.render import record_fields
from elkscan_stdout_sink.table import Table
from elkscan_core.text import cells, shorten, visible


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


def test_every_outcome_says_what_became_of_the_file():
    hit = Detection.from_signature("yara", "Multios_TestFile_Eicar")
    cases = [
        (Record(kind="finding", target=Target(path="/a"), detections=[hit], judged_by=["yara"]),
         {"status": "detected", "judged_by": ["yara"]}, ["detected", "Multios_TestFile_Eicar", "yara", "/a"]),
        (Record(kind="finding", target=Target(path="/b"), judged_by=["yara", "clamav"]),
         {"status": "clean", "judged_by": ["yara", "clamav"]}, ["clean", "yara,clamav", "/b"]),
        (Record(kind="finding", target=Target(path="/k"), judged_by=["pkgverify"], known_good="pkgverify"),
         {"status": "clean", "judged_by": ["pkgverify"], "known_good": "pkgverify"},
         ["clean", "(known", "good)", "pkgverify", "/k"]),
        (Record(kind="finding", target=Target(path="/c"), skipped="above max_size"),
         {"status": "not_scanned", "reason": "above max_size", "judged_by": []},
         ["NOT", "SCANNED", "(above", "max_size)", "/c"]),
        (Record(kind="finding", target=Target(path="/d"), judged_by=["yara"],
                errors=[Outcome("clamav", "timeout", message="no answer after 30s")]),
         {"status": "error", "judged_by": ["yara"]}, ["ERROR", "(timeout:", "no", "answer", "after", "30s)",
                                                     "clamav", "/d"]),
    ]
    for record, fields, row in cases:
        data = record_fields(record)
        assert {k: data[k] for k in ("status", "reason", "judged_by", "known_good") if k in data} == fields
        assert Table(None).rows(record)[0].split() == row
    forged = record_fields(Record(kind="finding", target=Target(path="/e"), detections=[hit],
                                  facts={"status": "clean", "judged_by": ["all"]}))
    assert (forged["status"], forged["judged_by"]) == ("detected", [])
    event = record_fields(Record(kind="task_done", facts={"status": "succeed", "msg": ""}))
    assert event["status"] == "succeed" and "judged_by" not in event


def test_clean_and_event_records():
    clean = record_fields(Record(kind="finding", target=Target(path="/x")))
    assert (clean["types"], clean["class"], clean["name"]) == ("not_detected", "", "")
    event = record_fields(Record(kind="task_done", facts={"status": "succeed", "msg": ""}))
    assert event["status"] == "succeed" and "path" not in event


def test_table_columns_hold_clamav_names_and_long_paths_are_cut_in_the_middle():
    signature = "Unix.Trojan.ReverseShell-Elkscan-1.UNOFFICIAL"
    path = "/srv/" + "deeply/nested/" * 20 + "the-file-that-matters.sh"
    record = Record(kind="finding", target=Target(path=path),
                    detections=[Detection.from_signature("clamav", signature)])
    for columns in (80, 100, 200):
        row = Table(columns).rows(record)[0]
        assert len(row) <= columns and row.endswith("/the-file-that-matters.sh\n")
        assert "..." in row and row.startswith("/", Table(columns).header().index("PATH"))
        if columns >= 105:
            assert row.split()[:3] == ["detected", signature, "clamav"]
    header, row = Table(120).header(), Table(120).rows(record)[0]
    assert row.index(signature) == header.index("SIGNATURE") and row.index("clamav") == header.index("ENGINE")
    assert row.index("/srv") == header.index("PATH")
    assert Table(None).rows(record)[0].split() == ["detected", signature, "clamav", path]  # a file: nothing cut


def test_shorten_counts_terminal_columns():
    assert shorten("abc", 3) == "abc" and shorten("abcdef", 5) == "...ef"
    wide = "/数据/" + "文件" * 30 + ".txt"
    cut = shorten(wide, 40)
    assert cells(cut) <= 40 and cut.endswith(".txt") and "..." in cut


def test_visible_escapes_what_a_terminal_would_obey():
    assert visible("a\nb\x1b[31m\tc\r\x7f\x9b") == "a\\nb\\x1b[31m\\tc\\r\\x7f\\x9b"
    assert visible("\u202eexe.txt \u200b é 数") == "\\u202eexe.txt \\u200b é 数"
    assert visible("bad\udcff.com") == "bad\\xff.com" and visible("a\\nb") == "a\\\\nb"


def test_ecs_documents_on_stdout(tmp_path, capsys):
    from elkscan_core.testing import eicar, run

    (tmp_path / "eicar.com").write_bytes(eicar())
    run({"plugins": ["yara_backend", "stdout_sink"], "engines": ["yara"],
         "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path): -1}}}],
         "sinks": [{"use": "stdout", "with": {"format": "ecs"}}]})
    (line,) = capsys.readouterr().out.splitlines()
    doc = json.loads(line)
    assert doc["file"]["path"] == str(tmp_path / "eicar.com") and doc["rule"]["name"] == "Multios_TestFile_Eicar"
    assert doc["event"]["kind"] == "alert" and len(doc["event"]["id"]) == 32
