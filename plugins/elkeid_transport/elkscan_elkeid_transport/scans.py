"""Tasks 6053 (scan one path) and 6057 (quick or full disk scan), built on the core's own walkers:
``Dirscan.walk`` and ``Procscan.scan_processes``, configured the way docs/elkeid-protocol.md section 3
describes."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Optional

import attrs

from elkscan_core import Job, Record, Target
from elkscan_core.default_plugins.dirscan import DirscanConfig
from elkscan_core.default_plugins.procscan import Procscan, ProcscanConfig
from elkscan_core.governor import cpu_idle_quota
from elkscan_core.paths import ELKEID_ROOTS
from elkscan_core.units import MiB

from .mapping import SCAN_PROGRESS, TASK_RESULT, text
from .taskdata import TaskError, parse_json, positive

if TYPE_CHECKING:
    from .tasks import ElkeidTasks
    from .wire import Task

log = logging.getLogger("elkscan.elkeid")

TIMEOUT_MSG = "FullScan TimeOut."
DEFAULT_TIMEOUT_HOURS = {"quick": 1.0, "full": 48.0}
#: Elkeid's defaults for what a 6057 does not set (settings.toml [fullscan]): percent of the idle CPU,
#: CPU in percent of one CPU when idle time cannot be measured, memory in MB.
DEFAULTS = {"cpu_idle": 30.0, "cpu": 600.0, "mem": 512.0}


_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_type(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")


class NotRegular(Exception):
    """The path is not a regular file; the message says what it is instead."""


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` (links followed, as Elkeid does for the path a task names) only if it is a regular
    file: the type is checked on an ``O_PATH`` descriptor, which reads nothing, and the file is then
    reopened through it, so no FIFO or device is ever opened, even if the path is swapped meanwhile."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    probe = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(probe)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"it is {file_type(st.st_mode)}, not a regular file")
        try:
            fd = os.open(f"/proc/self/fd/{probe}", flags)
        except FileNotFoundError:  # no /proc: open the path, then check it is the file typed above
            fd = os.open(path, flags)
    finally:
        os.close(probe)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise NotRegular("it was replaced while it was opened")
    return fd, opened


class TaskScan:
    """What 6053 and 6057 share: the walk failures that end the task ``failed`` (never silently)."""

    def __init__(self, source: ElkeidTasks, task: Task) -> None:
        self.source, self.task = source, task
        self.failures: list[str] = []
        self.answered = False

    def finish(self, status: str, msg: str = "") -> None:
        """The task's one 6000."""
        self.answered = True
        self.source.done(self.task.token, status, msg)

    def guarded(self, what: str, targets: Iterator[Target]) -> Iterator[Target]:
        """``targets``, ending early if the walk raises: the failure is logged (a 1010) and remembered,
        so the targets already found are still judged and the task ends ``failed`` with the reason."""
        try:
            yield from targets
        except Exception as exc:
            failure = f"{what} stopped: {type(exc).__name__}: {exc}"
            log.error("task %d (token %r): %s", self.task.data_type, self.task.token, failure)
            self.failures.append(failure)

    def outcome(self) -> tuple[str, str]:
        return ("failed", "; ".join(self.failures)) if self.failures else ("succeed", "")


class PathScan(TaskScan):
    """6053: a file, or a directory to depth 2 following links; one 6003 per file, then one 6000."""

    def run(self) -> None:
        token = self.task.token
        try:
            data = parse_json(self.task)
        except TaskError as exc:
            log.error("%s", exc)
            self.finish("failed", str(exc))
            return
        exe = data.get("exe")
        if not isinstance(exe, str) or not os.path.isabs(exe):
            log.error("task 6053 (token %r): exe must be an absolute path, got %r", token, exe)
            self.finish("failed", f"6053 exe is not an absolute path:{exe}")
            return
        job = Job(token=token, fields=data)
        extra = {str(k): text(v) for k, v in data.items()}
        try:
            targets = self._targets(exe, job, extra)
        except (FileNotFoundError, NotADirectoryError):
            self.finish("failed", f"6053 target not exists:{exe}")
            return
        except (OSError, NotRegular) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning("task 6053 (token %r): %s not scanned: %s", token, exe, reason)
            self.finish("failed", f"6053 target not scanned:{exe}: {reason}")
            return
        if not self.source.hand_over(targets):
            return  # the session is stopping
        job.wait()
        self.finish(*self.outcome())

    def _targets(self, exe: str, job: Job, extra: dict[str, str]) -> Iterator[Target]:
        """A directory's files (walked lazily), or the one file, opened now: a task's own file always
        gets its 6003, whatever its size (a file no engine reads says why in ``error``)."""
        if stat.S_ISDIR(os.stat(exe).st_mode):
            cfg = self.source.config
            walker = self.source.walker(DirscanConfig(roots={exe: 2}, exclude=[], min_size=cfg.min_size,
                                                      max_size=cfg.max_size, type_filter=False,
                                                      one_filesystem=False, links=cfg.task_links))
            # Files the walk does not judge (Elkeid's size bounds) get no 6003, as in Elkeid; they are counted.
            return (attrs.evolve(t, kind=TASK_RESULT, report_clean=not t.skip, extra=extra, job=job)
                    for t in self.guarded(f"the walk of {exe}", walker.walk(exe, 2)))
        fd, st = open_regular(exe)
        return iter([Target(path=exe, origin="elkeid", fd=fd, size=st.st_size, job=job, kind=TASK_RESULT,
                            report_clean=True, extra=extra, required=True)])


class FullScan(TaskScan):
    """6057: the executables of all processes, then a walk (quick: the periodic scan's directories
    without depth limit on one filesystem; full: ``/``), inside the task's CPU budget and timeout."""

    def __init__(self, source: ElkeidTasks, task: Task) -> None:
        super().__init__(source, task)
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
        except TaskError as exc:  # Elkeid sends no 6000 then, and the console waits for ever
            log.error("%s", exc)
            self.finish("failed", str(exc))
            return
        self.mode = "full" if data.get("mode") == "full" else "quick"  # as Elkeid: anything else is quick
        hours = self._setting(data, "timeout", DEFAULT_TIMEOUT_HOURS[self.mode])
        log.info("6057 %s scan (token %r), timeout %g h", self.mode, token, hours)
        self.started = time.monotonic()
        self.deadline = self.started + hours * 3600
        lift_budget = self._budget(data)
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
            self.finish("failed", TIMEOUT_MSG)
            return
        self.phase = "done"
        final = self._progress(force=True)
        if final is not None:
            self.source.emit(final)
        self.finish(*self.outcome())

    # -- the targets --------------------------------------------------------------------------

    def _steps(self) -> Iterator[Iterator[Target | Record]]:
        cfg = self.source.config
        session = self.source.session
        processes = Procscan(ProcscanConfig(exclude=list(cfg.exclude), max_size=cfg.max_size), session)
        roots = cfg.full_roots if self.mode == "full" else (cfg.quick_roots or list(ELKEID_ROOTS))
        # Elkeid's type filter: images, audio, video, fonts, documents, e-books and archives are skipped
        # (archives too, though clamd looks inside them: in Elkeid only a 6053 parses archives)
        walker = self.source.walker(DirscanConfig(roots={r: -1 for r in roots}, exclude=list(cfg.exclude),
                                                  min_size=cfg.min_size, max_size=cfg.max_size, type_filter=True,
                                                  archives_to_engines=False, one_filesystem=self.mode == "quick",
                                                  links="inside"))
        self._walkers = [processes, walker]
        yield self._each(self.guarded("the process scan", processes.scan_processes()))
        self.phase = "files"
        # one root's failure ends that root's walk only: the other roots are still walked
        yield self._each(target for root in walker.roots
                         for target in self.guarded(f"the walk of {root}", walker.walk(root, -1)))

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

    def _setting(self, data: dict, key: str, default: Optional[float]) -> Optional[float]:
        """A task setting, or ``default`` (said in the log) when it is missing or not a positive number."""
        value = positive(data.get(key))
        if value is None:
            if data.get(key) not in (None, ""):
                log.warning("task 6057 (token %r): %s %r is not a positive number; %s", self.task.token, key,
                            data[key], f"the default {default:g} is used" if default else "it is ignored")
            return default
        return value

    def _budget(self, data: dict) -> Callable[[], None]:
        """Elkeid's CPU quota from the idle CPU, its worker count (or the task's ``worker``) and the task's
        ``mem`` as the memory ceiling, held by the session's governor for the length of the scan; returns
        the function that puts back what was in force before."""
        cpu_idle = self._setting(data, "cpu_idle", DEFAULTS["cpu_idle"])
        try:
            share, workers = cpu_idle_quota(cpu_idle / 100, self.source.config.cpu_sample or 0.1)
        except (OSError, ValueError) as exc:  # Elkeid then runs at the task's `cpu`
            share, workers = self._setting(data, "cpu", DEFAULTS["cpu"]) / 100, 0
            log.warning("cannot measure idle CPU (%s); 6057 runs at %.0f%% of a CPU", exc, share * 100)
        workers = int(self._setting(data, "worker", None) or workers) or None
        memory = int(self._setting(data, "mem", DEFAULTS["mem"]) * MiB)
        governor = self.source.session.governor
        most = self.source.session.pipeline.limits.workers
        log.info("6057 budget: %.0f%% of a CPU, %d of %d worker(s), memory ceiling %.0f MiB (cpu_idle %g%%)",
                 share * 100, min(workers or most, most), most, memory / MiB, cpu_idle)
        previous_cpu, previous_memory = self.source.session.pipeline.limits.cpu, governor.memory
        governor.set_cpu(share, workers)
        governor.set_memory(memory)

        def restore() -> None:
            governor.set_cpu(previous_cpu)
            governor.set_memory(previous_memory)
        return restore
