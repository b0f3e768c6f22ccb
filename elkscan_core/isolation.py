"""Isolation and timeouts of component calls: one engine's or enricher's call on one target.

Every (component x target) call is isolated: an exception, a result of the wrong type or a call that
overruns the component's ``call_timeout`` becomes an ``Outcome`` on the record and a counter, and the
scan goes on. A call that hangs is abandoned to its thread; the target continues on a fresh worker (the
watchdog gives it to scheduling.py), and the abandoned thread drops it when the call returns. A call
that raises ``errors.Stop`` (or ``KeyboardInterrupt``) stops the session: its target is abandoned.

An engine that holds the GIL scans in worker processes (processes.py), called from the worker threads
under the same isolation. An engine that is not ``thread_safe`` gets one call at a time; while one of its calls hangs, the others
fail at once (an error on their records) instead of queueing behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .components import Component, Engine, Enricher, Subject
from .errors import Stop
from .model import RECORD_FIELDS, Detection, KnownGood, NotScanned, Outcome, Target
from .targets import Work

if TYPE_CHECKING:
    from .processes import Pool

log = logging.getLogger("elkscan")


class Call:
    """An in-flight component call, watched for its deadline."""

    __slots__ = ("work", "stage", "component", "deadline", "started", "abandoned", "thread", "serial")

    def __init__(self, work: Work, component: Component, started: float) -> None:
        self.work, self.stage, self.component = work, work.stage, component
        self.thread = threading.current_thread()
        self.started = started
        self.deadline = started + component.call_timeout if component.call_timeout else None
        self.abandoned = False
        self.serial: Serial | None = None  # the engine's one-at-a-time lock, while this call holds it


class Serial:
    """The lock that gives an engine that is not thread-safe one call at a time, and the target of its
    call that hangs holding it ('' when none does)."""

    __slots__ = ("lock", "hung")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hung = ""


class Busy(Exception):
    """An engine that is not thread-safe is held by a call that hangs: no other call is made to it."""


class Abandoned(Exception):
    """The watchdog gave this call up; the worker thread that made it retires."""



class Isolation:
    """The session's part that calls components (a mixin of ``runner.Session``): owns ``_calls``, the
    calls in flight by thread id."""

    def _init_isolation(self) -> None:
        self._calls: dict[int, Call] = {}
        self._serial: dict[int, Serial] = {}  # id(engine) -> its lock, for engines called one at a time
        self._pools: dict[int, Pool] = {}  # id(engine) -> its worker processes, for engines holding the GIL

    def _place(self, engines: Iterable[Engine], workers: int, processes: bool = True) -> None:
        """Where each started engine's calls run: in worker processes when it holds the GIL and reads
        the open file (unless ``processes`` is False: a share's process is one already); else on the
        worker threads, one call at a time when it is not thread-safe."""
        for engine in engines:
            if not engine.thread_safe:  # its calls in this process (judge_digests; scan() on threads)
                self._serial[id(engine)] = Serial()
            if not processes:
                continue
            if not engine.releases_gil and engine.accepts_fd:
                from .processes import Pool  # here: a scan on threads alone does without it (and ctypes)

                pool = Pool(engine, workers, self._upcoming_for(engine))
                pool.start()
                self._pools[id(engine)] = pool
                self.governor.include(pool)
                log.info("engine %r holds the GIL: it scans in %d worker processes", engine.id, workers)
            elif not engine.releases_gil:
                log.info("engine %r holds the GIL but reads files by name: it scans on the worker threads, "
                         "one CPU at most", engine.id)

    def _upcoming_for(self, engine: Engine) -> Callable[[], Sequence[Target]]:
        """What the calling worker thread judges next (the rest of its batch), for a worker process to
        be sent ahead; nothing when the verdict cache is on (its claim comes before the engine reads)
        or an engine before this one may vouch for a file (this one is then not asked)."""
        before = self.engines[:self.engines.index(engine)]

        def upcoming() -> Sequence[Target]:
            if self.cache is not None or any(other.vouches for other in before):
                return ()
            return self._held.get(threading.current_thread(), ())
        return upcoming

    def _close_pools(self) -> None:
        for pool in self._pools.values():
            try:
                pool.close()
            except Exception:
                log.exception("the worker processes of engine %r failed to close", pool.engine.id)

    def _call(self, work: Work, component: Component, fn: Callable, *args: Any) -> Any:
        """One isolated component call: returns its checked result, or None after recording why not."""
        now = time.monotonic()
        call = Call(work, component, now)
        ident = threading.get_ident()
        with self._lock:
            self._calls[ident] = call
        status, message, result, stopped = "ok", "", None, ""
        # a worker process makes one call at a time: only calls in this process take the engine's lock
        pool = self._pools.get(id(component))
        in_pool = pool is not None and getattr(fn, "__self__", None) is pool
        serial = None if in_pool else self._serial.get(id(component))
        try:
            result = fn(*args) if serial is None else _one_at_a_time(serial, component, call, fn, args)
        except (Stop, KeyboardInterrupt) as exc:
            stopped = type(exc).__name__
        except NotScanned as exc:  # an engine's own limit: an outcome (check_result), not a failure
            result = exc
        except Exception as exc:
            status, message = "failed", f"{type(exc).__name__}: {exc}"
            log.debug("%s %r failed on %s", component.kind, component.id, work.target.path, exc_info=True)
        with self._lock:
            self._calls.pop(ident, None)
            abandoned = call.abandoned
            if self._fed.is_set():  # workers done with the queue wait for the calls in flight
                self._calls_changed.notify_all()
        if stopped:  # errors.Stop: an orderly end of the session, not a dead worker and a session that waits
            log.warning("%s %r raised %s on %s; stopping the session", component.kind, component.id, stopped,
                        work.target.path)
            self.stop()
        if abandoned:
            work.release()
            raise Abandoned
        if stopped:
            raise Stop
        if self.metrics is not None and isinstance(component, Engine):
            self.metrics.observe_scan(self.label(component), time.monotonic() - now)
        if status == "ok":
            result, problem = check_result(component, result)
            if problem:
                status, message = "garbage", problem
        if status != "ok":
            self._fail(work, Outcome(component.id, status, time.monotonic() - now, message,
                                     work.target.path))
            return None
        return result

    def scanner(self, engine: Engine) -> Callable[[Subject], Any]:
        """``engine.scan`` as the session makes it: in the engine's worker processes when it has them
        (so the canary watch checks what judges the files), one call at a time when it is not
        thread-safe."""
        pool = self._pools.get(id(engine))
        if pool is not None:
            return pool.scan
        serial = self._serial.get(id(engine))
        if serial is None:
            return engine.scan
        return lambda subject: _one_at_a_time(serial, engine, None, engine.scan, (subject,))

    def _fail(self, work: Work, outcome: Outcome) -> None:
        with work.lock:
            work.errors.append(outcome)
        self._notify_error(outcome)

    def _watchdog(self) -> None:
        """Give up on calls past their deadline: the target resumes on a fresh worker."""
        while not (self.stopping.is_set() and not self._calls):
            time.sleep(0.05)
            self._check_sinks()
            now = time.monotonic()
            overdue, timeouts = [], []
            with self._lock:
                for call in self._calls.values():
                    if call.deadline is not None and now > call.deadline:
                        overdue.append(call)
                for call in overdue:
                    call.abandoned = True
                    serial = call.serial
                    if serial is not None:
                        serial.hung = call.work.target.path
                    self._calls = {k: v for k, v in self._calls.items() if v is not call}
                    self._workers.remove(call.thread)  # retired: the run no longer waits for it
                    outcome = Outcome(call.component.id, "timeout", now - call.started,
                                      f"no answer after {call.component.call_timeout:g}s",
                                      call.work.target.path)
                    with call.work.lock:
                        call.work.holders += 1
                        call.work.stage = call.stage + 1
                        call.work.errors.append(outcome)
                    # Queued before the call leaves _calls' view, so no worker retires in between; the rest
                    # of the worker's batch goes on on the other workers.
                    self._resumed.append(call.work)
                    held = self._held.pop(call.thread, None)
                    if held:
                        self._resumed.extend(held)
                        held.clear()
                    timeouts.append(outcome)
                if overdue:
                    self._calls_changed.notify_all()
            for call, outcome in zip(overdue, timeouts):
                work = call.work
                self._notify_error(outcome)
                log.warning("%s %r hangs on %s; continuing without it", call.component.kind,
                            call.component.id, work.target.path)
                self._spawn_worker()

    def _calls_in_flight(self) -> bool:
        with self._lock:
            return bool(self._calls or self._resumed)


def _one_at_a_time(serial: Serial, component: Component, call: Call | None, fn: Callable, args: tuple) -> Any:
    """``fn(*args)`` once no other call to the engine runs; Busy while one hangs holding it."""
    while not serial.lock.acquire(timeout=0.05):
        if serial.hung:
            raise Busy(f"{component.id} is not thread-safe and its call on {serial.hung} hangs; no other "
                       "call is made to it meanwhile")
    try:
        if call is not None:
            if call.abandoned:  # given up while it waited: the call is not made
                return None
            call.serial = serial
        return fn(*args)
    finally:
        if call is not None:
            call.serial = None
        serial.hung = ""
        serial.lock.release()


def check_result(component: Component, result: Any) -> tuple[Any, str]:
    """Validate what a component returned against its protocol; garbage is named, not trusted."""
    if result is None:
        expected = "a list of Detection ([] when clean)" if isinstance(component, Engine) else "a mapping"
        return None, f"returned None, expected {expected}"
    if isinstance(component, Engine):
        if type(result) in (list, tuple) and not result:  # clean: most files, no questions to ask
            return (), ""
        if isinstance(result, NotScanned):
            return result, ""
        if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
            return None, f"returned {type(result).__name__}, expected a list of Detection"
        if isinstance(result, KnownGood):
            return result, ""
        items = tuple(result)
        bad = next((x for x in items if not isinstance(x, Detection)), None)
        if bad is not None:
            return None, f"returned a {type(bad).__name__} among its detections, expected Detection"
        return items, ""
    if isinstance(component, Enricher):
        if not isinstance(result, Mapping) or not all(isinstance(k, str) for k in result):
            return None, f"returned {type(result).__name__}, expected a mapping of field names to values"
        taken = sorted(RECORD_FIELDS.intersection(result))
        if taken:
            return None, f"tried to set the record's own field(s) {', '.join(taken)}; rename its facts"
        odd = next((k for k, v in result.items() if not _is_fact(v)), None)
        if odd is not None:
            return None, (f"returned a {type(result[odd]).__name__} for {odd!r}; a fact is a string, bytes, a "
                          "number, true/false, None, or a list or mapping of those")
        return result, ""
    return result, ""


def _is_fact(value: Any, depth: int = 0) -> bool:
    """A value every sink can render as it is: JSON's types (and bytes, kept reversibly)."""
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return True
    if depth < 8 and isinstance(value, (list, tuple)):
        return all(_is_fact(v, depth + 1) for v in value)
    if depth < 8 and isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_fact(v, depth + 1) for k, v in value.items())
    return False

