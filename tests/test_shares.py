"""A walk split into shares (``limits.shares``, elkscan_core/shares.py): real forked processes, the real
yara engine, real files, links and signals; the same verdicts and records as on worker threads."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import elkscan_core.shares as shares
from elkscan_core import Detection, Engine, hookimpl
from elkscan_core.cli import _exit_code
from elkscan_core.model import Outcome, Record, Target
from elkscan_core.testing import SAMPLES, dated_directory, run, write_samples

HERE = os.path.dirname(__file__)


def _tree(root):
    """Samples the bundled rules detect, clean files, hard links and symlinks to both, and files each
    source policy skips (excluded, too small, not a regular file)."""
    root.mkdir()
    (root / "a").mkdir()
    (root / "b").mkdir()
    write_samples(root / "a")
    for i in range(40):
        (root / "a" / f"clean{i}").write_bytes(b"nothing to see %d\n" % i * (i + 1))
    os.link(root / "a" / "eicar.com", root / "b" / "hard-sample")
    os.link(root / "a" / "clean3", root / "b" / "hard-clean")
    os.symlink("../a/miner.json", root / "b" / "link-sample")
    os.symlink("../a/clean4", root / "b" / "link-clean")
    os.symlink("/etc/hostname", root / "b" / "link-outside")
    (root / "b" / "tiny").write_bytes(b"x")
    (root / "b" / "excluded").write_bytes(b"never judged")
    os.mkfifo(root / "b" / "fifo")
    return root


def _scan(root, state, shares_on, workers=2, engines=("yara",), **limits):
    return run({"plugins": ["yara_backend"], "state_dir": str(state),
                "sources": [{"use": "dirscan", "with": {
                    "roots": {str(root): -1}, "type_filter": False, "links": "inside", "min_size": 2,
                    "exclude": [str(root / "b" / "excluded")]}}],
                "engines": [{"use": e} for e in engines],
                "limits": {"workers": workers, "shares": shares_on, **limits}},
               extra_plugins=[Plugin()], report_clean=True)


def _records(result):
    return sorted((r.target.path, r.status, r.skipped, tuple(r.judged_by), r.id,
                   tuple(sorted(d.signature for d in r.detections))) for r in result.records)


def _counts(summary):
    counts = summary.as_dict()
    counts.pop("elapsed")
    return counts


def test_shares_give_the_same_records_and_counts_as_threads(tmp_path):
    root = _tree(tmp_path / "tree")
    threads = _scan(root, tmp_path / "state", False)
    split = _scan(root, tmp_path / "state", True)
    assert threads.session._shares == 0 and split.session._shares == 2
    assert _records(split) == _records(threads)
    assert _counts(split.summary) == _counts(threads.summary)
    detected = {os.path.basename(path) for path in split.detected}
    assert {"hard-sample", "link-sample"} <= detected
    assert len(detected) == sum(1 for _, rule in SAMPLES.values() if rule) + 2
    assert split.summary.not_scanned == {"excluded": 1, "below min_size": 1, "not a regular file": 1}
    assert split.summary.names == split.summary.files + 2  # two clean files met again (detected: judged again)


class Witness(Engine):
    """Finds nothing; appends the inode it judged and its process to a file (O_APPEND: whole lines)."""

    id = "witness"
    forks = True
    call_timeout = 2.0

    def scan(self, subject):
        name = os.path.basename(subject.path)
        if name.startswith("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        if name.startswith("freeze"):
            os.kill(os.getpid(), signal.SIGSTOP)
        with open(os.environ["ELKSCAN_TEST_WITNESS"], "a") as log:
            if name.startswith("fds"):  # what this process holds open
                log.writelines(f"fd {os.readlink(f'/proc/self/fd/{fd}')}\n" for fd in os.listdir("/proc/self/fd"))
            else:
                log.write(f"{subject.stat.st_ino} {os.getpid()}\n")
        return []


class Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Witness)


def test_each_file_is_read_once_by_the_process_that_owns_its_inode(tmp_path, monkeypatch):
    root = _tree(tmp_path / "tree")
    witness = tmp_path / "witness"
    monkeypatch.setenv("ELKSCAN_TEST_WITNESS", str(witness))
    result = _scan(root, tmp_path / "state", True, engines=("witness",))  # all clean: one read a file
    lines = [line.split() for line in witness.read_text().splitlines()]
    inodes = [int(ino) for ino, _ in lines]
    assert len(inodes) == len(set(inodes)) == result.summary.files
    pids = {int(pid) for _, pid in lines}
    assert len(pids) == 2 and os.getpid() not in pids
    for ino, pid in lines:  # every file in the process of its share
        assert sorted(pids).index(int(pid)) == int(ino) % 2


def test_a_share_holds_none_of_the_sessions_descriptors(tmp_path, monkeypatch):
    """A process that a file took over writes nothing past the session: not to a sink's file."""
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(6):
        (root / f"fds{i}").write_bytes(b"which descriptors")
    witness, sink = tmp_path / "witness", tmp_path / "records.jsonl"
    monkeypatch.setenv("ELKSCAN_TEST_WITNESS", str(witness))
    result = run({"plugins": ["file_sink"], "state_dir": str(tmp_path / "state"),
                  "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                  "engines": [{"use": "witness"}], "sinks": [{"use": "file", "with": {"path": str(sink)}}],
                  "limits": {"workers": 2, "shares": True}}, extra_plugins=[Plugin()], report_clean=True)
    assert result.session._shares == 2
    held = [line[3:] for line in witness.read_text().splitlines() if line.startswith("fd ")]
    assert held and str(sink) not in held
    assert len(sink.read_text().splitlines()) == 6  # the session wrote every record


def test_a_share_whose_process_dies_is_an_error_that_names_it(tmp_path, monkeypatch, caplog):
    root = _tree(tmp_path / "tree")
    (root / "a" / "die").write_bytes(b"bye")
    dead = os.stat(root / "a" / "die").st_ino % 2
    monkeypatch.setenv("ELKSCAN_TEST_WITNESS", str(tmp_path / "witness"))
    result = _scan(root, tmp_path / "state", True, engines=("witness",))  # nothing detected: exit code 2
    summary = result.summary
    assert summary.errors == 1 and summary.unjudged >= 1
    assert summary.not_scanned[shares.ENDED_EARLY] >= 1
    assert _exit_code(summary) == 2
    assert f"share {dead + 1} of 2 (worker process" in caplog.text and "was killed by SIGKILL" in caplog.text
    assert "of its files not judged" in caplog.text
    judged = {r.target.path for r in result.records if not r.skipped}
    alive = {str(p) for p in root.rglob("*") if p.is_file() and os.stat(p).st_ino % 2 != dead
             and p.name not in ("tiny", "excluded", "link-outside")}
    assert alive and alive <= judged  # the other share ended whole, every record delivered


def test_a_share_that_goes_silent_is_ended_and_named(tmp_path, monkeypatch, caplog):
    root = _tree(tmp_path / "tree")
    (root / "a" / "freeze").write_bytes(b"stop")
    monkeypatch.setenv("ELKSCAN_TEST_WITNESS", str(tmp_path / "witness"))
    monkeypatch.setattr(shares, "SILENCE", 1.0)
    monkeypatch.setattr(Witness, "call_timeout", None)
    result = _scan(root, tmp_path / "state", True, engines=("witness",))
    assert "sent nothing for" in caplog.text and _exit_code(result.summary) == 2
    assert result.summary.not_scanned[shares.ENDED_EARLY] >= 1


def test_shares_use_the_verdict_cache_across_processes(tmp_path):
    with dated_directory(tmp_path, HERE) as base:  # the cache keeps verdicts only where writes are dated
        root = _tree(base / "tree")
        time.sleep(1.1)  # recent files are never cached
        first = _scan(root, tmp_path / "state", True, cache=True)
        second = _scan(root, tmp_path / "state", True, cache=True)
        threads = _scan(root, tmp_path / "state", False, cache=True)
    assert second.summary.cached == threads.summary.cached > 0
    assert _records(second) == _records(first) == _records(threads)


def test_one_worker_or_a_periodic_walk_keeps_the_threads(tmp_path):
    root = _tree(tmp_path / "tree")
    assert _scan(root, tmp_path / "state", True, workers=1).session._shares == 0


def test_sigterm_stops_every_share_and_exits_2(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    for i in range(3000):
        (root / f"f{i}").write_bytes(os.urandom(2048))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "version": 1, "plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
        "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
        "engines": [{"use": "yara"}], "limits": {"workers": 2, "shares": True, "cpu": "5%"}}))
    proc = subprocess.Popen([sys.executable, "-m", "elkscan_core.cli", "scan", "-p", str(pipeline), "-q"],
                            stderr=subprocess.PIPE, text=True)
    children = []
    for _ in range(200):  # until both shares run
        try:
            children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        except OSError:
            children = []
        if len(children) == 2:
            break
        subprocess.run(["sleep", "0.05"])
    assert len(children) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2, err
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


# -- the protocol -----------------------------------------------------------------------------------

EXAMPLES = {"parse": 0, "roundtrip": 0, "mutated": 0}


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.one_of(st.binary(max_size=400),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                              lambda kids: st.lists(kids, max_size=5)
                              | st.dictionaries(st.sampled_from(["record", "counts", "end", "summary", "failures",
                                                                 "target", "path", "kind", "x"]), kids, max_size=6),
                              max_leaves=30).map(lambda v: json.dumps(v).encode())))
def test_parse_takes_a_line_or_raises_broken(line):
    EXAMPLES["parse"] += 1
    try:
        what, value = shares.parse(line)
    except shares.Broken:
        return
    assert what in ("record", "counts", "end")
    if what == "record":
        assert isinstance(value, Record)
    elif what == "counts":
        counts, failures = value
        assert all(type(counts[k]) is int and counts[k] >= 0 for k in shares.COUNTED)


texts = st.text(max_size=30)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(path=st.text(min_size=1, max_size=40) | st.binary(min_size=1, max_size=40).map(os.fsdecode),
       signatures=st.lists(texts, max_size=3), facts=st.dictionaries(texts, st.integers() | texts, max_size=3),
       skipped=texts, size=st.none() | st.integers(0, 2**62), message=texts)
def test_a_record_survives_the_pipe_whole(path, signatures, facts, skipped, size, message):
    EXAMPLES["roundtrip"] += 1
    record = Record(kind="finding", target=Target(path=path, origin="dirscan", size=size, skip=skipped,
                                                  required=True),
                    detections=[Detection.from_signature("yara", s, hit_data=("$a,0,1",), meta={"k": [1, s]})
                                for s in signatures],
                    facts=facts, errors=[Outcome("yara", "failed", 0.5, message, path)], judged_by=("yara",),
                    skipped=skipped)
    line = shares.encode_record(record)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    what, back = shares.parse(line[:-1])
    assert what == "record"
    assert back.target.path == path and back.target.size == size and back.target.required
    assert back.detections == record.detections and back.errors == record.errors
    assert dict(back.facts) == facts and back.skipped == skipped and back.timestamp == record.timestamp


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                     max_size=3), max_leaves=8)


def _valid_lines():
    record = Record(kind="finding", target=Target(path="/x", origin="dirscan", size=3, extra={"a": 1}),
                    detections=[Detection.from_signature("yara", "Sig", hit_data=("$a,0,1",))],
                    errors=[Outcome("open", "failed", 0.0, "no", "/x")], judged_by=("yara",))
    counts = {**{k: 1 for k in shares.COUNTED}, "not_scanned": {"excluded": 2}, "interrupted": False}
    return [json.loads(shares.encode_record(record)), json.loads(shares.encode_counts(counts, {("yara", "failed"): 1}))]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data(), which=st.integers(0, 1), value=json_values)
def test_a_valid_line_with_any_field_changed_parses_or_is_broken(data, which, value):
    EXAMPLES["mutated"] += 1
    message = _valid_lines()[which]
    path = data.draw(st.sampled_from(list(_paths(message))[1:]))
    holder = message
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    try:
        what, parsed = shares.parse(json.dumps(message).encode())
    except shares.Broken:
        return
    if what == "record":
        assert isinstance(parsed.target, (Target, type(None))) and all(isinstance(d, Detection)
                                                                        for d in parsed.detections)
        shares.encode_record(parsed)  # what was accepted can be written out again
    elif what == "counts":
        counts, failures = parsed
        assert all(type(counts[k]) is int and counts[k] >= 0 for k in shares.COUNTED)
        assert all(type(n) is int for n in counts["not_scanned"].values())


def test_zz_fuzz_examples_ran():
    """The fuzz tests above ran their examples (the counts are in the report of issue 14's work)."""
    print(EXAMPLES)
    assert EXAMPLES["parse"] >= 100 and EXAMPLES["roundtrip"] >= 100 and EXAMPLES["mutated"] >= 100
