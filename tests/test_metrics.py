"""The Prometheus endpoint: scraped over real HTTP from a running ``elkscan run`` and from sessions, and
parsed with prometheus-client's own parsers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error

import pytest
from elkscan_core import ConfigError, Engine, Measure, Source, Target, hookimpl, parse_pipeline
from elkscan_core.testing import SAMPLES, run, scrape, write_samples

ELKSCAN = [sys.executable, "-m", "elkscan_core.cli"]


def test_elkscan_run_serves_openmetrics_during_a_periodic_scan(tmp_path, live):
    samples = tmp_path / "samples"
    write_samples(samples)
    (samples / "tiny").write_bytes(b"abc")  # below dirscan's min_size: not scanned, by reason
    pipeline = live.pipeline(tmp_path / "p.yaml", {
        "plugins": ["yara_backend", "stdout_sink"],
        "sources": [{"use": "dirscan", "with": {"roots": {str(samples): -1}, "every": "1s"}}],
        "engines": ["yara"], "sinks": [{"use": "stdout", "with": {"format": "jsonl"}}],
        "metrics": {"listen": "127.0.0.1:0"}})
    proc, url = live.start(pipeline, {"ELKSCAN_STATE_DIR": str(tmp_path / "state")})
    try:
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        # two passes of the walk: every counter has moved while the scanner runs
        got = live.wait_for(lambda: (lambda s: s if (s.value("elkscan_files_total") or 0) >= 2 * len(SAMPLES)
                                else None)(scrape(url)))
        hits = sum(1 for _, rule in SAMPLES.values() if rule)
        assert got.value("elkscan_up") == 1
        assert got.value("elkscan_healthy") == 1
        assert got.value("elkscan_canary_ok", engine="yara") == 1  # checked at start: builtin rules know EICAR
        assert got.value("elkscan_detections_total") >= 2 * hits
        assert got.value("elkscan_detected_files_total") >= 2 * hits
        assert got.value("elkscan_ignored_detections_total") == 0  # no ignore_signatures
        assert got.value("elkscan_clean_files_total") >= 2 * (len(SAMPLES) - hits)
        assert got.value("elkscan_judged_bytes_total") >= 2 * sum(len(c) for c, _ in SAMPLES.values())
        assert got.value("elkscan_not_scanned_total", reason="below min_size") >= 2
        assert got.value("elkscan_errors_total") == 0
        assert got.value("elkscan_cache_hits_total") == 0
        assert got.value("elkscan_engine_scan_seconds_count", engine="yara") >= 2 * len(SAMPLES)
        assert got.families["elkscan_engine_scan_seconds"].type == "histogram"
        assert got.value("elkscan_engine_scan_seconds_bucket", engine="yara", le="+Inf") >= 2 * len(SAMPLES)
        assert got.value("elkscan_queue_capacity") == 64
        assert got.value("elkscan_queue_depth") is not None
        assert got.value("elkscan_workers") == 2
        assert got.value("elkscan_memory_tight") == 0 and got.value("elkscan_under_pressure") == 0
        assert got.value("elkscan_throttled_seconds_total") == 0
        assert got.value("elkscan_sink_up", sink="stdout") == 1
        assert got.value("elkscan_build_info") == 1
        assert got.value("process_resident_memory_bytes") > 0
        assert scrape(url, openmetrics=False).value("elkscan_up") == 1  # the classic text format too
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with pytest.raises(urllib.error.URLError):  # the server stopped with the session
        scrape(url)


def test_a_port_in_use_stops_start_up_with_one_line(tmp_path, live):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    (tmp_path / "f").write_bytes(b"hello world")
    pipeline = live.pipeline(tmp_path / "p.yaml", {
        "plugins": ["yara_backend"], "engines": ["yara"],
        "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path / "f"): 0}}}],
        "metrics": {"listen": f"127.0.0.1:{port}"}})
    try:
        proc = subprocess.run([*ELKSCAN, "run", str(pipeline)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "ELKSCAN_STATE_DIR": str(tmp_path / "state")})
    finally:
        taken.close()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"elkscan: error: metrics: cannot listen on 127.0.0.1:{port}: "
                                                    "Address already in use")


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "127.8.9.10:1", "[::1]:9464", "localhost:9464"])
def test_loopback_addresses_are_accepted(listen):
    assert parse_pipeline({"version": 1, "metrics": {"listen": listen}}).metrics.listen == listen


def test_metrics_are_off_by_default_and_on_with_an_empty_mapping():
    assert parse_pipeline({"version": 1}).metrics is None
    assert parse_pipeline({"version": 1, "metrics": None}).metrics is None
    assert parse_pipeline({"version": 1, "metrics": {}}).metrics.address == ("127.0.0.1", 9464)


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "192.0.2.7:9464"])
def test_an_address_other_hosts_reach_needs_public_true(listen):
    with pytest.raises(ConfigError, match=r"metrics\.listen: .* is reachable from other hosts.*public: true"):
        parse_pipeline({"version": 1, "metrics": {"listen": listen}})
    assert parse_pipeline({"version": 1, "metrics": {"listen": listen, "public": True}}).metrics.public


@pytest.mark.parametrize("listen,problem", [
    ("9464", "expected host:port"), (":9464", "expected host:port"), ("127.0.0.1:65536", "expected host:port"),
    ("127.0.0.1:http", "expected host:port"), ("metrics.example:9464", "expected an IP address or localhost"),
])
def test_a_bad_listen_address_names_the_problem(listen, problem):
    with pytest.raises(ConfigError, match=rf"metrics\.listen: {problem}"):
        parse_pipeline({"version": 1, "metrics": {"listen": listen}})


def test_unknown_metrics_options_are_refused():
    with pytest.raises(ConfigError, match=r"metrics: unknown key\(s\) port"):
        parse_pipeline({"version": 1, "metrics": {"port": 9464}})


# -- what components contribute: Component.metrics() -------------------------------------------------

class Counting(Source):
    """Yields a few targets, then waits until the test has scraped, reporting its own measures."""

    id = "counting"
    scraped: threading.Event

    def targets(self):
        self.sent = 0
        for path in self.config_paths:
            self.sent += 1
            yield Target(path)
        type(self).ready.set()
        type(self).scraped.wait(30)

    def metrics(self):
        return [Measure("counting_sent", self.sent, "counter", "Targets this source sent"),
                Measure("counting_lag_seconds", 1.5, labels={"queue": "main"})]


class Broken(Source):
    id = "broken"

    def targets(self):
        return iter(())

    def metrics(self):
        raise RuntimeError("counter store is gone")


class Greedy(Source):
    """Claims a core metric's name: its measure is refused, the rest of the scrape is served."""

    id = "greedy"

    def targets(self):
        return iter(())

    def metrics(self):
        return [Measure("files", 10**9, "counter")]


class Nothing(Engine):
    id = "nothing"
    canary = None

    def scan(self, subject):
        return []


class _Plugin:
    @hookimpl
    def elkscan_register_sources(self, registry):
        for cls in (Counting, Broken, Greedy):
            registry.add(cls)

    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Nothing)


def test_components_report_their_own_measures_and_a_broken_one_costs_only_its_own(tmp_path, caplog, live):
    files = []
    for n in range(3):
        (tmp_path / f"f{n}").write_bytes(b"data")
        files.append(str(tmp_path / f"f{n}"))
    Counting.config_paths = files
    Counting.ready, Counting.scraped = threading.Event(), threading.Event()
    box = {}
    sessions = []

    class Capture:
        @hookimpl
        def elkscan_session_start(self, session):
            sessions.append(session)

    def scan():
        box["result"] = run({"sources": ["counting", "broken", "greedy"], "engines": ["nothing"],
                             "metrics": {"listen": "127.0.0.1:0"}}, extra_plugins=[_Plugin(), Capture()])

    thread = threading.Thread(target=scan)
    thread.start()
    try:
        assert Counting.ready.wait(30)
        session = sessions[0]
        got = live.wait_for(lambda: (lambda s: s if s.value("elkscan_files_total") == 3 else None)(scrape(session)))
        assert got.value("elkscan_counting_sent_total", source="counting") == 3
        assert got.families["elkscan_counting_sent"].type == "counter"
        assert got.value("elkscan_counting_lag_seconds", source="counting", queue="main") == 1.5
        assert got.value("elkscan_files_total") == 3  # the core's, not the greedy source's
        assert "elkscan_canary_ok" in got.families and got.value("elkscan_canary_ok") is None  # opted out
        scrape(session)  # a second scrape logs nothing new about the broken ones
    finally:
        Counting.scraped.set()
        thread.join(30)
    warnings = [r.getMessage() for r in caplog.records if "metrics() failed" in r.getMessage()]
    assert sorted(warnings) == [
        "source 'broken': metrics() failed: RuntimeError: counter store is gone",
        "source 'greedy': metrics() failed: ValueError: elkscan_files is one of the core's metrics; name a "
        "component's measures after it"]
    assert box["result"].summary.files == 3


def test_a_flood_of_idle_connections_costs_no_thread_beyond_the_bound_and_scrapes_come_back(live, monkeypatch):
    """A local user opening connections by the hundred gets them closed: no thread each in the scanner, a
    silent one cut after the timeout, and the endpoint serves again once they are gone."""
    from elkscan_core import metrics

    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT", 1.0)
    Counting.config_paths = []
    Counting.ready, Counting.scraped = threading.Event(), threading.Event()
    sessions = []

    class Capture:
        @hookimpl
        def elkscan_session_start(self, session):
            sessions.append(session)

    thread = threading.Thread(target=run, args=({"sources": ["counting"], "engines": ["nothing"],
                                                 "metrics": {"listen": "127.0.0.1:0"}},),
                              kwargs={"extra_plugins": [_Plugin(), Capture()]})
    thread.start()
    try:
        assert Counting.ready.wait(30)
        session = sessions[0]
        before = threading.active_count()
        flood = [socket.create_connection(("127.0.0.1", session.metrics.port)) for _ in range(200)]
        time.sleep(0.5)
        assert threading.active_count() <= before + metrics.MAX_SCRAPES
        started = time.monotonic()
        for conn in flood:
            conn.settimeout(10)
            try:
                assert conn.recv(1) == b""  # closed by the server: at once, or after the timeout
            except ConnectionResetError:
                pass
            conn.close()
        assert time.monotonic() - started < 5
        assert live.wait_for(lambda: scrape(session).value("elkscan_up") == 1)
    finally:
        Counting.scraped.set()
        thread.join(30)


def test_the_metrics_module_says_how_to_install_prometheus_client(tmp_path):
    """Without the extra, a pipeline that asks for metrics stops with the fix, and one that does not
    never imports prometheus-client."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "prometheus_client.py").write_text("raise ImportError('No module named prometheus_client')\n")
    code = ("import sys; from elkscan_core.testing import run\n"
            "run({'engines': [], 'sources': []})\n"
            "assert 'prometheus_client' not in sys.modules or sys.modules['prometheus_client'].__file__.startswith("
            f"{str(hide)!r})\n"
            "try:\n    run({'metrics': {'listen': '127.0.0.1:0'}})\n"
            "except Exception as exc:\n    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": str(hide), "ELKSCAN_STATE_DIR": str(tmp_path / "s")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    fix = ("metrics: prometheus-client is not installed (No module named prometheus_client); "
           "pip install 'elkscan-core[metrics]'")
    assert out.stdout.strip() == fix, out.stderr
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nmetrics: {}\n")
    checked = subprocess.run([*ELKSCAN, "validate", str(pipeline)], capture_output=True, text=True, timeout=60,
                             env=env)  # what validate accepts, run runs
    assert (checked.returncode, checked.stderr.strip()) == (2, f"elkscan: error: {fix}")
