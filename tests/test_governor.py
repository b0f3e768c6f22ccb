"""The governor: CPU share, nice/ionice, memory ceiling, Elkeid's cpu_idle quota (the cgroup: test_cgroup.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from elkscan_core import ConfigError, Engine, Job, Source, Target, hookimpl
from elkscan_core.governor import DutyCycle, cpu_idle_quota, host_pressure, idle_quota, psi_some_avg10
from elkscan_core.pipeline import parse_pipeline
from elkscan_core.priorities import parse_ionice
from elkscan_core.testing import run


# -- the duty cycle (pure) ------------------------------------------------------------------------


def simulate(share, step_cpu, steps):
    """A worker that burns ``step_cpu`` per target and sleeps what the duty cycle says, on fake clocks."""
    now = cpu = 0.0
    duty = DutyCycle(share, now, cpu)
    for _ in range(steps):
        now += step_cpu
        cpu += step_cpu
        now += duty.delay(now, cpu)
    return cpu / now


@pytest.mark.parametrize("share,step_cpu", [(0.1, 0.02), (0.1, 0.5), (0.5, 0.01), (0.03, 0.2)])
def test_the_duty_cycle_holds_the_share(share, step_cpu):
    assert simulate(share, step_cpu, int(50 / step_cpu)) == pytest.approx(share, rel=0.02)


def test_the_duty_cycle_saves_up_at_most_its_burst():
    duty = DutyCycle(0.1, 0.0, 0.0, burst=1.0)
    assert duty.delay(3600.0, 0.0) == 0.0  # an hour idle...
    assert duty.delay(3600.0, 0.5) == pytest.approx(4.0)  # ...buys 0.1 s of CPU, not 360 s


# -- Elkeid's cpu_idle (pure) ---------------------------------------------------------------------


def stat(idle_ticks, cpus=2):
    """/proc/stat content with ``idle_ticks`` of aggregate idle time."""
    per_cpu = "".join(f"cpu{i} 100 0 50 {idle_ticks // cpus} 3 0 1 0 0 0\n" for i in range(cpus))
    return f"cpu  200 0 100 {idle_ticks} 6 0 2 0 0 0\n{per_cpu}intr 12345\nctxt 999\n"


def test_cpu_idle_quota_is_elkeids_formula():
    # Two CPUs idle for the whole 5 s (100 ticks/s): 2000 ms of idle per second.
    before, after = stat(10_000), stat(10_000 + 2 * 5 * 100)
    assert idle_quota(before, after, 5.0, 0.10) == (pytest.approx(0.2), 1)  # 20000 µs / 100 ms
    assert idle_quota(before, after, 5.0, 0.75) == (pytest.approx(1.5), 2)
    # Clamped to [10000, 800000] µs: a busy host still gets 10 %, a big idle one at most 8 CPUs.
    assert idle_quota(before, before, 5.0, 0.5) == (pytest.approx(0.1), 1)
    big_before, big_after = stat(0, cpus=64), stat(64 * 5 * 100, cpus=64)
    assert idle_quota(big_before, big_after, 5.0, 1.0) == (pytest.approx(8.0), 8)
    # Another tick rate (CONFIG_HZ 250 reporting USER_HZ differently) only rescales.
    assert idle_quota(stat(0), stat(2 * 5 * 250), 5.0, 0.1, ticks_per_second=250) == (pytest.approx(0.2), 1)


def test_cpu_idle_quota_rejects_what_is_not_proc_stat():
    with pytest.raises(ValueError, match="'cpu' line"):
        idle_quota("intr 1\n", "intr 2\n", 5.0, 0.1)
    with pytest.raises(ValueError, match="positive"):
        idle_quota(stat(0), stat(10), 0.0, 0.1)


def test_cpu_idle_quota_measures_this_host():
    share, workers = cpu_idle_quota(0.5, sample_seconds=0.3)
    assert 0.1 <= share <= 8.0 and workers == -(-share // 1)


# -- the host's pressure (PSI) --------------------------------------------------------------------


def test_psi_parsing():
    text = "some avg10=12.50 avg60=3.00 avg300=0.10 total=123\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=9\n"
    assert psi_some_avg10(text) == pytest.approx(0.125)
    with pytest.raises(ValueError):
        psi_some_avg10("full avg10=1.00 avg60=0.00 avg300=0.00 total=9\n")


def test_host_pressure_is_a_fraction_when_the_kernel_has_psi():
    if not os.path.exists("/proc/pressure/cpu"):
        pytest.skip("this kernel has no PSI (/proc/pressure)")
    assert 0.0 <= host_pressure() <= 1.0


# -- limits in the pipeline -----------------------------------------------------------------------


@pytest.mark.parametrize("limits,message", [
    ({"ionice": "fast"}, "ionice: expected idle, best-effort"),
    ({"ionice": "best-effort:9"}, "ionice: an I/O priority level is 0 (highest) to 7"),
    ({"nice": 25}, "nice: -20 (first) to 19 (last)"),
    ({"cpu": "0%"}, "cpu: must be above 0%"),
    ({"memory": "lots"}, "expected a size"),
    ({"cgroup": "yes"}, "cgroup: true (a cgroup below the one elkscan starts in), top (one at the top"),
    ({"cgroup": 1}, "or false, got 1"),
])
def test_bad_limits_are_named(limits, message):
    with pytest.raises(ConfigError) as info:
        parse_pipeline({"version": 1, "limits": limits})
    assert message in str(info.value) and "limits" in str(info.value)


def test_ionice_values():
    assert parse_ionice("idle") == (3, 0)
    assert parse_ionice("best-effort") == (2, 4)
    assert parse_ionice("best-effort:7") == (2, 7)
    assert parse_ionice("realtime:0") == (1, 0)


# -- a real session -------------------------------------------------------------------------------


class Probe(Engine):
    """Spends a little CPU on each file and remembers how many scans ran at once."""

    id = "probe"
    burn = 0.0  # CPU seconds per file

    def start(self):
        self.lock = threading.Lock()
        self.running = self.most = self.scanned = 0

    def scan(self, subject):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            end = time.process_time() + self.burn
            while time.process_time() < end:
                pass
            time.sleep(0.01)  # room for another worker to overlap
        finally:
            with self.lock:
                self.running -= 1
                self.scanned += 1
        return []


class Burner(Probe):
    id = "burner"
    burn = 0.03


class OneWorker(Source):
    """Like a transport running a task at a lower worker count: it sets the count, feeds a job and waits
    for the job's end before it returns (while it waits, the session is not ending)."""

    id = "oneworker"

    def targets(self):
        self.session.governor.set_cpu(None, workers=1)
        time.sleep(0.3)  # idle workers look again within 0.1 s
        job = Job(token="t")
        for name in sorted(os.listdir(self.session.resolve_path("."))):
            yield Target(path=self.session.resolve_path(name), origin=self.id, job=job)
        self.finished = job.wait(timeout=30)


class MemoryTask(Source):
    """Like a transport applying an Elkeid 6057's ``mem``: it sets the memory budget, then feeds a job."""

    id = "memorytask"
    ceiling = None

    def targets(self):
        self.session.governor.set_memory(self.ceiling)
        time.sleep(0.6)  # the next RSS sample is taken against the new ceiling
        job = Job(token="t")
        for name in sorted(os.listdir(self.session.resolve_path("."))):
            yield Target(path=self.session.resolve_path(name), origin=self.id, job=job)
        job.wait(timeout=30)


class TightTask(MemoryTask):
    id = "tighttask"
    ceiling = 2**20


class Components:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Probe)
        registry.add(Burner)

    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(OneWorker)
        registry.add(MemoryTask)
        registry.add(TightTask)


@pytest.fixture
def tree(tmp_path):
    for i in range(24):
        (tmp_path / f"f{i}.txt").write_bytes(b"content %d" % i)
    return tmp_path


def scan(tree, engine="probe", source=None, **limits):
    source = source or {"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}
    result = run({"sources": [source], "engines": [{"use": engine}], "limits": {"workers": 2, **limits}},
                 extra_plugins=[Components()], base_dir=str(tree))
    return result, result.session.engines[0]


def test_two_workers_overlap_without_limits(tree):
    result, probe = scan(tree)
    assert probe.scanned == 24 and probe.most == 2 and result.summary.memory_tight == 0


def test_near_the_memory_ceiling_one_worker_goes_on_and_it_is_reported(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="elkscan.governor"):
        result, probe = scan(tree, memory="1MiB")  # below any Python process: tight from the start
    assert probe.scanned == 24 and result.summary.files == 24  # the scan still finishes
    assert probe.most == 1
    assert result.summary.memory_tight == 1
    assert any("memory ceiling" in r.getMessage() for r in caplog.records)


def test_a_transport_can_lower_the_workers(tree):
    result, probe = scan(tree, source={"use": "oneworker"})
    assert probe.scanned == 24 and probe.most == 1 and result.session.governor.active_workers == 1
    assert result.session.sources[0].finished  # no parked worker sat on a target of the job


def test_a_transport_can_set_and_lift_the_memory_ceiling(tree):
    result, probe = scan(tree, source={"use": "tighttask"})  # no ceiling in the pipeline; 1 MiB set
    assert probe.scanned == 24 and probe.most == 1 and result.summary.memory_tight == 1
    assert result.session.governor.memory == 2**20
    result, probe = scan(tree, source={"use": "memorytask"}, memory="1MiB")  # lifted by the task
    assert probe.scanned == 24 and probe.most == 2


def test_the_cpu_share_makes_workers_sleep(tree):
    # About 0.4 s of CPU at a 10 % share: seconds of sleeping (very loose bounds; bench/ measures it).
    result, burner = scan(tree, engine="burner", cpu="10%")
    assert burner.scanned == 24
    assert result.session.governor.throttled > 1.0


PRIORITIES = textwrap.dedent("""
    import json, os, sys
    from elkscan_core import Engine, hookimpl
    from elkscan_core.priorities import get_ionice
    from elkscan_core.testing import run

    class Priorities(Engine):
        id = "priorities"
        def start(self):
            self.seen = set()
        def scan(self, subject):
            self.seen.add((os.getpriority(os.PRIO_PROCESS, 0), get_ionice()))
            return []

    class Plugin:
        @hookimpl
        def elkscan_register_engines(self, registry):
            registry.add(Priorities)

    result = run({"sources": [{"use": "dirscan", "with": {"roots": {sys.argv[1]: -1}, "type_filter": False}}],
                  "engines": [{"use": "priorities"}], "limits": json.loads(sys.argv[2])},
                 extra_plugins=[Plugin()])
    main = (os.getpriority(os.PRIO_PROCESS, 0), get_ionice())
    print(json.dumps({"workers": sorted(result.session.engines[0].seen), "main": main}))
""")


def test_nice_and_ionice_apply_to_every_thread(tree):
    """In a child process: renicing the test runner itself would slow the other tests."""
    limits = {"nice": 15, "ionice": "best-effort:6", "workers": 2}
    out = subprocess.run([sys.executable, "-c", PRIORITIES, str(tree), json.dumps(limits)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["workers"] == [[15, [2, 6]]] and seen["main"] == [15, [2, 6]]


@pytest.fixture
def host_under_pressure():
    """CPU pressure made for the test: more busy processes than cores, until PSI shows it."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() + 2)]
    try:
        deadline = time.monotonic() + 20
        while not (host_pressure() or 0) and time.monotonic() < deadline:
            time.sleep(0.5)
        yield host_pressure()
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def test_under_host_pressure_the_scan_yields(tree, caplog, host_under_pressure):
    pressure = host_under_pressure
    assert pressure, "PSI (/proc/pressure, Linux 4.20+) shows no pressure under more busy processes than cores"
    threshold = f"{pressure * 100 / 10:.6f}%"  # a tenth of what the host shows: pressured
    with caplog.at_level(logging.INFO, logger="elkscan.governor"):
        result, probe = scan(tree, pressure=threshold)
    assert probe.scanned == 24 and result.summary.files == 24  # slowed, never stopped
    assert any("slowing down to one worker" in r.getMessage() for r in caplog.records)


def test_a_memory_ceiling_below_the_baseline_is_said_at_start(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="elkscan.governor"):
        result, probe = scan(tree, memory="1MiB")
    assert probe.scanned == 24  # slowed, never stopped
    [warning] = [r.getMessage() for r in caplog.records if "below what elkscan uses once started" in r.getMessage()]
    assert "limits.memory 1 MiB" in warning and "raise it to at least" in warning


# -- malloc arenas --------------------------------------------------------------------------------

ARENAS = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
    from elkscan_core.governor import share_malloc_arenas
    if sys.argv[1] == "shared":
        share_malloc_arenas()
    held, ready, done = [], threading.Barrier(7), threading.Event()
    def allocate():
        held.append([bytes(1000 + i % 7) for i in range(2000)])  # past pymalloc's 512 B: glibc's malloc
        ready.wait()
        done.wait()
    threads = [threading.Thread(target=allocate) for _ in range(6)]
    for thread in threads:
        thread.start()
    ready.wait()  # every thread has allocated and still lives: glibc gave each its arena, or not
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.fclose.argtypes = (ctypes.c_void_p,)
    path = os.path.join(tempfile.mkdtemp(), "info.xml")
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(path).read().count("<heap nr="))
    done.set()
""")


def _arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
                    reason="glibc's malloc arenas")
def test_a_session_threads_share_two_malloc_arenas():
    """Six threads that allocate get arenas of their own by default; after share_malloc_arenas() (the
    governor's start, before a session's threads begin) the process has two: each arena keeps what its
    threads freed (row 3's peak RSS)."""
    assert _arenas("default") > 2
    assert _arenas("shared") == 2
