"""Receipts (FLEET.md): a target that came from a message is acked only once every sink has its record
(written and flushed), or when no record was wanted; nakked when a sink fails or is given up holding it,
or when the session stops first; always exactly once. Real sessions over real files, with the real file
and stdout sinks and the testing module's ``faulty`` sink."""

from __future__ import annotations

import json
import logging
import sys
import time

from elkscan_core import Detection, Engine, Record, Target, hookimpl
from elkscan_core.testing import Ledger, feed, run


class Flag(Engine):
    """Detects ``bad``; raises on ``boom``; takes its time on ``slow``."""

    id = "flag"

    def scan(self, subject):
        data = subject.read(4096)
        if b"boom" in data:
            raise RuntimeError("engine exploded")
        if b"slow" in data:
            time.sleep(0.05)
        return [Detection.from_signature(self.id, "Txt.Test.Bad")] if b"bad" in data else []

    def version(self):
        return "flag 1"


class Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Flag)


def files(tmp_path, **contents):
    """name=content files in tmp_path/tree; name -> path."""
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    paths = {}
    for name, content in contents.items():
        (tree / name).write_bytes(content)
        paths[name] = str(tree / name)
    return paths


def targets(ledger, paths, **kw):
    return [Target(path, receipt=ledger.receipt(name), **kw) for name, path in paths.items()]


def scan(tmp_path, items, sinks=None, **top):
    sinks = sinks if sinks is not None else [file_sink(tmp_path)]
    pipeline = {"plugins": ["file_sink", "stdout_sink"], "sources": [feed(items)], "engines": ["flag"],
                "sinks": sinks, "state_dir": str(tmp_path / "state"), **top}
    return run(pipeline, extra_plugins=[Plugin()], base_dir=str(tmp_path))


def file_sink(tmp_path, name="out.jsonl"):
    return {"use": "file", "with": {"path": str(tmp_path / name)}}


def paths_in(path):
    try:
        with open(path, "rb") as f:
            return {json.loads(line).get("path") for line in f.read().splitlines()}
    except FileNotFoundError:
        return set()


def test_a_detection_is_acked_once_the_file_sinks_file_holds_its_line(tmp_path):
    paths = files(tmp_path, a=b"bad one", b=b"bad two", c=b"bad three")
    out = tmp_path / "out.jsonl"
    ledger = Ledger(on_ack=lambda name: None if paths[name] in paths_in(out) else (_ for _ in ()).throw(
        AssertionError(f"{name} acked before the file held it")))
    result = scan(tmp_path, targets(ledger, paths))
    assert ledger.failures == []
    assert {name: ledger.outcome(name) for name in paths} == {"a": "ack", "b": "ack", "c": "ack"}
    assert paths_in(out) == set(paths.values()) and len(result.records) == 3


def test_a_clean_unreported_target_is_acked_without_a_record(tmp_path):
    paths = files(tmp_path, clean=b"fine", skipped=b"bad but skipped")
    ledger = Ledger()
    items = [Target(paths["clean"], receipt=ledger.receipt("clean")),
             Target(paths["skipped"], skip="excluded", receipt=ledger.receipt("skipped")),
             Target(str(tmp_path / "gone"), receipt=ledger.receipt("vanished"))]
    result = scan(tmp_path, items)
    assert result.records == [] and not (tmp_path / "out.jsonl").read_bytes()
    assert {n: ledger.outcome(n) for n in ("clean", "skipped", "vanished")} == {
        "clean": "ack", "skipped": "ack", "vanished": "ack"}


def test_reported_ends_are_acked_once_delivered_errors_and_required_not_scanned_too(tmp_path):
    paths = files(tmp_path, boom=b"boom", clean=b"fine", skipped=b"skipped")
    out = tmp_path / "out.jsonl"
    ledger = Ledger(on_ack=lambda name: None if paths[name] in paths_in(out) else (_ for _ in ()).throw(
        AssertionError(f"{name} acked before the file held it")))
    items = [Target(paths["boom"], receipt=ledger.receipt("boom")),
             Target(paths["clean"], report_clean=True, receipt=ledger.receipt("clean")),
             Target(paths["skipped"], skip="excluded", required=True, receipt=ledger.receipt("skipped"))]
    result = scan(tmp_path, items)
    assert sorted(r.status for r in result.records) == ["clean", "error", "not_scanned"]
    assert ledger.failures == []
    assert {n: ledger.outcome(n) for n in paths} == {"boom": "ack", "clean": "ack", "skipped": "ack"}


def test_a_sink_that_fails_on_a_record_gets_it_nakked(tmp_path):
    paths = files(tmp_path, a=b"bad one", b=b"bad two", c=b"bad three")
    ledger = Ledger()
    sinks = [file_sink(tmp_path), {"use": "faulty", "with": {"fail_on": [paths["b"]]}}]
    result = scan(tmp_path, targets(ledger, paths), sinks)
    assert {n: ledger.outcome(n) for n in paths} == {"a": "ack", "b": "nak", "c": "ack"}
    assert paths_in(tmp_path / "out.jsonl") == set(paths.values())  # the file sink had b: nak all the same
    assert result.summary.errors == 1


def test_a_flush_that_fails_naks_what_it_held(tmp_path):
    paths = files(tmp_path, a=b"bad one", b=b"bad two")
    ledger = Ledger()
    scan(tmp_path, targets(ledger, paths), [file_sink(tmp_path), {"use": "faulty", "with": {"fail_flush": True}}])
    assert {n: ledger.outcome(n) for n in paths} == {"a": "nak", "b": "nak"}


def test_a_hung_sink_given_up_naks_what_it_held_and_everything_after(tmp_path):
    paths = files(tmp_path, a=b"bad one", b=b"bad two", c=b"bad three", d=b"bad four")
    ledger = Ledger()

    def items(session):
        yield Target(paths["a"], receipt=ledger.receipt("a"))
        assert ledger.wait("a")  # flushed while the sink still answers
        yield Target(paths["b"], receipt=ledger.receipt("b"))  # the faulty sink hangs on it
        yield Target(paths["c"], receipt=ledger.receipt("c"))  # queued behind it
        assert ledger.wait("b", "c")
        assert not session.healthy  # given up
        yield Target(paths["d"], receipt=ledger.receipt("d"))  # after: the pipeline cannot deliver it everywhere

    sinks = [file_sink(tmp_path), {"use": "faulty", "with": {"hang_on": [paths["b"]], "call_timeout": 0.5}}]
    result = scan(tmp_path, items, sinks)
    assert {n: ledger.outcome(n) for n in paths} == {"a": "ack", "b": "nak", "c": "nak", "d": "nak"}
    assert paths_in(tmp_path / "out.jsonl") == set(paths.values())
    assert result.summary.elapsed < 15


def test_a_record_a_sink_does_not_have_yet_is_not_acked_and_a_stop_naks_it(tmp_path):
    paths = files(tmp_path, a=b"bad one")
    ledger = Ledger()

    def items(session):
        yield Target(paths["a"], receipt=ledger.receipt("a"))
        faulty = session.find("sink", "faulty")
        deadline = time.monotonic() + 30
        while not paths_in(tmp_path / "out.jsonl") and time.monotonic() < deadline:
            time.sleep(0.05)  # the file sink has it; the faulty one hangs on it
        time.sleep(1.0)  # many flush bounds
        assert ledger.outcome("a") == "" and faulty.records == []
        session.stop()

    sinks = [file_sink(tmp_path), {"use": "faulty", "with": {"hang_on": [paths["a"]]}}]
    result = scan(tmp_path, items, sinks)
    assert ledger.outcome("a") == "nak" and result.summary.interrupted


def test_targets_abandoned_by_a_stop_are_nakked_and_the_judged_ones_acked(tmp_path):
    paths = files(tmp_path, **{f"f{n}": b"bad slow" for n in range(60)})
    ledger = Ledger()

    def items(session):
        yield from targets(ledger, paths)
        deadline = time.monotonic() + 30
        while not any(ledger.calls.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        session.stop()

    result = scan(tmp_path, items, limits={"workers": 1})
    outcomes = [ledger.outcome(n) for n in paths]
    assert outcomes.count("nak") == result.summary.abandoned > 0
    assert outcomes.count("ack") == len(result.records) > 0
    assert paths_in(tmp_path / "out.jsonl") == {r.target.path for r in result.records}


def test_two_sinks_ack_only_once_both_have_it(tmp_path, monkeypatch):
    paths = files(tmp_path, a=b"bad one", b=b"bad two", clean=b"fine")
    out, stdout = tmp_path / "out.jsonl", tmp_path / "stdout.jsonl"
    monkeypatch.setattr(sys, "stdout", open(stdout, "w"))  # the stdout sink writes here

    def both_have_it(name):
        assert paths[name] in paths_in(out) and paths[name] in paths_in(stdout), f"{name} acked too early"

    ledger = Ledger(on_ack=both_have_it)
    items = [Target(paths["a"], receipt=ledger.receipt("a")), Target(paths["b"], receipt=ledger.receipt("b")),
             Target(paths["clean"], report_clean=True, receipt=ledger.receipt("clean"))]
    try:
        scan(tmp_path, items, [file_sink(tmp_path), {"use": "stdout", "with": {"format": "jsonl"}}])
    finally:
        sys.stdout.close()
    assert ledger.failures == []
    assert {n: ledger.outcome(n) for n in paths} == {"a": "ack", "b": "ack", "clean": "ack"}


def test_a_busy_sink_is_flushed_within_the_bound_not_only_when_idle(tmp_path):
    paths = files(tmp_path, a=b"bad one")
    ledger = Ledger()
    events = []

    def items(session):
        yield Target(paths["a"], receipt=ledger.receipt("a"))
        deadline = time.monotonic() + 20
        while not ledger.calls.get("a") and time.monotonic() < deadline:
            events.append(len(events))
            yield Record(kind="log", facts={"n": len(events)})  # never idle for the writer
            time.sleep(0.002)

    scan(tmp_path, items)
    assert ledger.outcome("a") == "ack" and len(events) > 10  # acked while events kept coming


def test_a_receipt_that_raises_is_logged_and_the_session_goes_on(tmp_path, caplog):
    paths = files(tmp_path, a=b"bad one", b=b"bad two", clean=b"fine")

    def refuse(name):
        if name != "b":
            raise RuntimeError("the broker is gone")

    ledger = Ledger(on_ack=refuse)
    with caplog.at_level(logging.ERROR, logger="elkscan"):
        result = scan(tmp_path, targets(ledger, paths))
    assert len(ledger.failures) == 2 and ledger.outcome("b") == "ack"
    assert len(result.records) == 2 and result.summary.errors == 0
    assert sum("a receipt's ack failed" in r.getMessage() for r in caplog.records) == 2



def test_many_receipts_over_two_workers_and_two_sinks_are_each_settled_once(tmp_path):
    contents = {}
    for n in range(300):
        contents[f"f{n}"] = (b"bad", b"fine", b"boom")[n % 3]
    paths = files(tmp_path, **contents)
    out = tmp_path / "out.jsonl"
    ledger = Ledger()
    items = []
    for n, (name, path) in enumerate(paths.items()):
        items.append(Target(path, skip="excluded" if n % 7 == 0 else "", required=n % 14 == 0,
                            report_clean=n % 5 == 0, receipt=ledger.receipt(name)))
        if n % 10 == 0:
            items.append(Record(kind="log", facts={"n": n}))  # records of no target go along
    result = scan(tmp_path, items, [file_sink(tmp_path), {"use": "faulty"}], limits={"workers": 2})
    assert {ledger.outcome(name) for name in paths} == {"ack"}
    reported = {r.target.path for r in result.records if r.target is not None}
    assert paths_in(out) - {None} == reported and len(result.session.find("sink", "faulty").records) == len(result.records)
