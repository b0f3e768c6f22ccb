"""End to end: the installed ``elkscan`` command on real files, with the shipped default rules."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elkscan_core.testing import SAMPLES, write_samples

ELKSCAN = [sys.executable, "-m", "elkscan_core.cli"]
CLAMD = shutil.which("clamd") or os.path.exists("/usr/sbin/clamd")


def elkscan(*args, **kwargs):
    return subprocess.run([*ELKSCAN, *args], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def samples(tmp_path):
    write_samples(tmp_path)
    return tmp_path


def test_scan_detects_every_sample_and_no_lookalike(samples):
    out = elkscan("scan", str(samples), "--format", "jsonl")
    assert out.returncode == 1, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    detected = {Path(r["path"]).name: r["signature"] for r in records}
    assert detected == {name: rule for name, (_, rule) in SAMPLES.items() if rule}
    eicar = next(r for r in records if r["path"].endswith("eicar.com"))
    assert (eicar["kind"], eicar["engine"], eicar["types"], eicar["class"], eicar["name"]) == (
        "finding", "yara", "Multios", "TestFile", "Eicar")
    assert eicar["hit_data"] == ["$eicar,0,68"] and eicar["static_file"] == str(samples / "eicar.com")
    assert eicar["md5_hash"] == hashlib.md5(SAMPLES["eicar.com"][0]).hexdigest() and eicar["exe_size"] == 68
    assert "in 8 file(s)" in out.stderr
    if CLAMD:  # the default pipeline's optional ClamAV engine, with the project's signatures
        assert all({d["engine"] for d in r["detections"]} == {"yara", "clamav"} for r in records)


def test_clean_scan_exits_zero_and_all_lists_clean_files(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing to see\n")
    out = elkscan("scan", str(tmp_path), "--format", "jsonl", "--all")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["types"] == "not_detected"


def test_table_format_is_for_people(samples):
    out = elkscan("scan", str(samples / "eicar.com"), "--format", "table")
    assert out.returncode == 1
    header, row = out.stdout.splitlines()[:2]
    assert header.split() == ["RESULT", "SIGNATURE", "ENGINE", "PATH"]
    assert row.split() == ["detected", "Multios_TestFile_Eicar", "yara", str(samples / "eicar.com")]


def test_missing_path_is_an_error_but_the_rest_is_scanned(samples):
    out = elkscan("scan", str(samples / "eicar.com"), str(samples / "nope"), "-q")
    assert out.returncode == 1 and "nope: no such file or directory" in out.stderr
    out = elkscan("scan", str(samples / "nope"), "-q")
    assert out.returncode == 2


def test_malformed_pipeline_is_one_line_with_its_yaml_path_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nplugins: [yara_backend]\nengines:\n  - use: yara\n    with: {timeout: soon}\n")
    out = elkscan("validate", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "engines[0].with.timeout" in out.stderr and "duration" in out.stderr
    assert "Traceback" not in elkscan("-v", "validate", str(bad)).stderr
    assert "Traceback" in elkscan("-vv", "validate", str(bad)).stderr


def test_unknown_component_suggests_the_plugin(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nengines: [clamav]\n")
    out = elkscan("validate", str(bad))
    assert out.returncode == 2
    assert "engines[0].use: unknown engine 'clamav'" in out.stderr and "clamav_backend" in out.stderr


def test_shipped_pipelines_validate():
    for pipeline in sorted(Path(__file__).resolve().parents[1].glob("pipelines/*.yaml")):
        out = elkscan("validate", str(pipeline))
        assert out.returncode == 0, out.stderr


def test_plugins_lists_every_installed_plugin():
    out = elkscan("plugins")
    assert out.returncode == 0, out.stdout
    listed = {line.split()[0] for line in out.stdout.splitlines()[1:]}
    plugins_dir = Path(__file__).resolve().parents[1] / "plugins"
    assert {p.name for p in plugins_dir.iterdir() if (p / "pyproject.toml").exists()} <= listed
    assert {"dirscan", "procscan"} <= listed


def test_help_and_version():
    assert elkscan("--version").stdout.startswith("elkscan ")
    out = elkscan("scan", "--help")
    assert out.returncode == 0 and "--format" in out.stdout


def test_sigterm_stops_a_long_scan_in_order(tmp_path):
    for i in range(5000):
        (tmp_path / f"f{i}.sh").write_text("#!/bin/sh\necho ok\n")
    # unbuffered: readline() then takes the first line byte by byte, and communicate(), which reads the
    # descriptor itself, gets every byte after it (a buffered readline kept the rest of its chunk, so the
    # output seemed to start mid-line whenever the scan was ahead of the reader)
    proc = subprocess.Popen([*ELKSCAN, "scan", str(tmp_path), "-a", "-f", "jsonl", "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.readline()  # the scan is under way: the first of 5,000 records
    proc.send_signal(signal.SIGTERM)
    out, err = (stream.decode() for stream in proc.communicate(timeout=30))
    assert "(interrupted)" in err and proc.returncode == 2 and "elkscan: scanned" in err
    lines = [first.decode().rstrip("\n"), *out.splitlines()]
    assert all(line.startswith("{") and line.endswith("}") for line in lines)  # whole lines only


def test_a_slow_reader_at_a_stop_gets_whole_lines_and_is_told_what_was_not_written(tmp_path):
    for i in range(5000):
        (tmp_path / f"f{i}.sh").write_text("#!/bin/sh\necho ok\n")
    proc = subprocess.Popen([*ELKSCAN, "scan", str(tmp_path), "-a", "-f", "jsonl", "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(6)  # nobody reads: the pipe and the sink's queue fill, and the scan waits for them
    proc.send_signal(signal.SIGTERM)
    out = b""
    while chunk := os.read(proc.stdout.fileno(), 1000):  # slower than the sink writes: still busy at 3 s
        out += chunk
        time.sleep(0.01)
    err = proc.communicate(timeout=30)[1].decode()
    lines = out.decode().splitlines()
    assert lines and all(line.startswith("{") and line.endswith("}") for line in lines)
    assert re.search(r"sink 'stdout' did not finish within 3s of the stop; leaving it with \d+ record\(s\) "
                     "not written", err) and proc.returncode == 2


def test_demo_writes_samples_and_detects_them(tmp_path):
    out = elkscan("demo", str(tmp_path / "demo"), "-f", "jsonl",
                  env={**os.environ, "ELKSCAN_STATE_DIR": str(tmp_path / "state")})
    assert out.returncode == 1, out.stderr
    hits = {Path(json.loads(line)["path"]).name for line in out.stdout.splitlines()
            if str(tmp_path) in line}
    assert hits == {name for name, (_, rule) in SAMPLES.items() if rule}


def test_progress_goes_to_a_terminal_stderr_only(tmp_path):
    import pty

    for i in range(3000):
        (tmp_path / f"f{i}.sh").write_text("#!/bin/sh\necho ok\n" * 50)
    master, slave = pty.openpty()
    proc = subprocess.Popen([*ELKSCAN, "scan", str(tmp_path), "-f", "jsonl", "-w", "1"],
                            stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 0 and out == b""  # nothing extra on stdout
    assert b"files \xc2\xb7" in seen and b"elkscan: scanned 3,000 files" in seen
