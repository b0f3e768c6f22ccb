"""Hypothesis: any file name and any string fact, through both output formats, stays strict UTF-8,
one line per JSON record, exact name recoverable, and no raw control character in the table.

Run with ``-s`` to see how many examples ran; ``ELKSCAN_FUZZ_EXAMPLES`` sets how many (500).
"""

import io
import json
import os
from contextlib import redirect_stdout
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from elkscan_core import Detection, Outcome, Record, Target
from elkscan_stdout_sink.plugin import StdoutConfig, StdoutSink
from elkscan_stdout_sink.table import Table
from elkscan_core.render import record_fields
from elkscan_core.text import cells, hidden, raw_bytes

EXAMPLES = int(os.environ.get("ELKSCAN_FUZZ_EXAMPLES", "500"))
#: One path component: any bytes but NUL and '/'.
names = st.binary(min_size=1, max_size=80).map(lambda b: b.replace(b"\0", b"").replace(b"/", b"")).filter(len)
#: The record's own fields: facts may not replace them (the runner's rule), so none is generated.
OWN = set(record_fields(Record(kind="finding", target=Target("/x"), token="t", errors=[Outcome("c", "x")],
                               detections=[Detection.from_signature("e", "s")])))
#: Strings as facts may hold them: any character, os.fsdecode's escapes, and other lone surrogates.
texts = st.one_of(
    st.lists(st.one_of(st.characters(), st.integers(0xDC80, 0xDCFF).map(chr),
                       st.integers(0xD800, 0xDFFF).map(chr)), max_size=40).map("".join),
    st.binary(max_size=40).map(os.fsdecode))
values = st.one_of(texts, st.integers(), st.floats(), st.none(), st.binary(max_size=20),
                   st.lists(texts, max_size=3), st.dictionaries(texts, texts, max_size=3))
records = st.builds(
    lambda name, pid, detections, facts, errors, skipped, judged_by: Record(
        kind="finding", target=Target(path=os.fsdecode(b"/scan/" + name), pid=pid), facts=facts,
        detections=[Detection.from_signature(e, s) for e, s in detections],
        errors=[Outcome(c, "failed", message=m) for c, m in errors], skipped=skipped, judged_by=judged_by),
    names, st.none() | st.integers(1, 2**22), st.lists(st.tuples(texts, texts), max_size=3),
    st.dictionaries(st.sampled_from(["argv", "comm", "file_path", "msg", "path_bytes"])
                    | texts.filter(lambda key: key not in OWN), values, max_size=4),
    st.lists(st.tuples(texts, texts), max_size=2), st.just("") | texts, st.lists(texts, max_size=2))
counts = {"jsonl": 0, "table": 0}


def written(fmt: str, record: Record) -> bytes:
    """What the sink writes for ``record`` to a stdout like Python's own (UTF-8, surrogateescape)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape", newline="\n")
    with redirect_stdout(out):
        sink = StdoutSink(StdoutConfig(format=fmt), SimpleNamespace(host="verifier-1"))
        sink.start()
        sink.write(record)
        sink.flush()
    return out.buffer.getvalue()


def unescape(text: str) -> bytes:
    return text.encode().decode("unicode_escape").encode("latin-1")


@settings(max_examples=EXAMPLES, deadline=None)
@given(records)
def test_json_lines_are_strict_utf8_one_line_and_reversible(record):
    counts["jsonl"] += 1
    line = written("jsonl", record).decode("utf-8")  # strict
    assert line.endswith("\n") and len(line.splitlines()) == 1  # str.splitlines: every line break
    data = json.loads(line)
    name = os.fsencode(record.target.path)
    raw = unescape(data["path_bytes"]) if "path_bytes" in data else data["path"].encode()
    assert raw == name
    for key, value in record.facts.items():
        if isinstance(value, str) and f"{key}_bytes" in data:
            assert unescape(data[f"{key}_bytes"]) == raw_bytes(value)


@settings(max_examples=EXAMPLES, deadline=None)
@given(records, st.sampled_from([None, 40, 80, 120]))
def test_table_rows_are_strict_utf8_and_show_no_control_character(record, columns):
    counts["table"] += 1
    expected = max(len(record.detections) + len(record.errors), 1)
    text = written("table", record).decode("utf-8")
    assert len(text.split("\n")) == 1 + expected + 1  # header, one per row, the final newline
    assert not any(hidden(c) for c in text.replace("\n", ""))
    for row in Table(columns).rows(record):
        assert row.count("\n") == 1 and not any(hidden(c) for c in row[:-1])
        if columns:
            assert cells(row[:-1]) <= columns - 1


def teardown_module():
    print(f"\nfuzz: {counts['jsonl']} JSON-lines examples, {counts['table']} table examples")
