"""Worker processes for engines that hold the GIL (``Engine.releases_gil = False``).

On worker threads such an engine scans on one CPU whatever ``limits.workers`` says: the threads take
turns on one GIL. So each worker thread hands its calls to a worker process of its own, forked from the
session once the engine has started: the compiled rules are shared copy-on-write, not loaded again. A
call passes the open file's descriptor (``SCM_RIGHTS``) with the target's path; the process answers with
the detections as JSON (never pickle: a process that a file took over can lie about that file's verdict,
not run code in the session).

The worker thread keeps everything else: the call's isolation and deadline (isolation.py), the
governor's check-in before each file and its parking (the process waits while its thread does). A
process that does not answer by the engine's ``call_timeout`` (plus a second, so that the watchdog has
recorded the timeout) is killed; one that dies makes the call an error; a new process takes the place
of either at the next call. A reload shows in the engine's ``version()``: a process forked with other
rules is replaced before it is given a file. The governor counts the processes' CPU time in the CPU
share and their private memory in the memory ceiling (``cpu_seconds``, ``private_bytes``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import queue
import signal
import socket
import struct
import threading
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from .components import Engine, Subject
from .model import KNOWN_GOOD, Detection, KnownGood, Target

log = logging.getLogger("elkscan")

_HEADER = struct.Struct("!I")
_MAX_ANSWER = 64 << 20  # an answer larger than this is a broken process, not a verdict
_KILL_AFTER = 1.0  # seconds past the call's deadline: the watchdog has recorded the timeout by then
_PR_SET_PDEATHSIG = 1


class WorkerProcessError(Exception):
    """A call in a worker process failed; subclasses carry the name of the exception raised there."""


class WorkerDied(Exception):
    """The worker process ended (killed, crashed) while it judged the file."""


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

    __slots__ = ("pid", "sock", "version", "started")

    def __init__(self, pid: int, sock: socket.socket, version: str) -> None:
        self.pid, self.sock, self.version = pid, sock, version
        self.started = time.monotonic()


class Pool:
    """The worker processes of one engine: at most one per worker thread in a call, idle ones kept."""

    def __init__(self, engine: Engine, size: int) -> None:
        self.engine = engine
        self.size = size
        self._lock = threading.Lock()
        self._idle: list[Worker] = []
        self._live: dict[int, Worker] = {}  # pid -> worker, idle or busy
        self._retired_cpu = 0.0  # CPU seconds of processes that ended
        self._closed = False
        self.forked = 0  # processes started, for the metrics and tests
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
        for attempt in range(2):
            worker = self._checkout()
            try:
                self._send(worker, subject)
            except OSError:  # it died while idle (killed, out of memory): another one takes the file
                self._end(worker)
                if attempt:
                    raise
                continue
            try:
                answer = self._answer(worker)
            except BaseException:
                self._end(worker)
                raise
            self._checkin(worker)
            return _decode(self.engine.id, answer)
        raise AssertionError("unreachable")

    def _checkout(self) -> Worker:
        version = self.engine.version()
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
                self._idle.append(worker)
                return
        self._end(worker)

    @staticmethod
    def _send(worker: Worker, subject: Subject) -> None:
        target = subject.target
        request = json.dumps({"path": target.path, "origin": target.origin, "pid": target.pid,
                              "kind": target.kind, "size": target.size}).encode()
        socket.send_fds(worker.sock, [_HEADER.pack(len(request)) + request], [subject.fd])

    def _answer(self, worker: Worker) -> Any:
        """The process's answer: one ``recv`` for most (a header and a short JSON document)."""
        timeout = self.engine.call_timeout
        deadline = None if timeout is None else time.monotonic() + timeout + _KILL_AFTER
        data = self._read(worker, _HEADER.size, deadline, 1 << 16)
        size = _HEADER.unpack(data[:_HEADER.size])[0]
        if size > _MAX_ANSWER:
            raise WorkerDied(f"worker process {worker.pid} sent an answer of {size} bytes")
        return json.loads(self._read(worker, _HEADER.size + size, deadline, size, data)[_HEADER.size:])

    def _read(self, worker: Worker, size: int, deadline: float | None, most: int,
              data: bytearray | None = None) -> bytearray:
        """At least ``size`` bytes in ``data``, reading at most ``most`` at a time."""
        data = bytearray() if data is None else data
        while len(data) < size:
            worker.sock.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
            try:
                chunk = worker.sock.recv(min(most, 1 << 20))
            except socket.timeout:
                raise TimeoutError(f"no answer after {self.engine.call_timeout:g}s; worker process "
                                   f"{worker.pid} killed") from None
            if not chunk:
                raise WorkerDied(f"worker process {worker.pid} {self._reap(worker)} while judging the file")
            data += chunk
        return data

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
            idle, self._idle = self._idle, []
            live = list(self._live.values())
        if self._forker.is_alive():
            self._forks.put(None)
            self._forker.join()
        for worker in idle:
            worker.sock.close()  # it exits at the end of its socket
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
    while True:
        try:
            request, fd = _receive(sock)
        except EOFError:
            return
        try:
            target = Target(request["path"], origin=request["origin"], pid=request["pid"],
                            kind=request["kind"], size=request["size"])
            data = json.dumps(_encode(engine.scan(Subject(target, fd, os.fstat(fd))))).encode()
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the session by name
            data = json.dumps({"error": [type(exc).__name__, str(exc)]}).encode()
        finally:
            os.close(fd)
        sock.sendall(_HEADER.pack(len(data)) + data)


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


def _receive(sock: socket.socket) -> tuple[Mapping[str, Any], int]:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    if not data:
        raise EOFError
    size = _HEADER.unpack(data[:_HEADER.size])[0]
    data = bytearray(data[_HEADER.size:])
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    if len(fds) != 1:
        raise EOFError
    return json.loads(data), fds[0]


def _encode(result: Any) -> Any:
    if isinstance(result, KnownGood):
        return {"known_good": True}
    if isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__iter__"):
        return {"garbage": type(result).__name__}
    items = list(result)
    bad = next((x for x in items if not isinstance(x, Detection)), None)
    if bad is not None:
        return {"garbage": f"a {type(bad).__name__} among its detections"}
    return {"detections": [[d.engine, d.signature, d.types, d.class_, d.name, list(d.hit_data),
                            _plain(d.meta)] for d in items]}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _decode(engine: str, answer: Any) -> tuple[Detection, ...] | KnownGood:
    """The verdict in a worker process's answer, checked field by field: the process reads untrusted
    files, so its answer is untrusted bytes too. Anything else raises WorkerProcessError (an error on
    the record, never a clean); the detections are the engine's own, whatever name the answer gives."""
    if not isinstance(answer, dict) or len(answer) != 1:
        raise WorkerProcessError("sent a malformed answer")
    (key, value), = answer.items()
    if key == "error" and isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        raise _remote(value[0])(value[1])
    if key == "garbage" and isinstance(value, str):
        raise WorkerProcessError(f"returned {value}, expected a list of Detection")
    if key == "known_good" and value is True:
        return KNOWN_GOOD
    if key == "detections" and isinstance(value, list) and all(_is_detection(d) for d in value):
        return tuple(Detection(engine=engine, signature=s, types=t, class_=c, name=n, hit_data=tuple(h), meta=m)
                     for _, s, t, c, n, h, m in value)
    raise WorkerProcessError("sent a malformed answer")


def _is_detection(item: Any) -> bool:
    return (isinstance(item, list) and len(item) == 7 and all(isinstance(v, str) for v in item[:5])
            and isinstance(item[5], list) and all(isinstance(h, str) for h in item[5])
            and isinstance(item[6], dict))
