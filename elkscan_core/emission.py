"""Emission to sinks: each sink has a single writer thread fed through a bounded queue, so records reach
it in order and a slow sink holds the scan back instead of memory growing. A sink whose call overruns
its ``call_timeout`` is given up: it gets nothing more, and the session's end does not wait for it.

Emission also settles targets' receipts (``model.Receipt``, from sources that consume messages): ack
when no record was wanted, or once every sink returned from ``write(record)`` and from a ``flush()``
after it; nak when a sink failed or was given up holding it, or the session ended first. Only records
of targets with a receipt are tracked (``_Tracked`` in the sinks' queues); a writer holding such records
flushes within ``FLUSH_WITHIN`` seconds or ``FLUSH_EVERY`` records.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import attrs

from .components import Sink
from .errors import Stop
from .model import Outcome, Receipt, Record, Target, record_id
from .scheduling import STOP_GRACE

log = logging.getLogger("elkscan")

_DONE = object()
#: How long a sink call may take before the sink is given up (a sink may set its own ``call_timeout``).
SINK_TIMEOUT = 30.0
#: How long a sink left behind at a stop may take to finish the record in hand.
LAST_RECORD_WAIT = 1.0
#: A sink holding records whose receipts wait is flushed within this many seconds, or at this many.
FLUSH_WITHIN = 0.2
FLUSH_EVERY = 256


class _Pending:
    """A receipt's record on its way to the sinks: acked when the last sink that took it has it."""

    __slots__ = ("receipt", "remaining")

    def __init__(self, receipt: Receipt, sinks: int) -> None:
        self.receipt = receipt
        self.remaining = sinks


class _Tracked:
    """What a sink's queue holds for a record whose target has a receipt (other records go as they are)."""

    __slots__ = ("record", "pending")

    def __init__(self, record: Record, pending: _Pending) -> None:
        self.record, self.pending = record, pending


class Emission:
    """The session's part that hands records to sinks (a mixin of ``runner.Session``): owns the sinks'
    queues, the calls they are in, and the sinks given up as hung."""

    def _init_emission(self) -> None:
        self._sink_queues: dict[int, queue.Queue] = {}  # id(sink) -> its writer's queue
        #: id(sink) -> (sink, when its call began, the tracked record it writes)
        self._sink_calls: dict[int, tuple[Sink, float, _Pending | None]] = {}
        self._given_up: set[int] = set()  # id(sink) of sinks given up as hung
        self._unflushed: dict[int, list[_Pending]] = {}  # id(sink) -> receipts' records written, not flushed
        self._unsettled: set[Receipt] = set()  # receipts of targets fed and not yet settled
        self._receipts_lock = threading.Lock()
        self._settled_all = False  # the session's end naked every receipt left: later ones are naked at once

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
        receipt = record.target.receipt if record.target is not None else None
        if receipt is None:
            for key, q in list(self._sink_queues.items()):
                self._queue_for(key, q, record)
            return
        self._track(receipt)
        queues = list(self._sink_queues.items())
        if self._given_up or not queues:  # a sink of the pipeline will never have it; or there is none
            self._settle(receipt, not (self._given_up or self.sinks))
        item = _Tracked(record, _Pending(receipt, len(queues)))
        for key, q in queues:
            if not self._queue_for(key, q, item) or key in self._given_up:  # given up as it was queued
                self._settle(receipt, False)

    def _queue_for(self, key: int, q: queue.Queue, item: Record | _Tracked) -> bool:
        """Queue an item for a sink; False when the sink was given up or the stop's grace is over first."""
        while key in self._sink_queues:
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                if self._grace_over():
                    return False
        return False

    # -- receipts ------------------------------------------------------------------------------

    def _track(self, receipt: Receipt) -> None:
        """A receipt entered the session: whatever becomes of its target, it is settled by the end."""
        with self._receipts_lock:
            if not self._settled_all:
                self._unsettled.add(receipt)
                return
        self._settle(receipt, False)

    def _end(self, target: Target, ok: bool) -> None:
        """The target ended without a record for the sinks (ok: it needed none; else it was abandoned)."""
        if target.receipt is not None:
            self._settle(target.receipt, ok)

    def _settle(self, receipt: Receipt, ok: bool) -> None:
        """Ack or nak, once (a later settlement of the same receipt does nothing); a source's function
        that raises is logged, never the session's problem."""
        with self._receipts_lock:
            self._unsettled.discard(receipt)
        try:
            receipt.ack() if ok else receipt.nak()
        except Exception:
            log.exception("a receipt's %s failed", "ack" if ok else "nak")

    def _done(self, pending: _Pending) -> None:
        """One sink has the record: the last one acks it."""
        with self._receipts_lock:
            pending.remaining -= 1
            last = pending.remaining == 0
        if last:
            self._settle(pending.receipt, True)

    def _settle_rest(self) -> None:
        """At the session's end: nak every receipt still unsettled (its target was abandoned, or a sink
        never had its record)."""
        with self._receipts_lock:
            self._settled_all = True
            rest, self._unsettled = self._unsettled, set()
        for receipt in rest:
            self._settle(receipt, False)

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
        self._unflushed[id(sink)] = []
        thread = threading.Thread(target=self._write, args=(sink, q), name=f"sink-{sink.id}", daemon=True)
        thread.start()
        return thread

    def _write(self, sink: Sink, q: queue.Queue) -> None:
        """The sink's writer thread: records in order, a flush when idle (or when records whose receipts
        wait have waited ``FLUSH_WITHIN``); a closed output stops the session."""
        closed = False
        unflushed = self._unflushed[id(sink)]
        due = 0.0  # when the oldest of the unflushed records must be flushed
        while True:
            wait = due - time.monotonic() if unflushed else 0.2
            try:
                item = q.get(timeout=wait) if wait > 0 else q.get_nowait()
            except queue.Empty:
                item = None
            pending = None
            if type(item) is _Tracked:
                item, pending = item.record, item.pending
            if closed:
                if pending is not None:
                    self._settle(pending.receipt, False)
            elif item is None or item is _DONE:
                closed = not self._call_sink(sink, None, None)
            else:
                if pending is not None and not unflushed:
                    due = time.monotonic() + FLUSH_WITHIN
                closed = not self._call_sink(sink, item, pending)
                if not closed and unflushed and (len(unflushed) >= FLUSH_EVERY or time.monotonic() >= due):
                    closed = not self._call_sink(sink, None, None)
            if item is _DONE:
                return

    def _call_sink(self, sink: Sink, record: Record | None, pending: _Pending | None) -> bool:
        """``sink.write(record)``, or ``sink.flush()`` when record is None, watched for a hang; settles
        the receipts this call decides. False when the sink's output is closed (the session stops)."""
        key = id(sink)
        unflushed = self._unflushed[key]
        self._sink_calls[key] = (sink, time.monotonic(), pending)
        try:
            if record is None:
                sink.flush()
            else:
                sink.write(record)
        except (Stop, BrokenPipeError) as exc:
            log.warning("sink %r is closed (%s); stopping the session", sink.id, type(exc).__name__)
            self._fail_unflushed(key, pending)
            self.stop()
            return False
        except Exception as exc:
            self.report(Outcome(sink.id, "failed", message=f"{type(exc).__name__}: {exc}"))
            if record is None:
                self._fail_unflushed(key, None)
            elif pending is not None:
                self._settle(pending.receipt, False)
        else:
            if pending is not None:
                unflushed.append(pending)
            elif record is None and unflushed:
                done, unflushed[:] = list(unflushed), []
                for each in done:
                    self._done(each)
        finally:
            self._sink_calls.pop(key, None)
        return True

    def _fail_unflushed(self, key: int, pending: _Pending | None) -> None:
        """Nak what a sink held unflushed (and the record in hand): it may never have it."""
        unflushed = self._unflushed.get(key, [])
        failed, unflushed[:] = list(unflushed), []
        if pending is not None:
            failed.append(pending)
        for each in failed:
            self._settle(each.receipt, False)

    def _check_sinks(self) -> None:
        """Give up a sink whose call overran its ``call_timeout``: it gets no more records, and the
        session never waits for it again."""
        now = time.monotonic()
        for key, (sink, started, pending) in list(self._sink_calls.items()):
            timeout = sink.call_timeout or SINK_TIMEOUT
            q = self._sink_queues.pop(key, None) if now - started > timeout else None
            if q is not None:
                self._given_up.add(key)
                log.warning("sink %r hangs (no answer after %gs); its records are dropped from now on",
                            sink.id, timeout)
                self.report(Outcome(sink.id, "timeout", now - started, f"no answer after {timeout:g}s"))
                self._fail_unflushed(key, pending)
                with q.mutex:
                    queued = [item.pending for item in q.queue if type(item) is _Tracked]
                for each in queued:
                    self._settle(each.receipt, False)

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
        self._settle_rest()

    def _leave(self, sink: Sink) -> int:
        """Take back what a sink still has to write, so that its writer stops after the record in hand
        (a record cut off by the process's exit would be a torn line in a JSON stream); how many."""
        q = self._sink_queues.pop(id(sink), None)
        unwritten = 0
        while q is not None:
            try:
                item = q.get_nowait()
            except queue.Empty:
                q.put(_DONE)  # room: nobody feeds it any more
                break
            unwritten += item is not _DONE
            if type(item) is _Tracked:
                self._settle(item.pending.receipt, False)
        return unwritten

