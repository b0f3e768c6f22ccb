"""Shares: a walk split across worker processes, each a whole scan of its share (``limits.shares``).

With worker threads, the Python around each file (the walk, opening, isolation, the per-target state
machine, once-per-pass claims, outcomes: about 26-30 us a file) runs under one GIL for the walk and every
worker. Split into shares, each of ``limits.workers`` processes, forked from the started session (the
compiled rules shared copy-on-write), walks the whole tree and judges the regular files whose inode
modulo N is its own (dirscan's ``take_share``: hard links and links followed to a file meet in the
process that owns its inode, so each file is still read once per pass), with its own worker thread,
isolation, timeouts, verdict cache connection and governor (a 1/N share of ``cpu``). The session keeps
the sinks, the summary, progress and the exit code: a process sends its records and its counts back as
JSON lines over a pipe, never pickle (a process that a file took over can lie about its own files,
never run code in the session); ``parse`` checks every field.

A process that dies, goes silent (``SILENCE``) or breaks the protocol is killed and named: its share
ended early, the files of its share it had not judged are counted not scanned, and the exit code is 2;
the other shares go on. docs/performance.md says when shares are used and what they cost.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import selectors
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

from .model import Detection, Outcome, Record, Target
from .processes import detection_fields, is_detection_fields, plain

#: The session (runner.Session) is only ever passed in: runner imports this module, never the reverse.
Session = Any

log = logging.getLogger("elkscan")

#: Seconds between a process's counts (the session's progress and summary follow them).
TICK = 0.1
#: A process that sends nothing for this long past its engines' longest call timeout is hung.
SILENCE = 30.0
#: A line longer than this is a broken process, not a record.
MAX_LINE = 16 << 20
#: Summary fields a share counts (the session counts ``records``, ``elapsed`` and ``interrupted``).
COUNTED = ("files", "bytes", "names", "clean", "known_good", "detections", "detected_files", "ignored",
           "errors", "unjudged", "abandoned", "cached", "memory_tight")
#: Why the files of a share that ended early were not judged (Summary.not_scanned).
ENDED_EARLY = "its worker process ended early"
_PR_SET_PDEATHSIG = 1


class Broken(Exception):
    """A line from a share's process that is not what the protocol allows."""


def wanted(session: Session) -> int:
    """How many shares the session's scan is split into: ``limits.workers`` when ``limits.shares`` is
    on, there are at least two workers, every source is a walk that splits (not a monitor, a periodic
    walk, a task queue) and every engine and enricher may be used in a forked process; else 0."""
    limits = session.pipeline.limits
    if not limits.shares or limits.workers < 2 or not session.sources:
        return 0
    if not all(getattr(source, "splits", False) for source in session.sources):
        return 0
    if not all(component.forks for component in (*session.engines, *session.enrichers)):
        return 0
    return limits.workers


# -- the protocol -----------------------------------------------------------------------------------


def encode_record(record: Record) -> bytes:
    """A record as one JSON line (ids are the session's to give)."""
    target = record.target
    data: dict[str, Any] = {
        "kind": record.kind, "token": record.token, "time": record.timestamp,
        "judged_by": list(record.judged_by), "skipped": record.skipped, "known_good": record.known_good,
        "facts": plain(record.facts),
        "detections": [detection_fields(d) for d in record.detections],
        "errors": [[o.component, o.status, o.elapsed, o.message, o.target] for o in record.errors],
        "target": None if target is None else {
            "path": target.path, "origin": target.origin, "pid": target.pid, "size": target.size,
            "kind": target.kind, "report_clean": target.report_clean, "extra": plain(target.extra),
            "skip": target.skip, "required": target.required, "host": target.host},
    }
    return _line({"record": data})


def encode_counts(counts: Mapping[str, Any], failures: Mapping[tuple[str, str], int]) -> bytes:
    return _line({"counts": {"summary": {key: counts[key] for key in (*COUNTED, "not_scanned", "interrupted")},
                             "failures": [[c, s, n] for (c, s), n in failures.items()]}})


END = b'{"end": true}\n'


def _line(value: Any) -> bytes:
    return json.dumps(value, default=str).encode("ascii") + b"\n"  # lone surrogates stay \udcxx escapes


def parse(line: bytes) -> tuple[str, Any]:
    """One line from a share's process: ("record", Record), ("counts", (counts, failures)) or ("end",
    None). Broken for anything else: the process reads untrusted files, so its lines are untrusted."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        raise Broken("not JSON") from None
    if not isinstance(value, dict) or len(value) != 1:
        raise Broken("not a message")
    (key, body), = value.items()
    if key == "end" and body is True:
        return "end", None
    if key == "record" and isinstance(body, dict):
        return "record", _record(body)
    if key == "counts" and isinstance(body, dict):
        return "counts", _counts(body)
    raise Broken("not a message")


def _record(body: dict) -> Record:
    _check(set(body) == {"kind", "token", "time", "judged_by", "skipped", "known_good", "facts",
                         "detections", "errors", "target"}, "record fields")
    _check(all(isinstance(body[k], str) for k in ("kind", "token", "skipped", "known_good")), "record")
    _check(_number(body["time"]) and isinstance(body["facts"], dict), "record")
    _check(_strings(body["judged_by"]), "judged_by")
    detections = body["detections"]
    _check(isinstance(detections, list) and all(is_detection_fields(d) for d in detections), "detections")
    errors = body["errors"]
    _check(isinstance(errors, list) and all(
        isinstance(e, list) and len(e) == 5 and all(isinstance(v, str) for v in (e[0], e[1], e[3], e[4]))
        and _number(e[2]) for e in errors), "errors")
    target = body["target"]
    if target is not None:
        _check(isinstance(target, dict) and set(target) == {"path", "origin", "pid", "size", "kind",
                                                            "report_clean", "extra", "skip", "required", "host"},
               "target fields")
        _check(all(isinstance(target[k], str) for k in ("path", "origin", "kind", "skip", "host")), "target")
        _check(all(target[k] is None or _integer(target[k]) for k in ("pid", "size")), "target")
        _check(isinstance(target["report_clean"], bool) and isinstance(target["required"], bool)
               and isinstance(target["extra"], dict), "target")
        target = Target(path=target["path"], origin=target["origin"], pid=target["pid"], size=target["size"],
                        kind=target["kind"], report_clean=target["report_clean"], extra=target["extra"],
                        skip=target["skip"], required=target["required"], host=target["host"])
    return Record(kind=body["kind"], target=target, token=body["token"], timestamp=float(body["time"]),
                  facts=body["facts"], judged_by=body["judged_by"], skipped=body["skipped"],
                  known_good=body["known_good"],
                  detections=[Detection(engine=e, signature=s, types=t, class_=c, name=n, hit_data=h, meta=m)
                              for e, s, t, c, n, h, m in detections],
                  errors=[Outcome(c, s, float(el), m, t) for c, s, el, m, t in errors])


def _counts(body: dict) -> tuple[dict[str, Any], dict[tuple[str, str], int]]:
    counts, failures = body.get("summary"), body.get("failures")
    _check(set(body) == {"summary", "failures"} and isinstance(counts, dict) and isinstance(failures, list),
           "counts")
    _check(set(counts) == {*COUNTED, "not_scanned", "interrupted"}, "counts fields")
    _check(all(_integer(counts[k]) for k in COUNTED) and isinstance(counts["interrupted"], bool), "counts")
    not_scanned = counts["not_scanned"]
    _check(isinstance(not_scanned, dict) and all(_integer(v) for v in not_scanned.values()), "not_scanned")
    _check(all(isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and isinstance(f[1], str)
               and _integer(f[2]) for f in failures), "failures")
    return counts, {(c, s): n for c, s, n in failures}


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise Broken(f"malformed {what}")


def _integer(value: Any) -> bool:
    return type(value) is int and value >= 0


def _number(value: Any) -> bool:
    return type(value) in (int, float) and value == value and abs(value) < 1e300


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# -- the session's side -----------------------------------------------------------------------------


class _Share:
    """One process and what the session has of it: the last counts it sent, its unread bytes."""

    __slots__ = ("k", "pid", "fd", "buffer", "counts", "failures", "heard", "ended", "why")

    def __init__(self, k: int, pid: int, fd: int) -> None:
        self.k, self.pid, self.fd = k, pid, fd
        self.buffer = bytearray()
        self.counts: dict[str, Any] = {key: 0 for key in COUNTED}
        self.counts.update(not_scanned={}, interrupted=False)
        self.failures: dict[tuple[str, str], int] = {}
        self.heard = time.monotonic()
        self.ended = False  # it sent "end": its counts are final
        self.why = ""  # why the session ended it early (silent, broken protocol)


class Shares:
    """The session's end of its shares: forks them (``start``), then reads their records and counts
    until every one has ended (``collect``)."""

    def __init__(self, session: Session, n: int) -> None:
        self.session, self.n = session, n
        self.shares: list[_Share] = []
        timeouts = [c.call_timeout for c in (*session.engines, *session.enrichers) if c.call_timeout]
        self.silence = SILENCE + max(timeouts, default=0.0)
        self._signalled = False

    def start(self) -> None:
        """Fork one process per share (before the session starts any thread of its own)."""
        for k in range(self.n):
            read, write = os.pipe2(os.O_CLOEXEC)
            with warnings.catch_warnings():  # Python 3.12+ warns of fork() in a process with threads
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    os.close(read)
                    for share in self.shares:
                        os.close(share.fd)
                    _Child(self.session, k, self.n, write).run()
                    status = 0
                finally:
                    os._exit(status)
            os.close(write)
            self.shares.append(_Share(k, pid, read))

    def collect(self) -> None:
        """Deliver the shares' records and follow their counts until every process has ended."""
        session = self.session
        selector = selectors.DefaultSelector()
        for share in self.shares:
            selector.register(share.fd, selectors.EVENT_READ, share)
        live = list(self.shares)
        while live:
            if session.stopping.is_set() and not self._signalled:
                self._signalled = True
                for share in live:
                    _kill(share.pid, signal.SIGTERM)  # it stops as a session does, and sends its counts
            for key, _ in selector.select(0.2):
                share = key.data
                data = os.read(share.fd, 1 << 16)
                if data:
                    share.heard = time.monotonic()
                    share.buffer += data
                    self._lines(share)
                if not data or share.why:
                    selector.unregister(share.fd)
                    live.remove(share)
                    self._end(share)
            now = time.monotonic()
            for share in list(live):
                late = now - share.heard > self.silence
                if late or session._grace_over():
                    share.why = (f"sent nothing for {now - share.heard:.0f} s" if late
                                 else "did not stop within the stop's grace")
                    selector.unregister(share.fd)
                    live.remove(share)
                    self._end(share)
        selector.close()

    def _lines(self, share: _Share) -> None:
        buffer = share.buffer
        start = 0
        while not share.why:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            try:
                what, value = parse(bytes(buffer[start:end]))
            except Broken as exc:
                share.why = f"broke the protocol ({exc})"
                break
            start = end + 1
            if what == "record":
                self.session.deliver(value)
            elif what == "counts":
                self._count(share, *value)
            else:
                share.ended = True
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            share.why = f"sent a line of more than {MAX_LINE} bytes"

    def _count(self, share: _Share, counts: dict[str, Any], failures: dict[tuple[str, str], int]) -> None:
        """Add what changed since the share's last counts to the session's summary."""
        session = self.session
        summary = session.summary
        with session._lock:
            for key in COUNTED:
                setattr(summary, key, getattr(summary, key) + counts[key] - share.counts[key])
            before = share.counts["not_scanned"]
            for reason in {*counts["not_scanned"], *before}:
                value = summary.not_scanned.get(reason, 0) + counts["not_scanned"].get(reason, 0) \
                    - before.get(reason, 0)
                if value:
                    summary.not_scanned[reason] = value
                else:
                    summary.not_scanned.pop(reason, None)
            for key in {*failures, *share.failures}:
                session.failures[key] += failures.get(key, 0) - share.failures.get(key, 0)
            summary.interrupted |= counts["interrupted"]
        share.counts, share.failures = counts, failures

    def _end(self, share: _Share) -> None:
        """Reap an ended process; one that did not end as the protocol says is an error that names the
        share, and the files of its share it had not judged are counted not scanned."""
        deadline = time.monotonic() + (0 if share.why or not share.ended else 2.0)
        status = _reap(share.pid, wait=False)
        while not status and time.monotonic() < deadline:  # it said "end": it exits now
            time.sleep(0.01)
            status = _reap(share.pid, wait=False)
        if not status:  # ended early, or said "end" and lingers: it does not outlive its share
            _kill(share.pid, signal.SIGKILL)
            status = _reap(share.pid)
        os.close(share.fd)
        if share.ended and not share.why:
            return
        why = share.why or f"ended ({status}) before its share was done"
        session = self.session
        left = 0 if session.stopping.is_set() else max(0, self._count_share(share.k) - share.counts["names"])
        with session._lock:
            if left:
                summary = session.summary
                summary.not_scanned[ENDED_EARLY] = summary.not_scanned.get(ENDED_EARLY, 0) + left
                summary.unjudged += left
        session.report(Outcome("session", "failed", message=(
            f"share {share.k + 1} of {self.n} (worker process {share.pid}) {why}: "
            + (f"{left:,} of its files not judged" if left else "the rest of its files not judged"))))

    def _count_share(self, k: int) -> int:
        """The files and names share ``k`` had to judge, counted by walking it again here (opened and
        closed, not judged); used only when a share ends early."""
        total = 0
        for source in self.session.sources:
            source.take_share(k, self.n)
            source.reports = False
            try:
                for target in source.targets():
                    if isinstance(target, Target):
                        total += not target.skip
                        if target.fd is not None:
                            os.close(target.fd)
            except Exception:
                log.debug("counting share %d failed", k, exc_info=True)
        return total

    def kill_all(self) -> None:
        """The session ends (a bug, or the grace is over): no process outlives it."""
        for share in self.shares:
            if _reap(share.pid, wait=False) == "":
                _kill(share.pid, signal.SIGKILL)
                _reap(share.pid)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap(pid: int, wait: bool = True) -> str:
    """What ended the process ('' while it runs and ``wait`` is False; 'ended' when already reaped)."""
    try:
        done, status = os.waitpid(pid, 0 if wait else os.WNOHANG)
    except ChildProcessError:
        return "ended"
    if not done:
        return ""
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


# -- the share's process ----------------------------------------------------------------------------


class _Child:
    """A share's process: the session's scan of one share, its records and counts sent up the pipe."""

    def __init__(self, session: Session, k: int, n: int, fd: int) -> None:
        self.session, self.k, self.n = session, k, n
        self.out = fd
        self.lock = threading.Lock()
        self.pending: list[bytes] = []

    def run(self) -> None:
        session = self.session
        for signum in signal.valid_signals():  # the session's handlers are not this process's
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the session, which stops the shares
        signal.signal(signal.SIGTERM, lambda *_: session.stop())
        try:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the session
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:
            return
        gc.freeze()  # the session's objects: never collected here (one holding a closed descriptor would
        # close whatever reuses its number), and their pages stay shared
        _plain_log_streams()
        _close_inherited(self.out)
        session.share_process(self.k, self.n, self.deliver)
        done = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(done,), name="share-counts", daemon=True)
        ticker.start()
        try:
            session.run_share()
        finally:
            done.set()
            ticker.join()
            self._send(_counts_line(session) + END)

    def deliver(self, record: Record) -> None:
        line = encode_record(record)
        with self.lock:
            self.pending.append(line)

    def _tick(self, done: threading.Event) -> None:
        """Every ``TICK``: the records made since the last and the counts (also the sign of life)."""
        while True:
            finished = done.wait(TICK)
            self._send(_counts_line(self.session))
            if finished:
                return

    def _send(self, line: bytes) -> None:
        with self.lock:
            data = b"".join(self.pending) + line
            self.pending.clear()
            view = memoryview(data)
            while view:
                view = view[os.write(self.out, view):]


def _counts_line(session: Session) -> bytes:
    summary, failures = session.counts()
    return encode_counts(summary.as_dict(), failures)


def _close_inherited(keep: int) -> None:
    """Close the session's descriptors (sinks' connections and files, the metrics endpoint): a process
    that a file took over must not write records or anything else past the session. It keeps its pipe,
    stdin, stderr and the log's files; stdout goes to /dev/null (it is the stdout sink's)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    kept = {keep}
    for handler in logging.getLogger().handlers:
        try:
            kept.add(handler.stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in kept:
            try:
                os.close(fd)
            except OSError:
                pass


def _plain_log_streams() -> None:
    """A stderr of this process's own, for its log lines: another thread of the session (the progress
    line) may have held the old one's lock at the fork, and that thread does not exist here. Handlers
    that progress.py wrapped write straight to it again."""
    old = sys.stderr
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if type(stream).__module__ == "elkscan_core.progress":  # its wrapper (progress imports runner)
            stream = handler.stream = stream.stream
        if stream is old or stream is sys.__stderr__:
            handler.stream = sys.stderr  # not setStream(): that flushes the old stream, under its lock
