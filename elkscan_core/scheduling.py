"""Scheduling: sources feed one bounded work queue from their own threads; a pool of worker threads
takes targets from it (or a target resumed after a hung call) and runs each through its stages
(targets.py). A fast source waits, so memory stays flat; the governor may park workers and pause feeding.

Targets travel in batches of up to ``BATCH``: one hand-over between threads (a lock, a wake-up, a turn
of the GIL) for several files instead of one each. A source adds to the batch it queued last until a
worker takes it or it is full, so no target waits in a source for a batch to fill. A worker keeps the
rest of its batch where the watchdog finds it: when one of its calls hangs, the rest goes on on the
other workers; the governor's check-in (``pace``) stays per file.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from typing import Any

from .components import Source
from .errors import Stop
from .isolation import Abandoned
from .model import Outcome, Record, Target
from .targets import Work

log = logging.getLogger("elkscan")

_DONE = object()
_WAKE = ()  # queued once per worker behind the last batch when every source has ended
#: Targets handed to a worker at once (at most ``limits.queue``), and at most this many bytes of files
#: together: the hand-over costs as much as scanning a small file, nothing next to a large one, and a
#: batch of large files would leave the other workers idle at the end (docs/performance.md).
BATCH = 16
BATCH_BYTES = 1 << 20
#: How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). A worker back
#: from an engine that let go of the GIL waits for the thread that holds it, often the source's walk or
#: the other worker's bookkeeping; with files that take 0.1 ms to scan, 5 ms turns are what keeps two
#: workers from two CPUs (docs/performance.md, "The GIL's turns").
SWITCH_INTERVAL = 0.001
#: After a stop, how long in-flight calls and sinks get to finish before they are abandoned.
STOP_GRACE = 3.0


class Batch(list):
    """Targets queued together; ``taken`` once a worker has them (nothing is added then)."""

    __slots__ = ("taken", "bytes")

    def __init__(self, first: Target) -> None:
        super().__init__((first,))
        self.taken = False
        self.bytes = _size(first)


class Scheduling:
    """The session's part that moves targets from sources to workers (a mixin of ``runner.Session``):
    owns the work queue (of batches), ``_fed`` (every source has ended), ``_resumed`` (targets whose call
    was given up, and the rest of their worker's batch, for the other workers), ``_workers`` (the live
    worker threads, in rank order) and ``_held`` (the rest of each worker's batch)."""

    def _init_scheduling(self) -> None:
        bound = self.pipeline.limits.queue
        self._batch = min(BATCH, bound)
        self._work: queue.Queue = queue.Queue(maxsize=max(1, bound // self._batch))  # targets: about bound
        self._batch_lock = threading.Lock()  # a source adding to a queued batch, a worker taking it
        self._fed = threading.Event()  # every source has ended: workers finish when the queue is empty
        self._resumed: collections.deque[Work | Target] = collections.deque()
        self._workers: list[threading.Thread] = []
        self._held: dict[threading.Thread, collections.deque[Target]] = {}
        #: notified when a call leaves ``_calls`` or a target is resumed: a worker done with the queue waits
        #: on it for the calls still in flight (their targets may come back)
        self._calls_changed = threading.Condition(self._lock)

    def _all_fed(self) -> None:
        """Every source has ended: the workers finish when the queue is empty, and those waiting for work
        learn it now rather than at their next timeout."""
        self._fed.set()
        for _ in range(self.pipeline.limits.workers):
            try:
                self._work.put_nowait(_WAKE)
            except queue.Full:
                return  # the queue holds work: no worker is waiting for it

    def _grace_over(self) -> bool:
        """True once a stop was asked for ``STOP_GRACE`` seconds ago: what still runs is abandoned."""
        return self._stopped_at is not None and time.monotonic() - self._stopped_at > STOP_GRACE

    def _feed(self, source: Source) -> None:
        batch: Batch | None = None  # the last batch this source queued
        try:
            for item in source.targets():
                if isinstance(item, Target):
                    if item.job is not None:
                        item.job.add()  # before anything can finish it
                    if item.receipt is not None:
                        self._track(item.receipt)  # settled by the session's end at the latest
                if self.stopping.is_set():
                    if isinstance(item, Target):
                        self._discard(item)
                    break
                if isinstance(item, Record):
                    self.deliver(item)
                elif isinstance(item, Target):
                    if item.skip:
                        work = Work(item)
                        self._not_scanned(work, item.skip)
                        work.release()
                    elif source.asks_known_clean or not self._known_clean(item):
                        batch = self._hand_over(item, batch)
                else:
                    self.report(Outcome(source.id, "garbage", message=f"yielded {type(item).__name__}"))
        except Stop:
            self.stop()
        except Exception as exc:
            log.debug("source %r failed", source.id, exc_info=True)
            self.report(Outcome(source.id, "failed", message=f"{type(exc).__name__}: {exc}"))

    def _known_clean(self, target: Target) -> bool:
        """Finish here, in the source's thread, a target that every engine found clean as it is now (the
        verdict cache) and that nobody asked to see reported: no trip through the queue and a worker."""
        if self.cache is None or target.fd is None or target.report_clean or not target.has_content:
            return False
        try:
            st = os.fstat(target.fd)
        except OSError:
            return False
        if not self.known_clean(st, target.path, target.once):
            return False
        os.close(target.fd)
        self._end(target, True)
        self._finish_job(target)
        return True

    def _hand_over(self, target: Target, batch: Batch | None) -> Batch | None:
        """Queue ``target``: in ``batch``, the last one its source queued, while no worker has taken it
        and it has room, else in a new batch, which is returned."""
        if batch is not None:
            size = _size(target)
            with self._batch_lock:
                if not batch.taken and len(batch) < self._batch and batch.bytes + size <= BATCH_BYTES:
                    batch.append(target)
                    batch.bytes += size
                    return batch
        batch = Batch(target)
        return batch if self._put(batch) else None

    def _put(self, batch: Batch) -> bool:
        while self.governor.feeding_paused and self._work.qsize() and not self.stopping.is_set():
            self.stopping.wait(0.05)  # memory is tight: the queue drains before it takes more
        while not self.stopping.is_set():
            try:
                self._work.put(batch, timeout=0.2)
                return True
            except queue.Full:
                continue
        self._discard(batch[0])
        return False

    def _discard(self, target: Target) -> None:
        with self._lock:
            self.summary.abandoned += 1
        if target.fd is not None:
            os.close(target.fd)
        self._end(target, False)
        if target.job is not None:
            target.job.finish(error=True)

    def _abandon_queued(self) -> None:
        while True:
            try:
                batch = self._work.get_nowait()
            except queue.Empty:
                return
            for target in self._take(batch) if batch is not _WAKE else ():
                self._discard(target)

    def _take(self, batch: Batch) -> Batch:
        with self._batch_lock:
            batch.taken = True  # its source adds no more to it
        return batch

    @property
    def queue_depth(self) -> int:
        """Targets waiting for a worker."""
        with self._work.mutex:
            return sum(len(batch) for batch in self._work.queue)

    def _abandon_in_flight(self) -> None:
        """Count the targets of calls that did not end by the stop's deadline (their threads are left),
        and the names still waiting for another name of their file."""
        with self._lock:
            works = {id(call.work): call.work for call in self._calls.values()}
            works.update((id(w), w) for w in self._resumed if isinstance(w, Work))
            unopened = [t for t in self._resumed if isinstance(t, Target)]
            for call in self._calls.values():
                call.abandoned = True  # its thread drops the target when the call returns
                unopened.extend(self._held.pop(call.thread, ()))  # the rest of its batch
            waiting = [w for key, w in self._waiting.items() if key not in works]
            self._resumed.clear()
            self._waiting.clear()
            self.summary.abandoned += len(works) + len(waiting)
        for work in works.values():
            self._end(work.target, False)
        for work in waiting:
            work.release()
            self._end(work.target, False)
            self._finish_job(work.target, error=True)
        for target in unopened:
            self._discard(target)

    def _spawn_worker(self) -> None:
        thread = threading.Thread(target=self._worker, name="worker", daemon=True)
        with self._lock:
            self._workers.append(thread)
            self._held[thread] = collections.deque()
        thread.start()

    def _next(self) -> Any:
        while True:
            try:
                return self._resumed.popleft()
            except IndexError:
                pass
            if self.stopping.is_set() and self._fed.is_set():
                return _DONE
            if not self.governor.may_take(self._rank):
                time.sleep(0.1)  # parked (memory, pressure, fewer workers): take nothing, hold nothing
                continue
            try:
                batch = self._work.get_nowait() if self._fed.is_set() else self._work.get(timeout=0.1)
            except queue.Empty:
                if self._fed.is_set():
                    return _DONE
                continue
            return _DONE if batch is _WAKE else self._take(batch)  # after _WAKE the queue holds no batch

    def _rank(self) -> int:
        """This worker's place among the live workers (the governor parks the ones it does not want)."""
        with self._lock:
            try:
                return self._workers.index(threading.current_thread())
            except ValueError:
                return 0

    def _worker(self) -> None:
        held = self._held[threading.current_thread()]
        try:
            self._work_loop(held)
        except BaseException:  # a bug killed this worker: the rest of its batch goes on on the others
            with self._lock:
                self._resumed.extend(held)
                held.clear()
            raise
        finally:
            with self._lock:  # a finished worker no longer holds a rank
                if threading.current_thread() in self._workers:
                    self._workers.remove(threading.current_thread())
                self._held.pop(threading.current_thread(), None)
                rest = list(held)  # left when a component's Stop ended the session
                held.clear()
            for target in rest:
                self._discard(target)

    def _work_loop(self, held: collections.deque[Target]) -> None:
        """Targets one at a time, the rest of this worker's batch first: on a hang the watchdog gives that
        rest to the other workers (``held``), and this thread retires (Abandoned)."""
        while True:
            item = held.popleft() if held else self._next()
            if isinstance(item, Batch):
                held.extend(item)
                continue
            if item is not _DONE:
                self.governor.pace()
            if item is _DONE:
                while self._resumed or self._calls_in_flight():
                    try:
                        resumed = self._resumed.popleft()  # a call given up, or the rest of its batch
                    except IndexError:
                        with self._lock:
                            if self._calls and not self._resumed:
                                self._calls_changed.wait(0.05)
                        continue
                    if not self._judge_one(resumed if isinstance(resumed, Work) else Work(resumed)):
                        return
                return
            if not self._judge_one(item if isinstance(item, Work) else Work(item)):
                return  # a replacement worker took over

    def _judge_one(self, work: Work) -> bool:
        """Take one target through its stages; False when its call was given up (this thread retires).
        A worker that dies of a bug naks the target's receipt: its message comes again."""
        try:
            self._advance(work)
        except Abandoned:
            return False
        except Stop:  # a component's call stopped the session (isolation.py): this target is abandoned
            work.release()
            with self._lock:
                self.summary.abandoned += 1
            self._end(work.target, False)
            self._finish_job(work.target, error=True)
            return False
        except BaseException:
            self._end(work.target, False)
            raise
        return True


def _size(target: Target) -> int:
    """What a target weighs in a batch: its size, or a whole batch's worth when the source did not say;
    nothing when it has no content here to read (a digest target)."""
    if not target.has_content:
        return 0
    return BATCH_BYTES if target.size is None else target.size
