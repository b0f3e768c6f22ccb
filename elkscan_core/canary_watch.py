"""Canaries shown to the engines: proof, while a session runs, that each engine still detects what it
should.

Every ``canary_every`` the session hands each engine a buffer it must detect (its canary, canary.py) and
one it must pass, through the engine's own ``scan()`` and a real descriptor: a sealed ``memfd``, so the
buffer is never written to a file that another scanner on the host would flag. A wrong answer makes the
engine unhealthy until a later check passes (docs/metrics.md).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .canary import Canary
from .components import Engine, Subject
from .model import LOG, Detection, Outcome, Record, Target

log = logging.getLogger("elkscan.canary")

#: What every engine must call clean.
CLEAN = b"elkscan canary: plain text that no signature matches\n"
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _memfd(data: bytes, name: str) -> int:
    """A sealed in-memory file holding ``data``, read from the start."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Stopped(Exception):
    """The session stops: the canary call is left to finish on its own, and proves nothing."""


def _scan(engine: Engine, scan: Callable[[Subject], Any], data: bytes, name: str, timeout: float | None,
          stopping: threading.Event) -> tuple[Detection, ...]:
    """``engine.scan`` of ``data`` from memory, on a thread of its own so that a hung call is given up
    at its deadline, or as soon as the session stops."""
    fd = _memfd(data, name)
    answer: dict[str, Any] = {}

    def call() -> None:
        try:
            answer["result"] = tuple(scan(Subject(Target(name, origin="canary"), fd, os.fstat(fd))))
        except BaseException as exc:  # noqa: BLE001 - reported as the canary's failure
            answer["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=call, name=f"canary-{engine.id}", daemon=True)
    thread.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive() and (deadline is None or time.monotonic() < deadline):
        if stopping.is_set():
            raise _Stopped
        thread.join(0.1 if deadline is None else min(0.1, max(deadline - time.monotonic(), 0)))
    if thread.is_alive():
        raise TimeoutError(f"no answer after {timeout:g}s")
    if "error" in answer:
        raise answer["error"]
    return answer["result"]


def check(engine: Engine, canary: Canary, stopping: threading.Event | None = None,
          scan: Callable[[Subject], Any] | None = None) -> str:
    """Give ``engine`` its canary and the clean buffer (through ``scan``: the session's way to call it,
    ``engine.scan`` by default); what is wrong with its answers ('' when right, and when ``stopping``
    was set meanwhile: the caller then drops the answer)."""
    stopping = stopping or threading.Event()
    scan = scan or engine.scan
    try:
        problem = canary.problem(_scan(engine, scan, canary.data, "<canary>", engine.call_timeout, stopping))
        if not problem:
            found = _scan(engine, scan, CLEAN, "<clean canary>", engine.call_timeout, stopping)
            if found:
                problem = f"a clean buffer came back as {', '.join(d.signature for d in found)}"
    except _Stopped:
        return ""
    except Exception as exc:
        problem = f"the canary scan failed: {type(exc).__name__}: {exc}"
    return problem


class Watch:
    """Shows every engine its canary at start and then every ``every`` seconds, on its own thread;
    keeps each engine's last answer (``state``) for the health gauge and the metrics."""

    def __init__(self, session, every: float) -> None:
        self.session, self.every = session, every
        #: engine label -> {"ok": bool, "checked": unix time, "checks": n, "failures": n}
        self.state: dict[str, dict[str, Any]] = {}
        self._thread: threading.Thread | None = None

    @property
    def healthy(self) -> bool:
        return all(s["ok"] for s in self.state.values())

    def start(self) -> None:
        """The first round now, before any target (a one-shot run reports a broken engine too), then
        the timer thread."""
        self.check_all()
        self._thread = threading.Thread(target=self._loop, name="elkscan-canary", daemon=True)
        self._thread.start()

    def close(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self.session.stopping.wait(self.every):
            self.check_all()

    def check_all(self) -> None:
        session = self.session
        for engine in list(session.engines):
            if session.stopping.is_set():
                return
            try:
                canary = session.canary_of(engine)
            except Exception as exc:
                problem = f"its canary could not be had: {type(exc).__name__}: {exc}"
            else:
                if canary is None:
                    continue
                problem = check(engine, canary, session.stopping, session.scanner(engine))
            if session.stopping.is_set():
                return  # the engines may be closing: that answer proves nothing
            self._note(session.label(engine), problem)

    def _note(self, label: str, problem: str) -> None:
        state = self.state.setdefault(label, {"ok": True, "checked": 0.0, "checks": 0, "failures": 0})
        was_ok = state["ok"]
        state.update(ok=not problem, checked=time.time(), checks=state["checks"] + 1,
                     failures=state["failures"] + bool(problem))
        if not problem:
            if not was_ok:
                log.warning("engine %r passes its canary again", label)
            return
        message = f"canary: {problem}; this engine may have stopped detecting"
        outcome = Outcome(label, "failed", message=message)
        self.session.report(outcome)
        self.session.deliver(Record(kind=LOG, errors=(outcome,), facts={
            "level": "ERROR", "target": "elkscan.canary", "engine": label, "msg": f"{label}: {message}"}))
