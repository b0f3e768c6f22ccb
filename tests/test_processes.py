"""Engines that hold the GIL scan in worker processes (elkscan_core/processes.py), with the isolation,
timeouts, governor and outcome model that worker threads have: real forked processes, real signals."""

import os
import signal
import struct
import time

import pytest

from elkscan_core import Detection, Engine, hookimpl
from elkscan_core.model import NotScanned
from elkscan_core.testing import run


class InProcess(Engine):
    """Holds the GIL (as far as the runner knows): detects 'bad', says which process judged the file,
    and misbehaves on files named for it."""

    id = "inprocess"
    releases_gil = False
    call_timeout = 1.0

    def version(self):
        return "1"

    def scan(self, subject):
        name = os.path.basename(subject.path)
        if name.startswith("hang"):
            time.sleep(60)
        if name.startswith("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        if name.startswith("raise"):
            raise ValueError(f"cannot read {name}")
        if name.startswith("limit"):
            raise NotScanned("above inprocess's own limit")
        if name.startswith("burn"):
            end = time.process_time() + 0.05
            while time.process_time() < end:
                pass
        if name.startswith("fds"):
            return [Detection.from_signature(self.id, "Txt.Test.Fds", meta={"fds": os.listdir("/proc/self/fd")})]
        if b"bad" in subject.read(64):
            return [Detection.from_signature(self.id, "Txt.Test.Bad", hit_data=("$a,0,3",),
                                             meta={"pid": os.getpid(), "tags": ["x"]})]
        return []


class Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(InProcess)


def _scan(root, limits=None, **kwargs):
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                "engines": [{"use": "inprocess"}], "limits": {"workers": 2, **(limits or {})}}
    return run(pipeline, extra_plugins=[Plugin()], report_clean=True, **kwargs)


def _write(root, names):
    for name in names:
        (root / name).write_bytes((b"bad " if "bad" in name else b"fine") * 64)


def _by_name(result):
    return {os.path.basename(r.target.path): r for r in result.records}


def test_detections_come_from_worker_processes_in_the_engines_shape(tmp_path):
    _write(tmp_path, [f"bad{i}.txt" for i in range(5)] + [f"good{i}.txt" for i in range(20)])
    result = _scan(tmp_path)
    records = _by_name(result)
    assert len(records) == 25 and result.summary.files == 25
    assert all(records[f"good{i}.txt"].status == "clean" for i in range(20))
    pids = set()
    for i in range(5):
        record = records[f"bad{i}.txt"]
        detection = record.detections[0]
        assert record.status == "detected" and record.judged_by == ("inprocess",)
        assert detection.signature == "Txt.Test.Bad" and detection.hit_data == ("$a,0,3",)
        assert detection.meta["tags"] == ["x"]  # as the engine gave it, as on a thread
        pids.add(detection.meta["pid"])
    assert os.getpid() not in pids and len(pids) <= 2  # judged in the pool's two processes
    assert result.session._pools and not any(p.pids for p in result.session._pools.values())  # all ended


def test_a_hung_call_in_a_worker_process_times_out_and_the_target_goes_on(tmp_path):
    _write(tmp_path, ["hang.txt", "bad.txt"] + [f"good{i}.txt" for i in range(10)])
    started = time.monotonic()
    result = _scan(tmp_path)
    assert time.monotonic() - started < 30  # the 60 s hang was given up
    records = _by_name(result)
    assert records["hang.txt"].status == "error" and records["hang.txt"].errors[0].status == "timeout"
    assert records["bad.txt"].status == "detected" and len(records) == 12
    assert all(records[f"good{i}.txt"].status == "clean" for i in range(10))
    assert not next(iter(result.session._pools.values())).pids  # the hung process was killed


def test_a_worker_process_killed_makes_its_target_an_error_and_the_scan_goes_on(tmp_path):
    _write(tmp_path, ["die.txt", "bad.txt"] + [f"good{i}.txt" for i in range(10)])
    result = _scan(tmp_path)
    records = _by_name(result)
    died = records["die.txt"]
    assert died.status == "error" and died.errors[0].status == "failed"
    assert "WorkerDied: worker process" in died.error and "was killed by SIGKILL" in died.error
    assert records["bad.txt"].status == "detected" and len(records) == 12
    assert result.summary.errors == 1 and result.summary.clean == 10


def test_a_worker_process_holds_none_of_the_sessions_descriptors(tmp_path):
    """Only stdin, stdout (/dev/null), stderr, its socket and the file it judges (and listdir's own): a
    sink's connection or a queued file stays the session's, so closing it there closes it."""
    _write(tmp_path, ["fds.txt"])
    keep = os.open(tmp_path / "fds.txt", os.O_RDONLY)  # a descriptor of the session's, open at the fork
    try:
        (record,) = _scan(tmp_path).records
    finally:
        os.close(keep)
    assert len(record.detections[0].meta["fds"]) == 6


def test_an_exception_in_a_worker_process_is_named_as_on_a_thread(tmp_path):
    _write(tmp_path, ["raise.txt", "good.txt"])
    records = _by_name(_scan(tmp_path))
    assert records["raise.txt"].error.endswith("inprocess: failed: ValueError: cannot read raise.txt")
    assert records["good.txt"].status == "clean"


def test_a_limit_raised_in_a_worker_process_makes_its_file_not_scanned_as_on_a_thread(tmp_path):
    _write(tmp_path, ["limit.txt", "good.txt"])
    result = _scan(tmp_path)
    records = _by_name(result)
    assert records["limit.txt"].status == "not_scanned"
    assert records["limit.txt"].skipped == "above inprocess's own limit"
    assert not records["limit.txt"].error
    assert result.summary.not_scanned == {"above inprocess's own limit": 1} and not result.summary.errors
    assert records["good.txt"].status == "clean"


def test_the_cpu_share_counts_the_worker_processes(tmp_path):
    """20 files of 50 ms of CPU each, in the worker processes, under cpu: 10%: the duty cycle sees the
    processes' CPU time (the session's own is a few ms) and holds the share by sleeping: 1 s of CPU
    at a tenth of a CPU is 10 s, less the time the scans themselves took and the credit it starts with."""
    _write(tmp_path, [f"burn{i}.txt" for i in range(20)])
    result = _scan(tmp_path, {"cpu": "10%", "cgroup": False})  # the duty cycle, not the kernel
    assert result.summary.clean == 20
    assert result.session.governor.throttled > 2.0


def test_a_parked_worker_leaves_its_process_idle(tmp_path):
    """The governor's pause (an Elkeid task's fewer workers, memory, pressure) parks a worker thread;
    its process gets nothing meanwhile: one process judges everything."""
    _write(tmp_path, [f"bad{i}.txt" for i in range(12)])

    class OneWorker:
        @hookimpl
        def elkscan_session_start(self, session):
            session.governor.set_cpu(None, workers=1)

    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path): -1}, "type_filter": False}}],
                "engines": [{"use": "inprocess"}], "limits": {"workers": 2}}
    result = run(pipeline, extra_plugins=[Plugin(), OneWorker()])
    pids = {r.detections[0].meta["pid"] for r in result.records}
    assert len(result.records) == 12 and len(pids) == 1


@pytest.mark.parametrize("workers", [1, 3])
def test_one_process_per_worker(tmp_path, workers):
    _write(tmp_path, ["bad.txt"])
    result = _scan(tmp_path, {"workers": workers})
    assert next(iter(result.session._pools.values())).forked == workers


class Versioned(Engine):
    """Detects its word; its version names the word (as a rule digest names the rules)."""

    id = "versioned"
    releases_gil = False
    word = b"bad"

    def version(self):
        return self.word.decode()

    def scan(self, subject):
        return [Detection.from_signature(self.id, "Found")] if self.word in subject.read(64) else []


def test_a_reload_replaces_the_processes_forked_with_the_old_rules(tmp_path):
    from elkscan_core import Subject, Target
    from elkscan_core.processes import Pool

    path = tmp_path / "file.txt"
    path.write_bytes(b"bad and fine")
    engine = Versioned(None, None)
    pool = Pool(engine, 1)
    pool.start()
    fd = os.open(path, os.O_RDONLY)
    try:
        subject = Subject(Target(str(path)), fd, os.fstat(fd))
        assert [d.signature for d in pool.scan(subject)] == ["Found"]
        engine.word = b"nothing"  # what a reload does: new rules, a new version
        assert pool.scan(subject) == ()
        engine.word = b"fine"
        assert [d.signature for d in pool.scan(subject)] == ["Found"] and pool.forked == 3
        assert len(pool.pids) == 1
    finally:
        os.close(fd)
        pool.close()
    assert not pool.pids


def test_a_worker_processs_answer_is_checked_field_by_field():
    """The process reads untrusted files, so its answer is untrusted: any JSON value is a verdict of the
    right shape, a NotScanned with a short printable reason or a WorkerProcessError, never anything else
    (hypothesis, 500 examples)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from elkscan_core.model import KNOWN_GOOD
    from elkscan_core.processes import WorkerProcessError, _decode

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                               lambda inner: st.lists(inner, max_size=8)
                               | st.dictionaries(st.text(), inner, max_size=8), max_leaves=10)
    shaped = st.fixed_dictionaries({"detections": st.lists(st.lists(json_values, min_size=7, max_size=7)
                                                           | st.tuples(*[st.text()] * 5, st.lists(st.text()),
                                                                       st.dictionaries(st.text(), json_values))
                                                           .map(list), max_size=4)})
    reasons = st.fixed_dictionaries({"not_scanned": st.tuples(st.text(max_size=300), st.booleans() | json_values)
                                     .map(list)})
    answers = json_values | shaped | reasons | st.dictionaries(
        st.sampled_from(["error", "garbage", "known_good", "detections", "not_scanned"]), json_values, max_size=2)
    seen = {"ok": 0, "refused": 0, "not_scanned": 0}

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(answers)
    def check(answer):
        try:
            verdict = _decode("inprocess", answer)
        except WorkerProcessError:
            seen["refused"] += 1
            return
        except NotScanned as exc:
            assert 0 < len(exc.reason) <= 200 and exc.reason.isprintable()
            seen["not_scanned"] += 1
            return
        seen["ok"] += 1
        assert verdict is KNOWN_GOOD or all(isinstance(d, Detection) and d.engine == "inprocess"
                                            and isinstance(d.signature, str) for d in verdict)

    check()
    assert seen["ok"] and seen["refused"] and seen["not_scanned"]


@pytest.mark.parametrize("workers", [1, 2])
def test_files_sent_ahead_each_get_their_own_verdict(tmp_path, workers):
    """The worker thread sends its process the next files of its batch with each call: every answer
    still lands on its own file, and no process is replaced on the way."""
    names = [f"{kind}{i:02}.txt" for i in range(20) for kind in ("bad", "good", "raise")]
    _write(tmp_path, names)
    result = _scan(tmp_path, {"workers": workers})
    records = _by_name(result)
    assert len(records) == 60
    for i in range(20):
        assert records[f"bad{i:02}.txt"].status == "detected"
        assert records[f"good{i:02}.txt"].status == "clean"
        assert records[f"raise{i:02}.txt"].error == f"inprocess: failed: ValueError: cannot read raise{i:02}.txt"
    assert next(iter(result.session._pools.values())).forked == workers


def test_a_hard_link_sent_ahead_and_judged_under_its_first_name_is_drained(tmp_path):
    """A second name of a file takes the first name's verdict without the engine: what was sent ahead
    for it is drained, the process kept, and every name reported."""
    _write(tmp_path, [f"good{i:02}.txt" for i in range(30)])
    for i in range(0, 30, 3):
        os.link(tmp_path / f"good{i:02}.txt", tmp_path / f"link{i:02}.txt")
    result = _scan(tmp_path, {"workers": 1})
    records = _by_name(result)
    assert len(records) == 40 and all(r.status == "clean" for r in records.values())
    pool = next(iter(result.session._pools.values()))
    assert pool.forked == 1 and pool.drained


def test_a_file_sent_ahead_that_the_call_skips_and_that_hangs_ends_its_process_not_the_call(tmp_path):
    """A file sent ahead and then not given to the engine is not waited for past ``_DRAIN``: its process
    is killed, the call goes to a new one, and no record names the file it was not judging."""
    from elkscan_core import Subject, Target
    from elkscan_core.processes import _DRAIN, Pool

    _write(tmp_path, ["hang.txt", "bad.txt", "good.txt"])
    fds = {name: os.open(tmp_path / name, os.O_RDONLY) for name in ("hang.txt", "bad.txt", "good.txt")}
    targets = {name: Target(str(tmp_path / name), fd=fd, size=256) for name, fd in fds.items()}
    upcoming = [targets["hang.txt"]]
    pool = Pool(InProcess(None, None), 1, lambda: upcoming)
    pool.start()
    try:
        first = Subject(targets["good.txt"], fds["good.txt"], os.fstat(fds["good.txt"]))
        assert pool.scan(first) == ()  # hang.txt went ahead of it
        upcoming = []
        started = time.monotonic()
        then = Subject(targets["bad.txt"], fds["bad.txt"], os.fstat(fds["bad.txt"]))
        assert [d.signature for d in pool.scan(then)] == ["Txt.Test.Bad"]
        assert time.monotonic() - started < _DRAIN + 5 and pool.forked == 2 and len(pool.pids) == 1
    finally:
        for fd in fds.values():
            os.close(fd)
        pool.close()
    assert not pool.pids


def test_answers_in_the_stream_are_read_back_whole_and_in_order_however_they_arrive():
    """The session reads the answers of files in flight from one stream (processes._split): answers as
    the process frames them come back as the same verdicts, in order, however the stream is cut; any
    other bytes are a verdict of the right shape, a WorkerProcessError or a WorkerDied (hypothesis, 500
    examples each)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from elkscan_core.model import KNOWN_GOOD
    from elkscan_core.processes import WorkerDied, WorkerProcessError, _decode, _frame, _parse, _split

    detection = st.builds(lambda s, h, m: Detection.from_signature("inprocess", s, hit_data=tuple(h), meta=m),
                          st.text(min_size=1, max_size=20), st.lists(st.text(max_size=10), max_size=3),
                          st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.integers(), max_size=3))
    result = st.just([]) | st.just(KNOWN_GOOD) | st.lists(detection, min_size=1, max_size=3)
    seen = {"chunks": 0, "refused": 0, "ok": 0}
    _HEADER_SIZE, _HEADER_PACK = 4, struct.Struct("!I").pack

    def take(buffer):
        found = _split(buffer, 1)
        if found is None:
            return None
        used, payload = found
        assert _HEADER_SIZE <= used <= len(buffer)
        del buffer[:used]
        return () if payload is None else _decode("inprocess", _parse(payload))  # as Pool.scan does

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(result, min_size=1, max_size=6), st.lists(st.integers(1, 64), min_size=1, max_size=20))
    def framed(results, cuts):
        stream = b"".join(_frame(r) for r in results)
        buffer, got, at = bytearray(), [], 0
        for cut in cuts * (len(stream) // max(1, sum(cuts)) + 1):
            buffer += stream[at:at + cut]
            at += cut
            seen["chunks"] += 1
            while (verdict := take(buffer)) is not None:
                got.append(verdict)
        buffer += stream[at:]
        while (verdict := take(buffer)) is not None:
            got.append(verdict)
        assert not buffer
        assert got == [r if r is KNOWN_GOOD else tuple(r) for r in results]

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=200) | st.builds(lambda n, b: _HEADER_PACK(n) + b, st.integers(0, 2**32 - 1),
                                                st.binary(max_size=64)))
    def garbage(data):
        buffer = bytearray(data)
        try:
            while (verdict := take(buffer)) is not None:
                assert verdict is KNOWN_GOOD or all(isinstance(d, Detection) and d.engine == "inprocess"
                                                    for d in verdict)
                seen["ok"] += 1
        except (WorkerProcessError, WorkerDied):
            seen["refused"] += 1

    framed()
    garbage()
    assert seen["chunks"] and seen["ok"] and seen["refused"]


class Inline(InProcess):
    """Holds the GIL, but a file under 1 KiB costs less to scan than to hand over."""

    id = "inline"
    inline_below = 1024


def test_files_under_inline_below_are_judged_on_the_thread_the_others_in_processes(tmp_path):
    (tmp_path / "bad-small.txt").write_bytes(b"bad " * 64)
    (tmp_path / "bad-large.txt").write_bytes(b"bad " * 1024)
    for i in range(6):
        (tmp_path / f"good{i}.txt").write_bytes(b"fine" * (64 if i % 2 else 1024))

    class Plugin:
        @hookimpl
        def elkscan_register_engines(self, registry):
            registry.add(Inline)

    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path): -1}, "type_filter": False}}],
                "engines": [{"use": "inline"}], "limits": {"workers": 2}}
    result = run(pipeline, extra_plugins=[Plugin()], report_clean=True)
    records = _by_name(result)
    assert records["bad-small.txt"].detections[0].meta["pid"] == os.getpid()
    assert records["bad-large.txt"].detections[0].meta["pid"] not in (os.getpid(), None)
    assert all(records[f"good{i}.txt"].status == "clean" for i in range(6)) and len(records) == 8


def test_with_the_verdict_cache_on_nothing_is_sent_ahead_and_every_file_is_judged(tmp_path):
    """The cache's claim comes before the engine reads, so no file goes ahead of its call; the calls
    are made one by one as before (a second scan takes the verdicts from the cache)."""
    root = tmp_path / "files"
    root.mkdir()
    _write(root, ["bad.txt"] + [f"good{i}.txt" for i in range(20)])
    limits = {"cache": True, "cache_path": str(tmp_path / "verdicts.sqlite")}
    for _ in range(2):
        records = _by_name(_scan(root, limits))
        assert records["bad.txt"].status == "detected" and len(records) == 21
        assert all(records[f"good{i}.txt"].status == "clean" for i in range(20))
