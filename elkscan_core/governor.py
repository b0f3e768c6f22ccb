"""The governor: keeps a scan within its share of the host (the pipeline's ``limits:``).

- ``cpu``: a share of one CPU, held by a duty cycle measured from the process's own CPU time (every
  thread, native code included): workers check in between targets and sleep off any overdraft.
- ``cgroup``: the process moves into a cgroup of its own (elkscan_core/cgroup.py) where the kernel holds
  the CPU share (instead of the duty cycle) and the memory as a hard limit, for elkscan and the processes
  it starts; where the host has no cgroup for it, one warning says why and the rest goes on.
- ``nice`` and ``ionice``: applied to every thread of the process (Linux keeps both per thread).
- ``memory``: a soft RSS ceiling. Near it, feeding waits for the queue to drain, one worker goes on
  alone, and freed heap is handed back to the system, until RSS is comfortably below again.
- ``pressure``: while the host's PSI (``/proc/pressure/cpu``, ``io``; ``some avg10``) says other work is
  stalled above this share of the time, one worker goes on at a token pace.
- ``cpu_idle_quota()``: Elkeid's 6057 ``cpu_idle`` (a share of the CPU measured idle over 5 s), for the
  Elkeid transport to pass to ``Governor.set_cpu()``; its ``mem`` goes to ``Governor.set_memory()``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .priorities import apply_priorities

if TYPE_CHECKING:
    from .cgroup import Cgroup
    from .pipeline import Limits

log = logging.getLogger("elkscan.governor")

_TIGHT, _EASY = 0.9, 0.8  # memory: pause at 90 % of the ceiling, resume below 80 %
_SAMPLE_EVERY = 0.5  # seconds between RSS / PSI samples
_PRESSURE_SHARE = 0.05  # CPU share kept while the host is under pressure


# -- the duty cycle -------------------------------------------------------------------------------


class DutyCycle:
    """A token bucket of CPU seconds: it fills at ``share`` per wall second, up to ``burst``; CPU used
    drains it. ``delay()`` says how long to sleep so that CPU / wall time stays at ``share``."""

    def __init__(self, share: float, now: float, cpu: float, burst: float = 1.0) -> None:
        self.share = share
        self.burst = burst  # wall seconds of credit that may be saved up
        self.credit = share * burst
        self.now, self.cpu = now, cpu

    def delay(self, now: float, cpu: float) -> float:
        self.credit = min(self.share * self.burst, self.credit + (now - self.now) * self.share)
        self.credit -= cpu - self.cpu
        self.now, self.cpu = now, cpu
        return -self.credit / self.share if self.credit < 0 else 0.0


class Helpers(Protocol):
    """Processes that work for this one (an engine's worker processes): what they use."""

    def cpu_seconds(self) -> float: ...

    def private_bytes(self) -> int: ...


# -- measurements ---------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def psi_some_avg10(text: str) -> float:
    """The ``some avg10`` figure of a /proc/pressure file, as a fraction (``0.12`` = 12 %)."""
    for line in text.splitlines():
        if line.startswith("some "):
            fields = dict(item.split("=", 1) for item in line.split()[1:])
            return float(fields["avg10"]) / 100
    raise ValueError("no 'some' line in the pressure data")


def host_pressure() -> float | None:
    """The highest ``some avg10`` of CPU and I/O, or None when the kernel has no PSI."""
    worst = None
    for resource in ("cpu", "io"):
        try:
            with open(f"/proc/pressure/{resource}") as f:
                value = psi_some_avg10(f.read())
        except (OSError, ValueError):
            continue
        worst = value if worst is None else max(worst, value)
    return worst


#: mallopt(3)'s M_ARENA_MAX, and the arenas a scan uses: the main thread's and one for every other thread.
_M_ARENA_MAX = -8
_MALLOC_ARENAS = 2


def share_malloc_arenas() -> None:
    """Let glibc give the process two malloc arenas instead of one per thread (up to 8 per CPU): each
    arena keeps what its thread freed, about 1.1 MB over a scan's workers, writer and trimmer threads
    (docs/performance.md, "Memory: what a scan holds"). Their allocations are few and small next to the
    scanning, so sharing costs no measurable CPU. ``MALLOC_ARENA_MAX`` or glibc's tunables, when set,
    decide instead."""
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, _MALLOC_ARENAS)
    except AttributeError:
        pass  # not glibc


def _release_free_heap() -> None:
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


# -- Elkeid's cpu_idle ----------------------------------------------------------------------------


def idle_jiffies(proc_stat: str) -> int:
    """The idle time of all CPUs together, in clock ticks, from /proc/stat's ``cpu`` line."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return int(fields[4])
    raise ValueError("no aggregate 'cpu' line in /proc/stat data")


def idle_quota(before: str, after: str, seconds: float, cpu_idle: float,
               ticks_per_second: int = 100) -> tuple[float, int]:
    """Elkeid 6057: ``quota = clamp(idle_ms_per_s * cpu_idle, 10000, 800000)`` µs per 100 ms period,
    ``workers = ceil(quota / 100000)``. ``cpu_idle`` is a fraction (``0.1`` for Elkeid's ``"10"``); the
    quota is returned as a share of one CPU (``0.2`` = 20000 µs per 100 ms)."""
    if seconds <= 0:
        raise ValueError("the sampling interval must be positive")
    idle_ms = (idle_jiffies(after) - idle_jiffies(before)) * 1000 / ticks_per_second
    quota_us = min(max(idle_ms / seconds * cpu_idle * 100, 10_000), 800_000)
    from .cgroup import PERIOD_US  # here, as in _confine: a session that is not confined does without it

    return quota_us / PERIOD_US, math.ceil(quota_us / PERIOD_US)


def cpu_idle_quota(cpu_idle: float, sample_seconds: float = 5.0) -> tuple[float, int]:
    """Measure idle CPU over ``sample_seconds`` and return Elkeid's (share of one CPU, workers)."""
    with open("/proc/stat") as f:
        before = f.read()
    started = time.monotonic()
    time.sleep(sample_seconds)
    with open("/proc/stat") as f:
        after = f.read()
    return idle_quota(before, after, time.monotonic() - started, cpu_idle, os.sysconf("SC_CLK_TCK"))


# -- the governor ---------------------------------------------------------------------------------


class Governor:
    """Applies a pipeline's ``limits:`` to the running session: workers ask ``may_take()`` before taking
    a target and call ``pace()`` before scanning it; sources wait while ``feeding_paused``."""

    def __init__(self, limits: Limits, stopping: threading.Event) -> None:
        self.limits = limits
        self.stopping = stopping
        self._lock = threading.Lock()
        self._share: float | None = None  # the CPU share asked for (a fraction of one CPU)
        self._duty: DutyCycle | None = None
        self._active = limits.workers  # workers allowed to take work
        self._sampled = 0.0
        self.cgroup: Cgroup | None = None
        self._memory = limits.memory  # the memory budget in bytes (None: none)
        self.memory_tight = False
        self.memory_episodes = 0  # times RSS came near the ceiling
        self.under_pressure = False
        self.throttled = 0.0  # seconds workers slept to hold the CPU share
        self._helpers: list[Helpers] = []  # worker processes whose CPU and memory count as ours

    def include(self, helpers: Helpers) -> None:
        """Count a group of worker processes (an engine's, processes.py) in the CPU share and the
        memory ceiling: their CPU time and the memory they do not share with this process."""
        self._helpers.append(helpers)

    def _cpu(self) -> float:
        return time.process_time() + sum(h.cpu_seconds() for h in self._helpers)

    def _rss(self) -> int:
        return rss_bytes() + sum(h.private_bytes() for h in self._helpers)

    def start(self) -> None:
        """Apply nice/ionice, the cgroup and the CPU share; called before the components start, so that the
        processes they start (clamd) are born in the cgroup, and before the session's threads allocate."""
        limits = self.limits
        share_malloc_arenas()
        if limits.nice is not None or limits.ionice:
            apply_priorities(limits.nice, limits.ionice)
        if limits.cgroup:
            self._confine()
        if limits.cpu:
            self.set_cpu(limits.cpu)

    def _confine(self) -> None:
        """Enter the cgroup and say, in one line, what holds the limits."""
        limits = self.limits
        if not (limits.cpu or limits.memory):
            log.warning("limits.cgroup is set but neither limits.cpu nor limits.memory: nothing to confine")
            return
        from .cgroup import Cgroup, NoCgroup  # here: few sessions are confined

        try:
            self.cgroup = Cgroup.enter(limits.cpu, limits.memory, top=limits.cgroup == "top")
        except NoCgroup as exc:
            log.warning("not confined in a cgroup: %s; the CPU share is held by the duty cycle alone and "
                        "memory by the soft ceiling", exc)
            return
        budget = [f"{limits.cpu * 100:g}% of a CPU"] * bool(limits.cpu) + [
            f"{limits.memory / 2**20:g} MiB"] * bool(limits.memory)
        log.info("confined in %s: %s for elkscan and the processes it starts", self.cgroup, " and ".join(budget))

    def check_baseline(self) -> None:
        """Say at start-up, once, when the memory ceiling is below what the started components already
        use: the scan would run throttled from its first file."""
        ceiling, rss = self._memory, self._rss()
        if ceiling and rss >= _TIGHT * ceiling:
            log.warning("limits.memory %.0f MiB is below what elkscan uses once started (RSS %.0f MiB): the "
                        "scan will run one file at a time; raise it to at least %.0f MiB", ceiling / 2**20,
                        rss / 2**20, rss / _TIGHT / 2**20 + 16)

    def close(self) -> None:
        with self._lock:  # a task's set_cpu() or set_memory() at the end writes before the cgroup goes
            if self.cgroup is not None:
                self.cgroup.leave()
                self.cgroup = None

    def set_cpu(self, share: float | None, workers: int | None = None) -> None:
        """Change the CPU share (a fraction of one CPU; None: unlimited) and the active workers, e.g.
        from an Elkeid 6057 ``cpu_idle`` quota. Confined, the cgroup holds it; else the duty cycle."""
        with self._lock:
            held = False
            if self.cgroup is not None and "cpu" in self.cgroup.controllers:
                try:
                    self.cgroup.set_cpu(share)
                    held = True
                except OSError as exc:
                    log.warning("cannot change the CPU limit of %s (%s): the duty cycle holds it", self.cgroup,
                                exc.strerror)
            self._share = None if held else share or None
            self._duty = None  # restarts at the next pace(), without old credit or debt
            self._active = max(1, min(workers or self.limits.workers, self.limits.workers))

    def split(self, n: int) -> None:
        """This process is one of ``n`` that share a scan (shares.py), just forked: each holds 1/n of a
        CPU share the duty cycle holds (a cgroup holds it for the whole tree as it is)."""
        self._lock = threading.Lock()  # a thread of the session may have held it at the fork
        if self._share is not None:
            self._share /= n
            self._duty = None

    def set_memory(self, ceiling: int | None) -> None:
        """Change the memory budget (bytes; None: no limit), e.g. to an Elkeid 6057's ``mem``: the soft RSS
        ceiling, and the cgroup's hard limit when confined."""
        with self._lock:
            self._memory = ceiling or None
            if self._memory is None:
                self.memory_tight = False
            self._sampled = 0.0  # judged against the new ceiling at the next look
            if self.cgroup is not None and "memory" in self.cgroup.controllers:
                try:
                    self.cgroup.set_memory(ceiling)
                except OSError as exc:
                    log.warning("cannot change the memory limit of %s: %s", self.cgroup, exc.strerror)

    @property
    def memory(self) -> int | None:
        """The memory budget in force (bytes; None: none), to put back after a task that changed it."""
        return self._memory

    @property
    def active_workers(self) -> int:
        """How many workers may take work, as ``set_cpu()`` last set it."""
        return self._active

    # -- what workers and sources ask ------------------------------------------------------------

    @property
    def feeding_paused(self) -> bool:
        """True while sources should wait for the queue to drain (memory near the ceiling)."""
        self._sample()
        return self.memory_tight

    def may_take(self, rank: Callable[[], int]) -> bool:
        """Whether the worker whose place among the live workers is ``rank()`` (0 is never parked) may
        take a target now; a parked worker asks again later, holding nothing meanwhile."""
        self._sample()
        allowed = self._allowed()
        return allowed >= self.limits.workers or rank() < allowed

    def pace(self) -> None:
        """Called by a worker before each target: sleep off any overdraft of the CPU share."""
        if self._share is None and not self.under_pressure:
            return
        with self._lock:
            share = min(self._share or 1.0, _PRESSURE_SHARE) if self.under_pressure else self._share
            if share is None:
                self._duty = None
            elif self._duty is None or self._duty.share != share:
                self._duty = DutyCycle(share, time.monotonic(), self._cpu())
            duty = self._duty
            delay = duty.delay(time.monotonic(), self._cpu()) if duty else 0.0
            self.throttled += delay
        if delay > 0:
            self.stopping.wait(delay)

    def _allowed(self) -> int:
        if self.memory_tight or self.under_pressure:
            return 1
        return self._active

    def _sample(self) -> None:
        """Refresh the RSS and PSI readings, at most every half second; a caller that arrives while a
        reading is under way waits for its result."""
        if time.monotonic() - self._sampled < _SAMPLE_EVERY:
            return
        with self._lock:
            if time.monotonic() - self._sampled < _SAMPLE_EVERY:
                return
            self._check_memory()
            self._check_pressure()
            self._sampled = time.monotonic()

    def _check_memory(self) -> None:
        ceiling = self._memory
        if not ceiling:
            return
        rss = self._rss()
        if not self.memory_tight and rss >= _TIGHT * ceiling:
            _release_free_heap()
            rss = self._rss()
            if rss >= _TIGHT * ceiling:
                self.memory_tight = True
                self.memory_episodes += 1
                log.warning("RSS %.0f MiB is near the %.0f MiB memory ceiling: feeding paused and one worker "
                            "goes on until it is below %.0f MiB", rss / 2**20, ceiling / 2**20,
                            _EASY * ceiling / 2**20)
        elif self.memory_tight and rss < _EASY * ceiling:
            self.memory_tight = False
            log.info("RSS %.0f MiB is below the memory ceiling again; all workers resume", rss / 2**20)

    def _check_pressure(self) -> None:
        threshold = self.limits.pressure
        if not threshold:
            return
        pressure = host_pressure()
        if pressure is None:
            return
        if not self.under_pressure and pressure > threshold:
            self.under_pressure = True
            log.info("host pressure %.0f%% is above %.0f%%: slowing down to one worker at %.0f%% of a CPU",
                     pressure * 100, threshold * 100, _PRESSURE_SHARE * 100)
        elif self.under_pressure and pressure < threshold / 2:
            self.under_pressure = False
            log.info("host pressure %.0f%% has eased; resuming", pressure * 100)
