"""Worker processes for engines that hold the GIL (``Engine.releases_gil = False``).

On worker threads such an engine scans on one CPU whatever ``limits.workers`` says: the threads take
turns on one GIL. So each worker thread hands its calls to a worker process of its own, forked from the
session once the engine has started: the compiled rules are shared copy-on-write, not loaded again. A
call passes the open file's descriptor (``SCM_RIGHTS``) with the target's path; the process answers with
four zero bytes when the file is clean, else the detections as JSON (never pickle: a process that a file
took over can lie about that file's verdict, not run code in the session).

The hand-over is pipelined: with each call the worker thread also sends its process the next files of
its batch (``upcoming``, at most ``AHEAD`` in flight), so the process scans the next file while the
thread does the Python around the last one, and answers wait in the socket instead of waking the thread
one by one. The answers come back in order; a call takes its own. A file sent ahead that the session
then does not give this engine (its name shared another's verdict, it vanished) is drained: its answer
is thrown away, or, if it does not come within ``_DRAIN`` seconds, the process is killed (no record
names a file it was not judging).

A file smaller than the engine's ``inline_below`` is scanned on the worker thread, in the session: on a
small file the hand-over (about 130 us of CPU on both sides) costs more than yara-x's scan, and the
session's share of the work must stay below one CPU for two workers to use two.

The worker thread keeps everything else: the call's isolation and deadline (isolation.py), the
governor's check-in before each file and its parking (the process waits while its thread does, once
the files sent ahead, ``AHEAD - 1`` at most, are done). A
process that does not answer by the engine's ``call_timeout`` (plus a second, so that the watchdog has
recorded the timeout) is killed; one that dies makes the call an error; a new process takes the place
of either at the next call. A reload shows in the engine's ``version()``: a process forked with other
rules is replaced before it is given a file. The governor counts the processes' CPU time in the CPU
share and their private memory in the memory ceiling (``cpu_seconds``, ``private_bytes``).
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import logging
import os
import queue
import select
import signal
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from .components import Engine, Subject
from .model import KNOWN_GOOD, Detection, KnownGood, NotScanned, Target

log = logging.getLogger("elkscan")

_HEADER = struct.Struct("!I")
_MAX_ANSWER = 64 << 20  # an answer larger than this is a broken process, not a verdict
_KILL_AFTER = 1.0  # seconds past the call's deadline: the watchdog has recorded the timeout by then
_CLEAN = _HEADER.pack(0)  # the answer for a clean file: no JSON to write or parse
#: Files in flight to one process (the call's and the ones sent ahead of it): enough that the process
#: always has the next file while its thread works; few, so a parked worker's process stops soon.
AHEAD = 8
MAX_REASON = 200  # characters of a NotScanned reason a process may send
_DRAIN = 1.0  # seconds an unwanted file sent ahead may take to answer before its process is killed
_PR_SET_PDEATHSIG = 1


class WorkerProcessError(Exception):
    """A call in a worker process failed; subclasses carry the name of the exception raised there."""


class WorkerDied(Exception):
    """The worker process ended (killed, crashed) while it judged the file."""


class _Replace(Exception):
    """The thread's process was killed while draining files sent ahead: the call takes another."""


_REMOTE: dict[str, type[WorkerProcessError]] = {}


def _remote(name: str) -> type[WorkerProcessError]:
    """An exception class named as the one the engine raised in its process, so the record says
    ``ValueError: ...`` as it would on a thread."""
    name = name if name.isidentifier() else "Exception"
    if name not in _REMOTE:
        _REMOTE[name] = type(name, (WorkerProcessError,), {})
    return _REMOTE[name]


class Worker:
    """One forked process and the parent's end of its socket."""

    __slots__ = ("pid", "sock", "version", "started", "poll", "buffer", "pending")

    def __init__(self, pid: int, sock: socket.socket, version: str) -> None:
        self.pid, self.sock, self.version = pid, sock, version
        self.started = time.monotonic()
        sock.setblocking(False)  # reads try first and wait (poll) only when no answer is there yet
        self.poll = select.poll()
        self.poll.register(sock, select.POLLIN)
        self.buffer = bytearray()  # answers read and not yet taken
        #: the targets sent, in order, whose answers are not taken yet (the call's own comes first)
        self.pending: collections.deque[tuple[Target, int]] = collections.deque()


class Pool:
    """The worker processes of one engine: at most one per worker thread in a call, idle ones kept."""

    def __init__(self, engine: Engine, size: int,
                 upcoming: Callable[[], Sequence[Target]] | None = None) -> None:
        self.engine = engine
        self.size = size
        #: the calling thread's next targets, in the order it will judge them (its batch); () when no
        #: file may be sent ahead (a verdict cache's claim must come before the engine reads)
        self.upcoming = upcoming
        #: files smaller than this are scanned on the calling thread (only for a thread-safe engine:
        #: calls to a pool are not made one at a time)
        self.inline_below = engine.inline_below if engine.thread_safe else 0
        self._lock = threading.Lock()
        self._local = threading.local()  # a thread's process while files it sent ahead are in it
        self._idle: list[Worker] = []
        self._kept: set[Worker] = set()  # kept by a thread between calls: files it sent ahead are in them
        self._live: dict[int, Worker] = {}  # pid -> worker, idle or busy
        self._retired_cpu = 0.0  # CPU seconds of processes that ended
        self._closed = False
        self.forked = 0  # processes started, for the metrics and tests
        self.drained = 0  # answers thrown away: files sent ahead that the session did not give the engine
        #: Every fork happens on this one thread: a process dies with the thread that forked it
        #: (PR_SET_PDEATHSIG), so not with a worker thread that retires after a hung call.
        self._forks: queue.Queue[Future | None] = queue.Queue()
        self._forker = threading.Thread(target=self._fork_on_request, name=f"fork-{engine.id}", daemon=True)

    def start(self) -> None:
        """Fork ``size`` processes now, while the session has few threads."""
        self._forker.start()
        for _ in range(self.size):
            self._idle.append(self._fork())

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return list(self._live)

    def scan(self, subject: Subject) -> tuple[Detection, ...] | KnownGood:
        """``engine.scan(subject)`` in a worker process; raises what it raised there (by name),
        TimeoutError when it did not answer in time, WorkerDied when the process ended."""
        if subject.stat.st_size < self.inline_below:  # cheaper here than the hand-over
            return self.engine.scan(subject)
        for attempt in range(2):
            worker = self._checkout()
            try:
                queued = self._drain(worker, subject)
            except _Replace:  # it held files this call skipped over and would not give them back
                worker = self._checkout()
                queued = False
            if not queued:
                try:
                    self._send(worker, subject.target, subject.fd)
                except OSError:  # it died while idle (killed, out of memory): another one takes the file
                    self._end(worker)
                    if attempt:
                        raise
                    continue
            try:
                self._send_ahead(worker)
                answer = self._answer(worker, self._deadline())
            except BaseException:
                self._end(worker)
                raise
            self._checkin(worker)
            return () if answer is _CLEAN else _decode(self.engine.id, answer)
        raise AssertionError("unreachable")

    def _deadline(self) -> float | None:
        timeout = self.engine.call_timeout
        return None if timeout is None else time.monotonic() + timeout + _KILL_AFTER

    def _drain(self, worker: Worker, subject: Subject) -> bool:
        """True when ``subject`` was sent ahead to ``worker``: its answer is the next one. Answers of
        files sent ahead that this call skips over are thrown away; a process that does not give them
        within ``_DRAIN`` seconds is killed."""
        pending = worker.pending
        while pending:
            target, fd = pending[0]
            if target is subject.target and fd == subject.fd:
                return True
            try:
                self._answer(worker, time.monotonic() + _DRAIN)
                self.drained += 1
            except Exception:  # late, dead or lying about a file this call does not judge
                self._end(worker)
                raise _Replace from None
        return False

    def _send_ahead(self, worker: Worker) -> None:
        """Send the process the calling thread's next files, up to ``AHEAD`` in flight, after the last
        one sent: files judged on the thread are passed over; the first one that the process would not
        be asked for (above the engine's size, no descriptor) ends the run, so what is sent is the order
        the thread will call in."""
        if self.upcoming is None or len(worker.pending) >= AHEAD:
            return
        upcoming = self.upcoming()
        if not upcoming:
            return
        limit, inline = self.engine.max_file_size, self.inline_below
        sent = worker.pending[-1][0] if len(worker.pending) > 1 else None  # the last one sent ahead
        try:
            ahead = iter(list(upcoming))  # one step under the GIL: the watchdog may take the batch
            if sent is not None:
                next(target for target in ahead if target is sent)
            for target in ahead:
                if len(worker.pending) >= AHEAD:
                    return
                if target.size is not None and target.size < inline and target.has_content:
                    continue  # judged on the thread
                if (target.fd is None or target.skip or not target.has_content or target.size is None
                        or (limit is not None and target.size > limit)):
                    return
                self._send(worker, target, target.fd)
        except (StopIteration, RuntimeError, OSError):  # the batch moved on; the answer tells of a death
            return

    def _checkout(self) -> Worker:
        version = self.engine.version()
        mine = getattr(self._local, "worker", None)
        if mine is not None:  # files this thread sent ahead are in it
            self._local.worker = None
            with self._lock:
                self._kept.discard(mine)
            if mine.version == version:
                return mine
            self._end(mine)
        stale = []
        with self._lock:
            if self._closed:
                raise RuntimeError("the session is closing")
            while self._idle:
                worker = self._idle.pop()
                if worker.version == version:
                    break
                stale.append(worker)  # forked with other rules: a reload happened since
            else:
                worker = None
        for old in stale:
            self._end(old)
        return worker or self._fork()

    def _checkin(self, worker: Worker) -> None:
        with self._lock:
            if not self._closed:
                if worker.pending:  # it holds this thread's next files: the thread keeps it
                    self._local.worker = worker
                    self._kept.add(worker)
                else:
                    self._idle.append(worker)
                return
        self._end(worker)

    @staticmethod
    def _send(worker: Worker, target: Target, fd: int) -> None:
        request = json.dumps({"path": target.path, "origin": target.origin, "pid": target.pid,
                              "kind": target.kind, "size": target.size}).encode()
        socket.send_fds(worker.sock, [_HEADER.pack(len(request)) + request], [fd])
        worker.pending.append((target, fd))

    def _answer(self, worker: Worker, deadline: float | None) -> Any:
        """The next answer (the oldest file in flight): ``_CLEAN``, or the JSON value it holds."""
        while True:
            found = _split(worker.buffer, worker.pid)
            if found is not None:
                break
            self._fill(worker, deadline)
        used, payload = found
        del worker.buffer[:used]
        worker.pending.popleft()
        return _CLEAN if payload is None else _parse(payload)

    def _fill(self, worker: Worker, deadline: float | None) -> None:
        """Add what the process sent to its buffer: one ``recv`` when an answer is there, else a wait."""
        while True:
            try:
                chunk = worker.sock.recv(1 << 16)
            except ConnectionResetError:  # it died with files sent ahead unread
                chunk = b""
            except BlockingIOError:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no answer after {self.engine.call_timeout:g}s; worker process "
                                       f"{worker.pid} killed") from None
                worker.poll.poll(None if left is None else max(1, int(left * 1000) + 1))
                continue
            if not chunk:
                raise WorkerDied(f"worker process {worker.pid} {self._reap(worker)} while judging the file")
            worker.buffer += chunk
            return

    def _fork(self) -> Worker:
        """A new process, forked on the pool's own thread."""
        reply: Future = Future()
        with self._lock:  # never after close() has ended the forking thread
            if self._closed:
                raise RuntimeError("the session is closing")
            self._forks.put(reply)
        return reply.result()

    def _fork_on_request(self) -> None:
        while True:
            reply = self._forks.get()
            if reply is None:
                return
            try:
                reply.set_result(self._fork_here())
            except BaseException as exc:  # noqa: BLE001 - the caller's to raise
                reply.set_exception(exc)

    def _fork_here(self) -> Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        version = self.engine.version()
        with warnings.catch_warnings():  # Python 3.12+ warns of fork() in a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never returns into the session's code
            status = 1
            try:
                parent.close()
                _serve(self.engine, child)
                status = 0
            finally:
                os._exit(status)
        child.close()
        worker = Worker(pid, parent, version)
        with self._lock:
            self._live[pid] = worker
            self.forked += 1
        return worker

    def _end(self, worker: Worker) -> None:
        """Kill a process (it is hung, dead, stale or the session ends) and count its CPU time."""
        with self._lock:
            alive = worker.pid in self._live  # not yet reaped: the pid is still this process's
        if alive:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(worker)

    def _reap(self, worker: Worker) -> str:
        """Collect an ended process; what ended it."""
        worker.sock.close()
        with self._lock:
            if self._live.pop(worker.pid, None) is None:
                return "ended"
        try:
            _, status, usage = os.wait4(worker.pid, 0)
        except ChildProcessError:
            return "ended"
        with self._lock:
            self._retired_cpu += usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(status):
            return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exited with status {os.WEXITSTATUS(status)}"

    def close(self) -> None:
        """End every process: idle ones see their socket close; any still busy (a hung call) is killed."""
        with self._lock:
            self._closed = True
            idle, self._idle = [*self._idle, *self._kept], []
            self._kept.clear()
            live = list(self._live.values())
        if self._forker.is_alive():
            self._forks.put(None)
            self._forker.join()
        for worker in idle:
            worker.sock.close()  # it exits at the end of its socket (after a file sent ahead, if any)
        deadline = time.monotonic() + 1.0
        for worker in live:
            while time.monotonic() < deadline and _state(worker.pid) not in ("Z", ""):
                time.sleep(0.01)
            self._end(worker)

    # -- what the governor counts ----------------------------------------------------------------

    def cpu_seconds(self) -> float:
        """CPU time of this pool's processes, live and ended."""
        with self._lock:
            total, pids = self._retired_cpu, list(self._live)
        return total + sum(_cpu_of(pid) for pid in pids)

    def private_bytes(self) -> int:
        """Memory the processes do not share with the session (what they add to its RSS)."""
        return sum(_private_of(pid) for pid in self.pids)


def _state(pid: int) -> str:
    """The process's state letter ('Z' once it has exited), '' when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _private_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


# -- the child ------------------------------------------------------------------------------------


def _serve(engine: Engine, sock: socket.socket) -> None:
    """The worker process: one request at a time until the session closes its end."""
    for signum in signal.valid_signals():  # the session's handlers (SIGTERM, SIGHUP...) are not ours
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the session's to handle
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the session
    except (OSError, AttributeError):
        pass
    _close_inherited(sock.fileno())
    gc.freeze()  # the session's objects: the collector never walks them, so their pages stay shared
    buffer, fds = bytearray(), collections.deque()
    while True:
        try:
            request, fd = _receive(sock, buffer, fds)
        except EOFError:
            return
        try:
            target = Target(request["path"], origin=request["origin"], pid=request["pid"],
                            kind=request["kind"], size=request["size"])
            data = _frame(engine.scan(Subject(target, fd, os.fstat(fd))))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the session by name
            data = _frame(exc)
        finally:
            os.close(fd)
        sock.sendall(data)


def _close_inherited(keep: int) -> None:
    """Close the session's descriptors (sinks' connections, queued files): a worker process holds only
    its socket, stdin and stderr; stdout goes to /dev/null, so an engine's print never mixes into the
    stdout sink's records."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _receive(sock: socket.socket, buffer: bytearray, fds: collections.deque[int]) -> tuple[Mapping[str, Any], int]:
    """The next request (the session may have sent several ahead) and the descriptor sent with it."""
    while True:
        if len(buffer) >= _HEADER.size:
            size = _HEADER.size + _HEADER.unpack_from(buffer)[0]
            if len(buffer) >= size:
                if not fds:  # every request carries one descriptor: the session broke the protocol
                    raise EOFError
                request = json.loads(buffer[_HEADER.size:size])
                del buffer[:size]
                return request, fds.popleft()
        data, got, flags, _ = socket.recv_fds(sock, 1 << 16, 1)
        fds.extend(got)
        if not data or flags & socket.MSG_CTRUNC:
            raise EOFError
        buffer += data


def _frame(result: Any) -> bytes:
    """An answer as sent: four zero bytes for a clean file, else its length and JSON (an exception
    raised by the engine is sent by name and message; NotScanned by its reason)."""
    if isinstance(result, (list, tuple)) and not result:
        return _CLEAN
    if isinstance(result, NotScanned):
        value: Any = {"not_scanned": [result.reason, result.deterministic]}
    elif isinstance(result, BaseException):
        value = {"error": [type(result).__name__, str(result)]}
    else:
        value = _encode(result)
    data = json.dumps(value).encode()
    return _HEADER.pack(len(data)) + data


def _encode(result: Any) -> Any:
    if isinstance(result, KnownGood):
        return {"known_good": True}
    if isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__iter__"):
        return {"garbage": type(result).__name__}
    items = list(result)
    bad = next((x for x in items if not isinstance(x, Detection)), None)
    if bad is not None:
        return {"garbage": f"a {type(bad).__name__} among its detections"}
    return {"detections": [detection_fields(d) for d in items]}


def detection_fields(detection: Detection) -> list[Any]:
    """A detection as it crosses from a process to the session (here and in shares.py): seven fields,
    checked on arrival by ``is_detection_fields``."""
    d = detection
    return [d.engine, d.signature, d.types, d.class_, d.name, list(d.hit_data), plain(d.meta)]


def plain(value: Any) -> Any:
    """``value`` with JSON's shapes only: mappings keyed by strings, lists for tuples."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _split(buffer: bytearray, pid: int) -> tuple[int, bytes | None] | None:
    """The first answer in ``buffer``: (bytes it takes, its JSON, or None for clean), or None while it
    is incomplete. WorkerDied for an answer too large to be a verdict."""
    if len(buffer) < _HEADER.size:
        return None
    size = _HEADER.unpack_from(buffer)[0]
    if size > _MAX_ANSWER:
        raise WorkerDied(f"worker process {pid} sent an answer of {size} bytes")
    if not size:
        return _HEADER.size, None
    end = _HEADER.size + size
    return (end, bytes(buffer[_HEADER.size:end])) if len(buffer) >= end else None


def _parse(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        raise WorkerProcessError("sent a malformed answer") from None


def _decode(engine: str, answer: Any) -> tuple[Detection, ...] | KnownGood:
    """The verdict in a worker process's answer, checked field by field: the process reads untrusted
    files, so its answer is untrusted bytes too. Anything else raises WorkerProcessError (an error on
    the record, never a clean); the detections are the engine's own, whatever name the answer gives."""
    if not isinstance(answer, dict) or len(answer) != 1:
        raise WorkerProcessError("sent a malformed answer")
    (key, value), = answer.items()
    if key == "error" and isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        raise _remote(value[0])(value[1])
    if key == "not_scanned" and _is_reason(value):
        raise NotScanned(value[0], value[1])
    if key == "garbage" and isinstance(value, str):
        raise WorkerProcessError(f"returned {value}, expected a list of Detection")
    if key == "known_good" and value is True:
        return KNOWN_GOOD
    if key == "detections" and isinstance(value, list) and all(is_detection_fields(d) for d in value):
        return tuple(Detection(engine=engine, signature=s, types=t, class_=c, name=n, hit_data=tuple(h), meta=m)
                     for _, s, t, c, n, h, m in value)
    raise WorkerProcessError("sent a malformed answer")


def _is_reason(value: Any) -> bool:
    """A NotScanned's [reason, deterministic]: the reason is counted by its text, so it must be short
    and printable (a process that a file took over may make that file not scanned, never clean)."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and 0 < len(value[0]) <= MAX_REASON and value[0].isprintable() and isinstance(value[1], bool))


def is_detection_fields(item: Any) -> bool:
    return (isinstance(item, list) and len(item) == 7 and all(isinstance(v, str) for v in item[:5])
            and isinstance(item[5], list) and all(isinstance(h, str) for h in item[5])
            and isinstance(item[6], dict))
