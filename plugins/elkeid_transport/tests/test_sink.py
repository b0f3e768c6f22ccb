"""The elkeid sink over a real pipe: what goes upstream as 1010 (audit #28: Elkeid sends only ERROR log
lines; elkscan sent a 1010 per file it could not scan and fanotify's WARN summaries)."""

from __future__ import annotations

import os

import pytest

from elkscan_core import FINDING, LOG, TASK_DONE, Detection, Outcome, Record, Target
from elkscan_core.pipeline import structure
from elkscan_elkeid_transport.sink import ElkeidSink, ElkeidSinkConfig


class _Session:
    """What a sink reads of its session: nothing but its presence."""


def written(records: list[Record], **options) -> bytes:
    r, w = os.pipe()
    sink = ElkeidSink(structure({"fd": w, **options}, ElkeidSinkConfig, "with"), _Session())
    sink.start()
    for record in records:
        sink.write(record)
    sink.close()
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        return pipe.read()


def failed(path: str, token: str = "") -> Record:
    return Record(kind=FINDING, target=Target(path=path, origin="dirscan"), token=token,
                  errors=(Outcome("clamav", "failed", message="clamd did not scan the whole file", target=path),))


def test_failed_scans_of_a_task_are_one_summary_line_before_its_6000(decode, caplog):
    hit = Record(kind=FINDING, target=Target(path="/srv/x.php", origin="dirscan"), token="t",
                 detections=(Detection.from_signature("yara", "Php_Webshell_X", yara_rule=True),))
    records = [failed("/srv/a.zip", "t"), hit, failed("/srv/b.zip", "t"), failed("/tmp/c", ""),
               failed("/srv/d.zip", "other"),
               Record(kind=TASK_DONE, token="t", facts={"status": "succeed", "msg": ""})]
    out = decode(written(records))
    assert [r.data_type for r in out] == [6001, 1010, 6000]
    summary = out[1].fields
    assert summary["level"] == "ERROR" and summary["msg"] == (
        "task token 't': 2 file(s) could not be scanned, so they are neither clean nor reported (see "
        "scanner.log); the first: /srv/a.zip: clamav: failed: clamd did not scan the whole file")
    logged = [r.getMessage() for r in caplog.records if r.name == "elkscan.elkeid"]
    assert sum(m.startswith("scan failed: ") for m in logged) == 4  # every one in scanner.log, with its task or not


@pytest.mark.parametrize("level,sent", [("ERROR", ["ERROR", "CRITICAL", "odd"]),
                                        ("WARN", ["WARN", "ERROR", "CRITICAL", "odd"])])
def test_log_records_below_log_level_stay_local(decode, level, sent):
    records = [Record(kind=LOG, facts={"level": name, "target": "fanotify", "msg": f"a {name} line"})
               for name in ("INFO", "WARN", "ERROR", "CRITICAL", "odd")]
    out = decode(written(records, log_level=level))
    assert [r.fields["level"] for r in out] == sent and {r.data_type for r in out} == {1010}
