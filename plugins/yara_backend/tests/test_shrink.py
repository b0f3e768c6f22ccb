"""A file's owner truncates it again and again while the yara engine, as root, scans it: a read of a mapped
page past the new end raises SIGBUS. libyara catches it during a scan (the scan fails); the engine holds
a read lease while it scans a mapped file, so the truncate waits and the file is judged; when the owner
keeps it open for writing (no lease), a scan that saw it shrink is an error on its record. A small file
is read whole, not mapped: a read that does not return the size it had is an error on its record. Never
a crash, never a silent clean (docs/hardening.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from elkscan_core.testing import shrinking

SIZE = 24 << 20  # READ_BELOW or more: elkscan maps it itself (mapping.py); below, the engine reads it whole
SMALL = 128 << 10
CHANGED = "yara: failed: OSError: the file changed size while it was read (a writer holds it); not judged"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attack is on a scanner running as root")


def scans(tmp_path, hold: bool, seconds: float = 6.0, size: int = SIZE) -> list[tuple[int, dict]]:
    """``elkscan scan`` of the file again and again for ``seconds`` while its owner cuts it short."""
    big = tmp_path / "home" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(size))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nplugins: [yara_backend]\nengines: [yara]\n")
    runs = []
    with shrinking(big, hold=hold):
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            out = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "scan", "-q", "-f", "jsonl", "--all",
                                  "-p", str(pipeline), str(big)], capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "ELKSCAN_STATE_DIR": str(tmp_path / "state")})
            assert out.returncode >= 0, f"the scanner was killed by signal {-out.returncode}: {out.stderr}"
            [record] = [json.loads(line) for line in out.stdout.splitlines()]
            runs.append((out.returncode, record))
    assert len(runs) >= 3
    return runs


def test_a_file_truncated_by_its_owner_during_the_scan_waits_for_it_and_is_judged(tmp_path):
    runs = scans(tmp_path, hold=False)
    assert all(code == 0 and r["status"] == "clean" and r["judged_by"] == ["yara"] for code, r in runs), runs


def test_a_file_its_owner_keeps_open_for_writing_and_cuts_short_is_an_error_when_it_shrank(tmp_path):
    runs = scans(tmp_path, hold=True)
    for code, record in runs:
        assert (code, record["status"]) in ((0, "clean"), (2, "error")), record
        if code:
            assert record["error"] == ("yara: failed: OSError: the file shrank while yara read it (truncated by "
                                       "a writer); not judged")


@pytest.mark.parametrize("hold", [False, True], ids=["closed", "held-open"])
def test_a_small_file_cut_short_while_it_is_read_is_judged_whole_or_an_error(tmp_path, hold):
    runs = scans(tmp_path, hold=hold, size=SMALL)
    for code, record in runs:
        assert (code, record["status"]) in ((0, "clean"), (2, "error")), record
        if code:
            assert record["error"] == CHANGED
        else:
            assert record["judged_by"] == ["yara"], record
