"""Tasks 6053 (scan one path) and 6057 (quick or full disk scan), built on the core's own walkers:
``Dirscan.walk`` and ``Procscan.scan_processes``, configured the way docs/elkeid-protocol.md section 3
describes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Optional

import attrs

from elkscan_core import Job, Record, Target
from elkscan_core.default_plugins.dirscan import Dirscan, DirscanConfig
from elkscan_core.default_plugins.procscan import Procscan, ProcscanConfig
from elkscan_core.governor import cpu_idle_quota
from elkscan_core.paths import ELKEID_ROOTS

from .mapping import SCAN_PROGRESS, TASK_RESULT, text
from .taskdata import TaskError, parse_json, positive_number

if TYPE_CHECKING:
    from .tasks import ElkeidTasks
    from .wire import Task

log = logging.getLogger("elkscan.elkeid")

TIMEOUT_MSG = "FullScan TimeOut."
DEFAULT_TIMEOUT_HOURS = {"quick": 1.0, "full": 48.0}
DEFAULT_CPU_IDLE = 10.0  # percent of the idle CPU a 6057 may use when the task does not say


class PathScan:
    """6053: a file, or a directory to depth 2 following links; one 6003 per file, then one 6000."""

    def __init__(self, source: ElkeidTasks, task: Task) -> None:
        self.source, self.task = source, task

    def run(self) -> None:
        token = self.task.token
        try:
            data = parse_json(self.task)
        except TaskError as exc:
            log.error("%s", exc)
            self.source.done(token, "failed", str(exc))
            return
        exe = data.get("exe")
        if not isinstance(exe, str) or not os.path.isabs(exe):
            log.error("task 6053 (token %r): exe must be an absolute path, got %r", token, exe)
            self.source.done(token, "failed", f"6053 exe is not an absolute path:{exe}")
            return
        if not os.path.exists(exe):
            self.source.done(token, "failed", f"6053 target not exists:{exe}")
            return
        cfg = self.source.config
        job = Job(token=token, fields=data)
        extra = {str(k): text(v) for k, v in data.items()}
        walker = Dirscan(DirscanConfig(roots={exe: 2}, exclude=[], min_size=cfg.min_size,
                                       max_size=cfg.max_size, type_filter=False, one_filesystem=False,
                                       links=cfg.task_links), self.source.session)
        # Files the walk does not judge (Elkeid's size bounds) get no 6003, as in Elkeid; they are counted.
        targets = (attrs.evolve(t, kind=TASK_RESULT, report_clean=not t.skip, extra=extra, job=job)
                   for t in walker.walk(exe, 2))
        if not self.source.hand_over(targets):
            return  # the session is stopping
        job.wait()
        self.source.done(token, "succeed")


class FullScan:
    """6057: the executables of all processes, then a walk (quick: the periodic scan's directories
    without depth limit on one filesystem; full: ``/``), inside the task's CPU budget and timeout."""

    def __init__(self, source: ElkeidTasks, task: Task) -> None:
        self.source, self.task = source, task
        self.job = Job(token=task.token)
        self.mode = "quick"
        self.started = self.deadline = self._last_progress = 0.0
        self.phase = "processes"
        self.found = 0
        self._walkers: list = []

    def run(self) -> None:
        token = self.task.token
        try:
            data = parse_json(self.task)
            self.mode = str(data.get("mode") or "quick")
            if self.mode not in DEFAULT_TIMEOUT_HOURS:
                raise TaskError(f"6057 mode must be quick or full, got {self.mode!r}")
            hours = positive_number(data, "timeout", DEFAULT_TIMEOUT_HOURS[self.mode], 6057)
            cpu_idle = positive_number(data, "cpu_idle", DEFAULT_CPU_IDLE, 6057)
        except TaskError as exc:
            log.error("%s", exc)
            self.source.done(token, "failed", str(exc))
            return
        self.started = time.monotonic()
        self.deadline = self.started + hours * 3600
        lift_budget = self._budget(cpu_idle)
        try:  # step 1, every process executable; then step 2, the walk (docs/elkeid-protocol.md section 3)
            finished = all(self.source.hand_over(step, self.deadline) and self._wait()
                           for step in self._steps())
        finally:
            lift_budget()
        if self.source.stopping.is_set():
            return
        if not finished:
            self.job.cancel()
            for walker in self._walkers:
                walker.stop()
            self.job.wait(5)
            log.info("6057 %s scan (token %r) timed out after %g h", self.mode, token, hours)
            self.source.done(token, "failed", TIMEOUT_MSG)
            return
        self.phase = "done"
        final = self._progress(force=True)
        if final is not None:
            self.source.emit(final)
        self.source.done(token, "succeed")

    # -- the targets --------------------------------------------------------------------------

    def _steps(self) -> Iterator[Iterator[Target | Record]]:
        cfg = self.source.config
        session = self.source.session
        processes = Procscan(ProcscanConfig(exclude=list(cfg.exclude), max_size=cfg.max_size), session)
        roots = cfg.full_roots if self.mode == "full" else (cfg.quick_roots or list(ELKEID_ROOTS))
        walker = Dirscan(DirscanConfig(roots={r: -1 for r in roots}, exclude=list(cfg.exclude),
                                       min_size=cfg.min_size, max_size=cfg.max_size, type_filter=False,
                                       one_filesystem=self.mode == "quick", links="inside"), session)
        self._walkers = [processes, walker]
        yield self._each(processes.scan_processes())
        self.phase = "files"
        yield self._each(target for root in walker.roots for target in walker.walk(root, -1))

    def _each(self, targets: Iterator[Target]) -> Iterator[Target | Record]:
        for target in targets:
            yield from self._one(target)

    def _one(self, target: Target) -> Iterator[Target | Record]:
        self.found += 1
        yield attrs.evolve(target, job=self.job)
        progress = self._progress()
        if progress is not None:
            yield progress

    def _wait(self) -> bool:
        """Wait for the last target handed over; False at the deadline."""
        step = self.source.config.progress or 1.0
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.job.wait(min(step, remaining)):
                return True
            if self.source.stopping.is_set():
                return False
            progress = self._progress()
            if progress is not None:
                self.source.emit(progress)

    def _progress(self, force: bool = False) -> Optional[Record]:
        """An elkscan progress record (6058) when one is due (every ``progress``, when configured)."""
        every = self.source.config.progress
        now = time.monotonic()
        if not every or (not force and now - self._last_progress < every):
            return None
        self._last_progress = now
        counts = self.job.counts
        return Record(kind=SCAN_PROGRESS, token=self.job.token, facts={
            "mode": self.mode, "phase": self.phase, "found": self.found, "scanned": counts["scanned"],
            "detected": counts["detections"], "errors": counts["errors"],
            "elapsed": int(now - self.started)})

    # -- the CPU budget -----------------------------------------------------------------------

    def _budget(self, cpu_idle: float) -> Callable[[], None]:
        """Elkeid's quota from the idle CPU, held by the session's governor for the length of the scan;
        returns the function that lifts it."""
        try:
            share, workers = cpu_idle_quota(cpu_idle / 100, self.source.config.cpu_sample or 0.1)
        except (OSError, ValueError) as exc:
            log.warning("cannot measure idle CPU (%s); 6057 runs at one CPU", exc)
            share, workers = 1.0, 1
        log.info("6057 budget: %.0f%% of a CPU (Elkeid would use %d worker(s); cpu_idle %g%%)",
                 share * 100, workers, cpu_idle)
        # The share alone: the worker count stays, because a worker parked by a lower count keeps the
        # target it already took, and this job would wait for it forever.
        governor = self.source.session.governor
        governor.set_cpu(share)
        previous = self.source.session.pipeline.limits.cpu
        return lambda: governor.set_cpu(previous)
