"""Emission to sinks: each sink has a single writer thread fed through a bounded queue, so records reach
it in order and a slow sink holds the scan back instead of memory growing. A sink whose call overruns
its ``call_timeout`` is given up: it gets nothing more, and the session's end does not wait for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import attrs

from .components import Sink
from .errors import Stop
from .model import Outcome, Record, record_id
from .scheduling import STOP_GRACE

log = logging.getLogger("elkscan")

_DONE = object()
#: How long a sink call may take before the sink is given up (a sink may set its own ``call_timeout``).
SINK_TIMEOUT = 30.0
#: How long a sink left behind at a stop may take to finish the record in hand.
LAST_RECORD_WAIT = 1.0


class Emission:
    """The session's part that hands records to sinks (a mixin of ``runner.Session``): owns the sinks'
    queues, the calls they are in, and the sinks given up as hung."""

    def _init_emission(self) -> None:
        self._sink_queues: dict[int, queue.Queue] = {}  # id(sink) -> its writer's queue
        self._sink_calls: dict[int, tuple[Sink, float]] = {}  # id(sink) -> (sink, when its call began)
        self._given_up: set[int] = set()  # id(sink) of sinks given up as hung

    def given_up(self, sink: Sink) -> bool:
        """True once the sink hung past its ``call_timeout``: it gets no more records."""
        return id(sink) in self._given_up

    def deliver(self, record: Record) -> None:
        """Give the record its id, and hand it to every sink's writer (waits while a sink's queue is full,
        until the stop's grace is over); a sink given up as hung gets nothing more."""
        if not record.id:
            versions = {d.engine: self._rule_version(d.engine) for d in record.detections}
            record = attrs.evolve(record, id=record_id(record, self.host, versions))
        with self._lock:
            self.summary.records += 1
        for key, q in list(self._sink_queues.items()):
            while key in self._sink_queues:
                try:
                    q.put(record, timeout=0.2)
                    break
                except queue.Full:
                    if self._grace_over():
                        break

    def _rule_version(self, engine_id: str) -> str:
        """The version of the rules of the engine(s) with this id, for record ids ('' when unknown)."""
        versions = []
        for engine in self.engines:
            if engine.id == engine_id:
                try:
                    versions.append(str(engine.version()))
                except Exception:
                    log.debug("engine %r: version() failed", engine_id, exc_info=True)
        return "|".join(versions)

    def _start_sink(self, sink: Sink) -> threading.Thread:
        q: queue.Queue = queue.Queue(maxsize=1024)
        self._sink_queues[id(sink)] = q
        thread = threading.Thread(target=self._write, args=(sink, q), name=f"sink-{sink.id}", daemon=True)
        thread.start()
        return thread

    def _write(self, sink: Sink, q: queue.Queue) -> None:
        """The sink's writer thread: records in order; a closed output stops the session."""
        closed = False
        while True:
            try:
                record = q.get(timeout=0.2)
            except queue.Empty:
                record = None
            if not closed:
                self._sink_calls[id(sink)] = (sink, time.monotonic())
                try:
                    if record is None or record is _DONE:
                        sink.flush()
                    else:
                        sink.write(record)
                except (Stop, BrokenPipeError) as exc:
                    log.warning("sink %r is closed (%s); stopping the session", sink.id,
                                type(exc).__name__)
                    closed = True
                    self.stop()
                except Exception as exc:
                    self.report(Outcome(sink.id, "failed", message=f"{type(exc).__name__}: {exc}"))
                finally:
                    self._sink_calls.pop(id(sink), None)
            if record is _DONE:
                return

    def _check_sinks(self) -> None:
        """Give up a sink whose call overran its ``call_timeout``: it gets no more records, and the
        session never waits for it again."""
        now = time.monotonic()
        for key, (sink, started) in list(self._sink_calls.items()):
            timeout = sink.call_timeout or SINK_TIMEOUT
            if now - started > timeout and self._sink_queues.pop(key, None) is not None:
                self._given_up.add(key)
                log.warning("sink %r hangs (no answer after %gs); its records are dropped from now on",
                            sink.id, timeout)
                self.report(Outcome(sink.id, "timeout", now - started, f"no answer after {timeout:g}s"))

    def _finish_sinks(self, threads: list[threading.Thread]) -> None:
        """Let each sink write what it was given and flush; a hung sink, or any sink still busy when a
        stop's grace is over, is left behind."""
        for key, q in list(self._sink_queues.items()):
            while key in self._sink_queues and not self._grace_over():
                try:
                    q.put(_DONE, timeout=0.2)
                    break
                except queue.Full:
                    self._check_sinks()
        for sink, thread in zip(self.sinks, threads):
            while thread.is_alive() and id(sink) in self._sink_queues:
                thread.join(0.1)
                self._check_sinks()
                if self._grace_over():
                    unwritten = self._leave(sink)
                    thread.join(LAST_RECORD_WAIT)
                    log.warning("sink %r did not finish within %gs of the stop; leaving it with %d record(s) "
                                "not written", sink.id, STOP_GRACE, unwritten)
                    break

    def _leave(self, sink: Sink) -> int:
        """Take back what a sink still has to write, so that its writer stops after the record in hand
        (a record cut off by the process's exit would be a torn line in a JSON stream); how many."""
        q = self._sink_queues.pop(id(sink), None)
        unwritten = 0
        while q is not None:
            try:
                unwritten += q.get_nowait() is not _DONE
            except queue.Empty:
                q.put(_DONE)  # room: nobody feeds it any more
                break
        return unwritten

