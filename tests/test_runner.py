"""The runner's isolation: components that crash, hang or return garbage cost one error on one record."""

import threading
import time

import pytest

from elkscan_core import (ComponentError, Detection, Engine, Enricher, Sink, Source, Target, hookimpl)
from elkscan_core.errors import Stop
from elkscan_core.testing import run


class Flag(Engine):
    """Detects files whose content contains 'bad'."""
    id = "flag"

    def scan(self, subject):
        return [Detection.from_signature(self.id, "Txt.Test.Bad")] if b"bad" in subject.read(4096) else []


class Crash(Engine):
    id = "crash"

    def scan(self, subject):
        raise RuntimeError("engine exploded")


class Hang(Engine):
    id = "hang"
    call_timeout = 0.3

    def scan(self, subject):
        time.sleep(30)
        return [Detection.from_signature(self.id, "never.seen.Result")]


class Stopper(Engine):
    """Ends the session (``errors.Stop``, or what ``raises`` names) on a file that says 'stop'."""
    id = "stopper"
    raises = Stop

    def scan(self, subject):
        if b"stop" in subject.read(4096):
            raise self.raises()
        return []


class Garbage(Engine):
    id = "garbage"

    def scan(self, subject):
        return "not a list of detections"


class Size(Enricher):
    id = "size"
    wants = "all"

    def enrich(self, subject, detections):
        return {"exe_size": subject.size}


class BadEnricher(Enricher):
    id = "badenricher"

    def enrich(self, subject, detections):
        return ["not", "a", "mapping"]


class NeedsDaemon(Engine):
    id = "needsdaemon"
    closed = 0

    def start(self):
        raise ComponentError("daemon not installed")

    def close(self):
        NeedsDaemon.closed += 1


class Events:
    """Records which lifecycle hooks ran."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def elkscan_register_engines(self, registry):
        for cls in (Flag, Crash, Hang, Stopper, Garbage, NeedsDaemon):
            registry.add(cls)

    @hookimpl
    def elkscan_register_enrichers(self, registry):
        registry.add(Size)
        registry.add(BadEnricher)

    @hookimpl
    def elkscan_configure(self, pipeline):
        self.calls.append(("configure", len(pipeline.engines)))

    @hookimpl
    def elkscan_session_start(self, session):
        self.calls.append(("start", [e.id for e in session.engines]))

    @hookimpl
    def elkscan_component_error(self, session, outcome):
        self.calls.append(("error", outcome.component, outcome.status))

    @hookimpl
    def elkscan_session_finish(self, session, summary):
        self.calls.append(("finish", summary.files))


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"this is bad content")
    (tmp_path / "good.txt").write_bytes(b"this is fine content")
    return tmp_path


def scan(tree, engines, enrichers=(), **kwargs):
    events = Events()
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}],
                "engines": [e if isinstance(e, dict) else {"use": e} for e in engines],
                "enrichers": [{"use": e} for e in enrichers]}
    return run(pipeline, extra_plugins=[events], **kwargs), events.calls


def test_a_crashing_engine_costs_an_error_not_the_scan(tree):
    result, calls = scan(tree, ["crash", "flag"])
    assert result.detected == {str(tree / "bad.txt"): ["Txt.Test.Bad"]}
    assert result.summary.files == 2 and result.summary.errors == 2
    bad = next(r for r in result.records if r.target.path.endswith("bad.txt"))
    assert bad.errors[0].component == "crash" and "engine exploded" in bad.error
    assert ("error", "crash", "failed") in calls


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a worker that died
def test_a_hanging_engine_times_out_and_the_target_goes_on(tree):
    result, calls = scan(tree, ["hang", "flag"], enrichers=["size"])
    assert result.detected == {str(tree / "bad.txt"): ["Txt.Test.Bad"]}
    bad = next(r for r in result.records if r.target.path.endswith("bad.txt"))
    assert bad.errors[0].status == "timeout" and bad.facts["exe_size"] == 19
    assert calls.count(("error", "hang", "timeout")) == 2
    assert result.summary.elapsed < 15  # the run did not wait for the stuck calls (30 s each)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a worker that died
@pytest.mark.parametrize("raises", [Stop, KeyboardInterrupt])
def test_an_engine_that_raises_stop_ends_the_session_in_order(tree, raises, monkeypatch):
    """errors.Stop (or KeyboardInterrupt) from an engine's call stops a periodic walk that would otherwise
    run for an hour: its target is abandoned, the other one is judged or abandoned, no worker dies."""
    monkeypatch.setattr(Stopper, "raises", raises)
    (tree / "stop.txt").write_bytes(b"please stop now")
    events, box = Events(), {}
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False,
                                                        "every": "1h"}}],
                "engines": [{"use": "stopper"}, {"use": "flag"}], "limits": {"workers": 2}}
    thread = threading.Thread(target=lambda: box.update(result=run(pipeline, extra_plugins=[events])))
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the session did not stop"
    result = box["result"]
    assert result.summary.interrupted and result.summary.abandoned >= 1
    assert result.summary.files + result.summary.abandoned <= 3 and result.summary.errors == 0
    assert not any(r.target.path.endswith("stop.txt") for r in result.records)
    assert result.session.workers_alive == 0 and not result.session._calls


def test_garbage_results_are_named_not_trusted(tree):
    result, _ = scan(tree, ["garbage", "flag"], enrichers=["badenricher"])
    bad = next(r for r in result.records if r.target.path.endswith("bad.txt"))
    statuses = {(o.component, o.status) for o in bad.errors}
    assert statuses == {("garbage", "garbage"), ("badenricher", "garbage")}
    assert "expected a list of Detection" in bad.error and "expected a mapping" in bad.error


def test_a_mapping_from_an_engine_is_named_as_such():
    from elkscan_core.isolation import check_result
    assert check_result(Garbage(None, None), {"Txt.Test.Bad": 1}) == (
        None, "returned dict, expected a list of Detection")


def test_lifecycle_hooks_run_in_order(tree):
    result, calls = scan(tree, ["flag"])
    assert calls[0] == ("configure", 1) and calls[1] == ("start", ["flag"])
    assert calls[-1] == ("finish", 2)


def test_an_optional_component_that_cannot_start_is_dropped(tree, caplog):
    closed = NeedsDaemon.closed
    result, calls = scan(tree, [{"use": "needsdaemon", "optional": True}, "flag"])
    assert result.detected and ("start", ["flag"]) in calls
    assert "daemon not installed" in caplog.text
    assert NeedsDaemon.closed == closed + 1  # what it acquired before failing is released


def test_a_required_component_that_cannot_start_stops_startup(tree):
    with pytest.raises(ComponentError, match=r"engines\[0\] \(needsdaemon\): daemon not installed"):
        scan(tree, ["needsdaemon"])


def test_enrichers_run_on_hits_unless_they_want_all(tree):
    result, _ = scan(tree, ["flag"], enrichers=["size"], report_clean=True)
    assert {r.target.path.rsplit("/", 1)[1]: r.facts.get("exe_size") for r in result.records} == {
        "bad.txt": 19, "good.txt": 20}


def test_bounded_queue_applies_backpressure_and_loses_nothing(tmp_path):
    for i in range(300):
        (tmp_path / f"f{i}.txt").write_bytes(b"bad" if i % 3 == 0 else b"okay")
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path): 1}, "type_filter": False,
                                                         "min_size": 1}}],
                "engines": [{"use": "flag"}], "limits": {"queue": 2, "workers": 3}}
    result = run(pipeline, extra_plugins=[Events()])
    assert result.summary.files == 300 and len(result.detected) == 100


class Forever(Source):
    """A monitor: yields a target now and then until stopped."""
    id = "forever"

    def targets(self):
        while not self.stopping.wait(0.05):
            yield Target(path=self.session.pipeline.resolve_path("bad.txt"))


class SlowSink(Sink):
    id = "slow"

    def start(self):
        self.seen = []

    def write(self, record):
        self.seen.append(record)


class MonitorPlugin(Events):
    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Forever)


def test_stop_ends_a_monitor_in_order(tree):
    from elkscan_core import build_session, make_plugin_manager, parse_pipeline

    pm = make_plugin_manager([])
    pm.register(MonitorPlugin())
    pipeline = parse_pipeline({"version": 1, "sources": ["forever"], "engines": ["flag"]}, base_dir=str(tree))
    session = build_session(pipeline, pm)
    threading.Timer(0.4, session.stop).start()
    summary = session.run()
    assert summary.interrupted and summary.detections >= 2


class ClosedSink(Sink):
    id = "closed"

    def write(self, record):
        raise BrokenPipeError


class ClosedPlugin(MonitorPlugin):
    @hookimpl
    def elkscan_register_sinks(self, registry):
        registry.add(ClosedSink)


def test_a_closed_output_stops_the_session(tree):
    from elkscan_core import build_session, make_plugin_manager, parse_pipeline

    pm = make_plugin_manager([])
    pm.register(ClosedPlugin())
    pipeline = parse_pipeline({"version": 1, "sources": ["forever"], "engines": ["flag"], "sinks": ["closed"]},
                              base_dir=str(tree))
    summary = build_session(pipeline, pm).run()  # would run forever if the broken pipe were ignored
    assert summary.interrupted


class Asking(Source):
    """A source whose targets ask to be reported even when clean (as an Elkeid task's files do)."""
    id = "asking"

    def targets(self):
        yield Target(path=self.session.pipeline.resolve_path("good.txt"), report_clean=True)


class HitsOnly(Enricher):
    id = "hitsonly"

    def enrich(self, subject, detections):
        return {"enriched": True}


class AskingPlugin(Events):
    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Asking)

    @hookimpl
    def elkscan_register_enrichers(self, registry):
        super().elkscan_register_enrichers(registry)
        registry.add(HitsOnly)


def test_hits_only_enrichers_also_describe_targets_that_ask_to_be_reported(tree):
    result = run({"sources": ["asking"], "engines": ["flag"], "enrichers": ["hitsonly"]},
                 extra_plugins=[AskingPlugin()], base_dir=str(tree))
    (record,) = result.records
    assert not record.detections and record.facts == {"enriched": True}
