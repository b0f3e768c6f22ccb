"""Scheduling: sources feed one bounded work queue from their own threads; a pool of worker threads
takes targets from it (or a target resumed after a hung call) and runs each through its stages
(targets.py). A fast source waits, so memory stays flat; the governor may park workers and pause feeding.
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
#: After a stop, how long in-flight calls and sinks get to finish before they are abandoned.
STOP_GRACE = 3.0


class Scheduling:
    """The session's part that moves targets from sources to workers (a mixin of ``runner.Session``):
    owns the work queue, ``_fed`` (every source has ended), ``_resumed`` (targets whose call was given
    up, for a fresh worker) and ``_workers`` (the live worker threads, in rank order)."""

    def _init_scheduling(self) -> None:
        self._work: queue.Queue = queue.Queue(maxsize=self.pipeline.limits.queue)
        self._fed = threading.Event()  # every source has ended: workers finish when the queue is empty
        self._resumed: collections.deque[Work] = collections.deque()
        self._workers: list[threading.Thread] = []

    def _grace_over(self) -> bool:
        """True once a stop was asked for ``STOP_GRACE`` seconds ago: what still runs is abandoned."""
        return self._stopped_at is not None and time.monotonic() - self._stopped_at > STOP_GRACE

    def _feed(self, source: Source) -> None:
        try:
            for item in source.targets():
                if isinstance(item, Target) and item.job is not None:
                    item.job.add()  # before anything can finish it
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
                        self._put(item)
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
        if self.cache is None or target.fd is None or target.report_clean:
            return False
        try:
            st = os.fstat(target.fd)
        except OSError:
            return False
        if not self.known_clean(st, target.path, target.once):
            return False
        os.close(target.fd)
        self._finish_job(target)
        return True

    def _put(self, item: Target) -> None:
        while self.governor.feeding_paused and self._work.qsize() and not self.stopping.is_set():
            self.stopping.wait(0.05)  # memory is tight: the queue drains before it takes more
        while not self.stopping.is_set():
            try:
                self._work.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        self._discard(item)

    def _discard(self, target: Target) -> None:
        with self._lock:
            self.summary.abandoned += 1
        if target.fd is not None:
            os.close(target.fd)
        if target.job is not None:
            target.job.finish(error=True)

    def _abandon_queued(self) -> None:
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Target):
                self._discard(item)

    def _abandon_in_flight(self) -> None:
        """Count the targets of calls that did not end by the stop's deadline (their threads are left),
        and the names still waiting for another name of their file."""
        with self._lock:
            works = {id(call.work) for call in self._calls.values()} | {id(w) for w in self._resumed}
            for call in self._calls.values():
                call.abandoned = True  # its thread drops the target when the call returns
            waiting = [w for key, w in self._waiting.items() if key not in works]
            self._resumed.clear()
            self._waiting.clear()
            self.summary.abandoned += len(works) + len(waiting)
        for work in waiting:
            work.release()
            self._finish_job(work.target, error=True)

    def _spawn_worker(self) -> None:
        thread = threading.Thread(target=self._worker, name="worker", daemon=True)
        with self._lock:
            self._workers.append(thread)
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
                return self._work.get(timeout=0.1)
            except queue.Empty:
                if self._fed.is_set():
                    return _DONE

    def _rank(self) -> int:
        """This worker's place among the live workers (the governor parks the ones it does not want)."""
        with self._lock:
            try:
                return self._workers.index(threading.current_thread())
            except ValueError:
                return 0

    def _worker(self) -> None:
        try:
            self._work_loop()
        finally:
            with self._lock:  # a finished worker no longer holds a rank
                if threading.current_thread() in self._workers:
                    self._workers.remove(threading.current_thread())

    def _work_loop(self) -> None:
        while True:
            item = self._next()
            if item is not _DONE:
                self.governor.pace()
            if item is _DONE:
                while self._resumed or self._calls_in_flight():
                    try:
                        self._advance(self._resumed.popleft())
                    except IndexError:
                        time.sleep(0.05)
                    except Abandoned:
                        return
                return
            work = item if isinstance(item, Work) else Work(item)
            try:
                self._advance(work)
            except Abandoned:
                return  # a replacement worker took over

