"""Canaries: an engine that has stopped detecting says so, as an ERROR record, a metric and the health
gauge; the canary comes from memory, never from a file on disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from elkscan_core import EICAR, LOG, Canary, ConfigError, Detection, Engine, Source, Target, hookimpl
from elkscan_core import canary_watch
from elkscan_core import parse_pipeline
from elkscan_core.testing import eicar, run, scrape
from elkscan_core.trust import UntrustedError

ELKSCAN = [sys.executable, "-m", "elkscan_core.cli"]
NO_EICAR = 'rule Our_Marker { strings: $a = "our-own-marker" condition: $a }\n'


def user_rules(tmp_path):
    rules = tmp_path / "ours.yar"
    rules.write_text(NO_EICAR)
    return rules


def test_a_yara_rule_set_without_eicar_is_an_error_record_a_metric_and_unhealthy(tmp_path, live):
    """``elkscan run`` with a user rule set that cannot detect EICAR and no opt-out: the canary at start
    says so on stdout (a ``log`` record with the error), in the metrics and in the health gauge, and
    keeps saying so at each ``canary_every``."""
    watched = tmp_path / "files"
    watched.mkdir()
    (watched / "a.txt").write_text("nothing to see here\n")
    pipeline = live.pipeline(tmp_path / "p.yaml", {
        "plugins": ["yara_backend", "stdout_sink"],
        "sources": [{"use": "dirscan", "with": {"roots": {str(watched): -1}, "every": "1h"}}],
        "engines": [{"use": "yara", "with": {"rules": [str(user_rules(tmp_path))]}}],
        "sinks": [{"use": "stdout", "with": {"format": "jsonl"}}],
        "metrics": {"listen": "127.0.0.1:0"}, "canary_every": "1s"})
    proc, url = live.start(pipeline, {"ELKSCAN_STATE_DIR": str(tmp_path / "state")})
    try:
        first = yaml.safe_load(proc.stdout.readline())  # JSON is YAML
        got = live.wait_for(lambda: (lambda s: s if s.value("elkscan_canary_checks_total", engine="yara") >= 2
                                else None)(scrape(url)))
        assert got.value("elkscan_canary_ok", engine="yara") == 0
        assert got.value("elkscan_healthy") == 0
        assert got.value("elkscan_up") == 1
        assert got.value("elkscan_canary_failures_total", engine="yara") >= 2
        assert got.value("elkscan_component_errors_total", component="yara", status="failed") >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert first["kind"] == LOG and first["level"] == "ERROR" and first["target"] == "elkscan.canary"
    assert first["engine"] == "yara"
    assert first["msg"] == ("yara: canary: the EICAR test string came back clean; this engine may have "
                            "stopped detecting")
    assert first["error"] == "yara: failed: " + first["msg"][len("yara: "):]
    assert "status" not in first  # an operator's record, not a file's verdict
    again = [yaml.safe_load(line) for line in out.splitlines()]
    assert any(r["kind"] == LOG and r["engine"] == "yara" for r in again)  # repeated every canary_every


def test_the_builtin_rules_pass_and_an_opted_out_engine_is_not_shown_one(tmp_path):
    rules = user_rules(tmp_path)
    result = run({"plugins": ["yara_backend"], "canary_every": "1h",
                  "engines": ["yara", {"use": "yara", "with": {"rules": [str(rules)]}, "canary": "none"}]})
    state = result.session.canaries.state
    assert state == {"yara": {"ok": True, "checked": pytest.approx(time.time(), abs=60), "checks": 1,
                              "failures": 0}}
    assert result.session.healthy and result.summary.errors == 0 and result.records == []


def test_a_sample_of_our_own_rules_is_the_canary_a_pipeline_names(tmp_path):
    rules = user_rules(tmp_path)
    sample = tmp_path / "canary.bin"
    sample.write_bytes(b"x our-own-marker x")
    engines = [{"use": "yara", "with": {"rules": [str(rules)]},
                "canary": {"file": str(sample), "signature": "Our_Marker"}},
               {"use": "yara", "with": {"rules": [str(rules)]},
                "canary": {"file": str(sample), "signature": "Their_Marker"}}]
    result = run({"plugins": ["yara_backend"], "canary_every": "1h", "engines": engines})
    assert result.session.canaries.state["yara"]["ok"]
    assert not result.session.canaries.state["yara#1"]["ok"]
    [record] = result.records
    assert record.facts["msg"] == ("yara#1: canary: the canary sample canary.bin came back as Our_Marker, not "
                                   "Their_Marker; this engine may have stopped detecting")
    assert result.summary.errors == 1 and not result.session.healthy


def test_a_canary_sample_another_user_can_change_is_refused(tmp_path):
    sample = tmp_path / "canary.bin"
    sample.write_bytes(b"our-own-marker")
    os.chmod(sample, 0o666)
    with pytest.raises(UntrustedError, match=r"canary sample .*canary\.bin is world-writable"):
        run({"plugins": ["yara_backend"], "engines": [{"use": "yara", "canary": {"file": str(sample)}}]})


@pytest.mark.parametrize("entry,problem", [
    ({"use": "yara", "canary": "sometimes"}, "engines[0].canary: expected none, eicar or {file"),
    ({"use": "yara", "canary": {"file": "x", "rule": "y"}}, r"engines\[0\].canary: unknown key\(s\) rule"),
    ({"use": "yara", "canary": {"file": "x", "signature": 3}}, r"engines\[0\].canary.signature: expected"),
    ({"use": "yara", "canary": {"signature": "x"}}, "engines[0].canary: expected none, eicar or {file"),
])
def test_a_malformed_canary_entry_names_its_place(entry, problem):
    with pytest.raises(ConfigError, match=problem if "\\" in problem else problem.replace("[", r"\[")
                       .replace("{", r"\{")):
        parse_pipeline({"version": 1, "engines": [entry]})


def test_only_engines_take_a_canary_and_canary_every_is_a_duration():
    with pytest.raises(ConfigError, match=r"sinks\[0\].canary: only an engine has a canary"):
        parse_pipeline({"version": 1, "sinks": [{"use": "stdout", "canary": "none"}]})
    with pytest.raises(ConfigError, match="canary_every: expected a duration"):
        parse_pipeline({"version": 1, "canary_every": "hourly"})
    assert parse_pipeline({"version": 1}).canary_every == 3600
    assert parse_pipeline({"version": 1, "canary_every": 0}).canary_every == 0


# -- engines that break while the session runs ---------------------------------------------------------

class Probe(Engine):
    """A real-enough engine: detects EICAR by content until told to forget; notes what it was given."""

    id = "probe"
    call_timeout = 2.0
    working = True
    flags_everything = False
    hangs = False
    seen: list

    def scan(self, subject):
        data = subject.read(1 << 16)
        type(self).seen.append((os.readlink(subject.fd_path), subject.path, data))
        if type(self).hangs:
            time.sleep(5)
        if type(self).flags_everything or (type(self).working and data == eicar()):
            return [Detection.from_signature(self.id, "Eicar_Test_File", yara_rule=True)]
        return []


class Idle(Source):
    """Keeps the session alive until the test ends it."""

    id = "idle"

    def targets(self):
        self.stopping.wait(60)
        return iter(())


class _Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Probe)

    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Idle)


def _session_thread(live, pipeline: dict, plugin=None):
    sessions, box = [], {}

    class Capture:
        @hookimpl
        def elkscan_session_start(self, session):
            sessions.append(session)

    def go():
        box["result"] = run({"sources": ["idle"], "engines": ["probe"], **pipeline},
                            extra_plugins=[plugin or _Plugin(), Capture()])

    thread = threading.Thread(target=go)
    thread.start()
    live.wait_for(lambda: sessions)
    return sessions[0], thread, box


@pytest.fixture
def probe():
    Probe.working, Probe.flags_everything, Probe.hangs, Probe.seen = True, False, False, []
    yield Probe


def test_an_engine_that_stops_detecting_says_so_at_the_next_canary_and_recovers(probe, caplog, live):
    session, thread, box = _session_thread(live, {"canary_every": "200ms", "metrics": {"listen": "127.0.0.1:0"}})
    try:
        live.wait_for(lambda: session.canaries.state.get("probe", {}).get("checks", 0) >= 1)
        assert session.healthy and scrape(session).value("elkscan_healthy") == 1
        probe.working = False  # e.g. its rules were swapped for a set that misses what it must find
        live.wait_for(lambda: not session.healthy)
        got = scrape(session)
        assert got.value("elkscan_healthy") == 0 and got.value("elkscan_canary_ok", engine="probe") == 0
        probe.working = True
        live.wait_for(lambda: session.healthy)
        assert scrape(session).value("elkscan_canary_ok", engine="probe") == 1
    finally:
        session.stop()
        thread.join(30)
    failures = [r for r in box["result"].records if r.kind == LOG]
    assert failures and all(r.errors[0].component == "probe" for r in failures)
    assert "engine 'probe' passes its canary again" in caplog.text


def test_the_canary_is_handed_over_from_memory_sealed_never_from_a_file(probe):
    result = run({"engines": ["probe"], "canary_every": "1h"}, extra_plugins=[_Plugin()])
    assert result.session.healthy
    (link, path, data), (clean_link, clean_path, clean) = probe.seen
    assert link.startswith("/memfd:<canary>") and clean_link.startswith("/memfd:<clean canary>")
    assert (path, data) == ("<canary>", eicar()) and clean == canary_watch.CLEAN
    fd = canary_watch._memfd(b"abc", "probe")
    try:
        with pytest.raises(OSError) as raised:
            os.write(fd, b"x")
        assert raised.value.errno == errno.EPERM  # sealed: no one can change what the engine is shown
    finally:
        os.close(fd)


def test_an_engine_that_flags_the_clean_buffer_fails_its_canary(probe):
    probe.flags_everything = True
    result = run({"engines": ["probe"], "canary_every": "1h"}, extra_plugins=[_Plugin()])
    [record] = result.records
    assert record.facts["msg"] == ("probe: canary: a clean buffer came back as Eicar_Test_File; this engine "
                                   "may have stopped detecting")


def test_a_hung_engine_fails_its_canary_within_its_call_timeout(probe):
    probe.hangs = True
    started = time.monotonic()
    result = run({"engines": ["probe"], "canary_every": "1h"}, extra_plugins=[_Plugin()])
    assert time.monotonic() - started < 30
    [record] = result.records
    assert "the canary scan failed: TimeoutError: no answer after 2s" in record.facts["msg"]


def test_one_shot_scans_show_no_canary(tmp_path, probe, live):
    """``elkscan scan`` and ``testing.run`` are one-shot: a user rule set without EICAR is no error."""
    (tmp_path / "f").write_text("our-own-marker\n")
    pipeline = live.pipeline(tmp_path / "p.yaml", {"plugins": ["yara_backend"],
                                                    "engines": [{"use": "yara", "with": {"rules": [
                                                        str(user_rules(tmp_path))]}}]})
    out = subprocess.run([*ELKSCAN, "scan", "-q", "-f", "jsonl", "-p", str(pipeline), str(tmp_path / "f")],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ELKSCAN_STATE_DIR": str(tmp_path / "state")})
    assert out.returncode == 1 and "canary" not in out.stdout + out.stderr
    result = run({"engines": ["probe"]}, extra_plugins=[_Plugin()])
    assert result.session.canaries is None and probe.seen == []


def test_engines_say_what_their_canary_is():
    from elkscan_hash_extractor.engine import HashlistEngine
    from elkscan_yara_backend.engine import YaraEngine

    assert YaraEngine.canary is EICAR  # its builtin rules know EICAR; a user rule set may not
    assert HashlistEngine.canary is None  # it knows only what its lists name
    assert Canary(b"x", "x", ("A",)).problem((Detection("e", "B"),)) == "x came back as B, not A"


class Stuck(Probe):
    id = "stuck"
    call_timeout = 120.0


class _StuckPlugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Stuck)

    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Idle)


def test_a_stop_does_not_wait_for_a_hung_canary_and_its_answer_is_dropped(probe, live):
    probe.hangs = True  # each canary call takes 5 s; the engine's own deadline is 120 s
    session, thread, box = _session_thread(live, {"engines": ["stuck"], "canary_every": "1h"},
                                           plugin=_StuckPlugin())
    live.wait_for(lambda: probe.seen, timeout=30)  # the first canary is in the engine now
    started = time.monotonic()
    session.stop()
    thread.join(30)
    assert time.monotonic() - started < 4  # neither the 5 s call nor its 120 s deadline held the stop
    assert box["result"].records == [] and session.canaries.state == {}
