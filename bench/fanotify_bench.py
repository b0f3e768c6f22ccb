"""Benchmark of the ``fanotify`` source: event-to-record latency, throughput, losses and CPU.

A child process writes N files (10,000 by default) into monitored directories and notes the time
right after each ``close()``; the session (started in this process, with the real source and a timing
sink) notes when each record reaches the sink. Rows:

1. file events (Elkeid 6012), a burst as fast as the writer goes, no rate limit;
2. file events paced below a configured rate limit (the target: no loss);
3. file events with Elkeid's own rate limit (10 per 5 s): the drops are counted and reported;
4. on-access scanning: web shells written under a web root, judged by the real yara engine (the
   latency includes the ``settle`` delay that coalesces repeated writes, 100 ms by default);
5. reference: ``fatrace`` (C, fanotify marks on every mount) seeing the same burst, when installed.

Each row but 3 runs ``--repeat`` times (3) and shows the run with the median p99: the machine is often
shared, and other work only ever makes a run worse.

CPU is the session process's user+system time during the row (``fatrace``: its own). Targets: p99
under 50 ms and no loss below the configured rate. Prints a markdown table.
Run: ``.venv/bin/python bench/fanotify_bench.py [--count 10000] [--rate 2000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from elkscan_core import FILE_EVENT, FINDING, Sink, hookimpl, testing

TARGET_P99_MS = 50.0

WRITER = r"""
import json, sys, time
dirs, count, rate = sys.argv[1].split(":"), int(sys.argv[2]), float(sys.argv[3])
out, content, suffix = sys.argv[4], sys.argv[5], sys.argv[6]
data = content.encode()
times, due = [], time.time()
for i in range(count):
    if rate:  # never above the rate: a writer that fell behind does not catch up in a burst
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        due = max(due, time.time()) + 1 / rate
    path = f"{dirs[i % len(dirs)]}/f{i}{suffix}"
    with open(path, "wb") as handle:
        handle.write(data)
    times.append((path, time.time()))
with open(out, "w") as handle:
    json.dump(times, handle)
"""


class Timing(Sink):
    """Notes when each record for a written file reaches a sink."""

    id = "timing"
    seen: dict = {}

    def write(self, record) -> None:
        if record.kind in (FILE_EVENT, FINDING):
            path = record.facts.get("file_path") or (record.target.path if record.target else "")
            Timing.seen.setdefault(path, time.time())


class _Plugin:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.session = None

    @hookimpl
    def elkscan_register_sinks(self, registry) -> None:
        registry.add(Timing)

    @hookimpl
    def elkscan_session_start(self, session) -> None:
        self.session = session
        self.started.set()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_files(dirs: list[str], count: int, rate: float, content: str, suffix: str = "") -> list:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        pass
    # through setsid: the writer must not be a child of the scanner (whose own children are not scanned)
    subprocess.run(["setsid", "--fork", "--wait", sys.executable, "-c", WRITER, ":".join(dirs), str(count),
                    str(rate), out.name, content, suffix], check=True)
    with open(out.name) as handle:
        written = json.load(handle)
    os.unlink(out.name)
    return written


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(written: list, seen: dict, cpu: float, extra: str = "") -> dict:
    latencies = [(seen[path] - at) * 1000 for path, at in written if path in seen]
    received = len(latencies)
    first = min(at for _, at in written)
    last = max(seen.values()) if seen else first
    return {"writes": len(written), "records": received, "lost": len(written) - received,
            "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
            "rate": received / max(last - first, 1e-9), "cpu": cpu, "notes": extra}


def run_elkscan(options: dict, dirs: list[str], count: int, rate: float, *, content: str = "x" * 64,
                suffix: str = "", engines: tuple = (), plugins: tuple = (),
                expect: Optional[int] = None) -> dict:
    plugin, box = _Plugin(), {}
    Timing.seen = {}
    pipeline = {"plugins": ["fanotify_source", *plugins], "sources": [{"use": "fanotify", "with": options}],
                "engines": list(engines), "sinks": [{"use": "timing"}], "limits": {"workers": 2}}
    thread = threading.Thread(target=lambda: box.setdefault("result", testing.run(pipeline,
                                                                                  extra_plugins=[plugin])))
    thread.start()
    plugin.started.wait(60)
    source = plugin.session.find("source", "fanotify")
    cpu_before = cpu_seconds()
    written = write_files(dirs, count, rate, content, suffix)
    expect = len(written) if expect is None else expect
    last_count, idle_since = -1, time.monotonic()
    while len(Timing.seen) < expect and time.monotonic() - idle_since < 3.0:
        if len(Timing.seen) != last_count:
            last_count, idle_since = len(Timing.seen), time.monotonic()
        time.sleep(0.05)
    cpu = cpu_seconds() - cpu_before
    stats = dict(source.stats)
    plugin.session.stop()
    thread.join(60)
    result = measure(written, dict(Timing.seen), cpu)
    result["stats"] = stats
    return result


def run_fatrace(dirs: list[str], count: int) -> dict:
    fatrace = shutil.which("fatrace")
    log = os.path.join(os.path.dirname(dirs[0]), "fatrace.log")
    process = subprocess.Popen([fatrace, "-tt", "-f", "W", "-o", log], cwd=dirs[0],
                               preexec_fn=os.setsid)
    time.sleep(1.0)  # fatrace places its mount marks
    written = write_files(dirs, count, 0, "x" * 64)
    time.sleep(1.0)
    with open(f"/proc/{process.pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    os.killpg(process.pid, signal.SIGINT)
    process.wait(10)
    seen: dict = {}
    wanted = {path for path, _ in written}
    with open(log, errors="replace") as handle:
        for line in handle:
            stamp, _, rest = line.partition(" ")
            path = rest.split(": ", 1)[-1].split(None, 1)[-1].strip()  # "comm(pid): CW /path"
            if path in wanted:
                seen.setdefault(path, float(stamp))
    return measure(written, seen, cpu, "sees every write on the mount (other processes' too)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000, help="files written per row")
    parser.add_argument("--rate", type=float, default=2000, help="paced row: writes per second")
    parser.add_argument("--dirs", type=int, default=4, help="monitored directories")
    parser.add_argument("--web-shells", type=int, default=1000, help="files written in the on-access row")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per row; the run with the median p99 is shown")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("fanotify needs root (CAP_SYS_ADMIN)", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="elkscan-fanotify-bench-")
    state = os.path.join(base, "state")
    os.environ["ELKSCAN_STATE_DIR"] = state
    rows = []
    runs = iter(range(1_000_000))
    try:
        def fresh(name: str, count: int) -> list[str]:
            dirs = [os.path.join(base, f"{name}-{next(runs)}", f"d{i}") for i in range(count)]
            for d in dirs:
                os.makedirs(d)
            return dirs

        def median_run(measure_once) -> dict:
            """Run a row ``--repeat`` times (other work on a shared machine only makes a run worse)."""
            results = sorted((measure_once() for _ in range(args.repeat)), key=lambda r: r["p99"])
            chosen = dict(results[len(results) // 2])
            worst = max(r["lost"] for r in results)
            if worst != chosen["lost"]:
                chosen["notes"] = (chosen["notes"] + f"; lost up to {worst} in another run").strip("; ")
            return chosen

        def events(dirs: list[str], **file_events) -> dict:
            return {"file_events": {"profile": "none", "directories": dirs, **file_events},
                    "on_access": {"enabled": False}}

        def burst() -> dict:
            dirs = fresh("burst", args.dirs)
            return run_elkscan(events(dirs, rate_limit=0), dirs, args.count, 0)

        def paced() -> dict:
            dirs = fresh("paced", args.dirs)
            return run_elkscan(events(dirs, rate_limit=limit, rate_window="1s"), dirs, args.count, args.rate)

        def elkeid_limit() -> dict:
            dirs = fresh("elkeid", args.dirs)
            result = run_elkscan(events(dirs), dirs, args.count, 0, expect=10)
            result["notes"] = (f"{result['stats'].get('rate_limited', 0)} dropped by the rate limit, "
                               "counted and reported")
            return result

        def web_shells() -> dict:
            www = fresh("www", 1)[0]
            shell = testing.SAMPLES["webshell.php"][0].decode()
            result = run_elkscan({"file_events": {"enabled": False},
                                  "on_access": {"web_roots": [www], "downloads": []}},
                                 [www], args.web_shells, 0, content=shell, suffix=".php",
                                 engines=({"use": "yara"},), plugins=("yara_backend",))
            result["notes"] = "yara engine, 2 workers; includes the 100 ms settle"
            return result

        limit = int(args.rate * 2)
        rows.append(("file events, burst, no rate limit", median_run(burst), False))
        rows.append((f"file events, {args.rate:g}/s, limit {limit}/s", median_run(paced), True))
        rows.append(("file events, burst, Elkeid's limit 10/5s", elkeid_limit(), False))
        rows.append((f"on-access web shells ({args.web_shells}, burst)", median_run(web_shells), False))
        if shutil.which("fatrace"):
            rows.append(("reference: fatrace, burst",
                         median_run(lambda: run_fatrace(fresh("fatrace", args.dirs), args.count)),
                         False))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\nfanotify source, {args.count} writes per row, median-p99 run of {args.repeat}, "
          f"{os.cpu_count()} CPUs, kernel {os.uname().release}, load average {os.getloadavg()[0]:.1f} "
          "at the end\n")
    print("| row | writes | records | lost | p50 ms | p99 ms | records/s | CPU s | events per CPU-s "
          "| target | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name, r, targeted in rows:
        stats = r.get("stats", {})
        notes = r["notes"] or ""
        if stats.get("overflows"):
            notes += f"; {stats['overflows']} queue overflow(s), reported"
        if stats.get("rate_limited") and "Elkeid" not in name:
            notes += f"; {stats['rate_limited']} rate-limited, reported"
        verdict = "-"
        if targeted:
            verdict = "met" if r["p99"] < TARGET_P99_MS and r["lost"] == 0 else "MISSED"
        print(f"| {name} | {r['writes']} | {r['records']} | {r['lost']} | {r['p50']:.1f} | {r['p99']:.1f} "
              f"| {r['rate']:.0f} | {r['cpu']:.2f} | {r['records'] / max(r['cpu'], 1e-9):.0f} | {verdict} "
              f"| {notes.strip('; ')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
