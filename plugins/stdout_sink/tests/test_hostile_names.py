"""File names chosen by an attacker cannot corrupt, forge or lose output (audit B10, B11).

Each test scans real files with the installed ``elkscan`` command and reads its output as a strict
consumer would.
"""

import json
import os
import subprocess
import sys

import pytest

from elkscan_core.testing import eicar

ELKSCAN = [sys.executable, "-m", "elkscan_core.cli"]
#: Not UTF-8; newline; ESC with a colour and a tab; C1 NEL and U+2028 (line breaks to str.splitlines);
#: a bidi override that reverses what follows; quotes; a literal backslash sequence.
NAMES = [b"bad\xff\xfe.com", b"new\nline.com", b"esc\x1b[31mred\tx.com", "nel\x85ls\u2028.com".encode(),
         "rlo\u202emoc.exe".encode(), b"q\"uote'.com", b"lit\\nslash.com"]


@pytest.fixture
def hostile(tmp_path):
    for name in NAMES:
        with open(os.path.join(os.fsencode(tmp_path), name), "wb") as f:
            f.write(eicar())
    return tmp_path


def scan(*args):
    return subprocess.run([*ELKSCAN, "scan", *args], capture_output=True, timeout=120)


def unescape(text: str) -> bytes:
    """What docs/records.md tells a consumer to do with ``path_bytes``."""
    return text.encode().decode("unicode_escape").encode("latin-1")


def test_every_json_line_is_strict_utf8_and_maps_back_to_the_file(hostile):
    out = scan(str(hostile), "-f", "jsonl")
    assert out.returncode == 1, out.stderr
    lines = out.stdout.decode("utf-8").splitlines()  # strict: a raw 0xff byte fails here
    records = [json.loads(line) for line in lines]
    assert len(records) == len(NAMES)
    seen = set()
    for record in records:
        assert record["signature"] == "Multios_TestFile_Eicar" or record["engine"] == "clamav"
        raw = unescape(record["path_bytes"]) if "path_bytes" in record else record["path"].encode()
        assert "\ufffd" not in record["path"] or "path_bytes" in record
        with open(raw, "rb") as f:  # the exact name opens the very file
            assert f.read() == eicar()
        seen.add(os.path.basename(raw))
    assert seen == set(NAMES)
    bad = next(r for r in records if "path_bytes" in r)
    assert bad["path"].endswith("bad\ufffd\ufffd.com") and bad["path_bytes"].endswith("bad\\xff\\xfe.com")
    assert bad["exe"] == bad["static_file"] == bad["path"]
    assert sum("path_bytes" in r for r in records) == 1  # only the name that is not UTF-8


def test_table_rows_cannot_be_forged_nor_colour_the_terminal(hostile):
    out = scan(str(hostile), "-f", "table")
    assert out.returncode == 1, out.stderr
    text = out.stdout.decode("utf-8")
    rows = text.split("\n")[1:-1]
    detections = len(NAMES) * (len(rows) // len(NAMES))
    assert len(rows) == detections and rows  # one row per detection, none split by a name
    assert all(c == "\n" or c.isprintable() for c in text)  # no ESC, tab, NEL, U+2028, U+202E
    shown = {row.split()[-1].rsplit("/", 1)[-1] for row in rows}
    assert shown == {"bad\\xff\\xfe.com", "new\\nline.com", "esc\\x1b[31mred\\tx.com",
                     "nel\\x85ls\\u2028.com", "rlo\\u202emoc.exe", "q\"uote'.com", "lit\\\\nslash.com"}


def test_a_stdout_that_is_not_utf8_loses_no_record(tmp_path):
    """A legacy locale (here latin-1): JSON lines in ASCII, the table with escapes; nothing dropped."""
    for name in (b"bad\xff.com", "数据.com".encode()):
        with open(os.path.join(os.fsencode(tmp_path), name), "wb") as f:
            f.write(eicar())
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    out = subprocess.run([*ELKSCAN, "scan", str(tmp_path), "-f", "jsonl"], capture_output=True, env=env,
                         timeout=120)
    assert out.returncode == 1 and out.stdout.isascii(), out.stderr
    names = {os.path.basename(unescape(r["path_bytes"]) if "path_bytes" in r else r["path"].encode())
             for r in map(json.loads, out.stdout.splitlines())}
    assert names == {b"bad\xff.com", "数据.com".encode()}
    out = subprocess.run([*ELKSCAN, "scan", str(tmp_path), "-f", "table"], capture_output=True, env=env,
                         timeout=120)
    assert out.returncode == 1 and b" 0 error(s)" in out.stderr, out.stderr
    rows = out.stdout.decode("latin-1").splitlines()[1:]
    assert {row.rsplit("/", 1)[1] for row in rows} == {"bad\\xff.com", "\\u6570\\u636e.com"}
