"""elkscan's benchmark suite: one command, every figure next to its target, against the reference tools
in the same run on the same files.

    .venv/bin/python bench/run.py                    # quick: CPU-share row over 15 s
    .venv/bin/python bench/run.py --full             # the 60 s CPU-share row, 3 repeats of timed rows
    .venv/bin/python bench/run.py --corpus /usr/bin --mixed /usr/share/doc --rules DIR

Without ``--rules`` the YARA rows use a rule set generated at run time (bench/gen_rules.py: 400
rules shaped like a production set); pass a real one, e.g. Elastic's public Linux rules, with
``--rules DIR``.

Rows (issues 7 and 14): 1 elkscan's yara engine vs a minimal yara-python loop vs the ``yara`` CLI on the
corpus (1a on /usr/bin alone), and the file-type filter on a mixed tree (1b); 2 the clamav engine vs
``clamdscan`` (bench/clamav_bench.py, when present); 3 peak RSS of elkscan's whole process tree on
/usr/bin and /usr/lib/x86_64-linux-gnu with the hashes enricher; 4 CPU share with ``cpu: 10%``; 5 a
second scan with the verdict cache (5a the first scan with it on vs off, 5b the walk alone); 6 start-up
to the first result with the compiled rules cached; 7 the yarax engine with 2 workers against 1, and
against 1 on threads only (7b: threads against worker processes for yarax and yara). Rows 1 and 7
split the walk of their 2 workers across processes (``limits.shares``; ``--no-shares``: threads).
The table is printed and written to bench/RESULTS.md with the machine and the versions.

Every tool runs as its own process (so its memory and CPU are its own), on a warm page cache, best of
``--repeat`` runs. elkscan runs are ``bench/run.py --child PIPELINE``: what ``elkscan scan -p PIPELINE``
does (load, build the session, run), reporting the session's summary as JSON; row 6 uses the
``elkscan`` command itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gen_rules import generate  # bench/ is on sys.path: this script's directory

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MiB = 1024 * 1024
GENERATED_RULES, GENERATED_SEED = 400, 0  # the rule set used without --rules

TARGET_THROUGHPUT = 0.92  # of both references, on the corpus (issue 14)
TARGET_THROUGHPUT_BIN = 0.95  # of both references, on /usr/bin alone (issue 14)
TARGET_RSS_MB = 40  # the whole process tree, on the RSS corpus (issue 14)
TARGET_CPU, CPU_TOLERANCE = 0.10, 0.015
TARGET_CACHED = 0.05  # of the first scan's time
TARGET_CACHE_ON = 1.05  # a first scan with the cache on, against the same scan with it off
PAIRS_CACHE_ON = 3  # row 5a's on/off pairs at least: the median pair counts
TARGET_VS_CLI = 10  # times faster than the yara CLI
TARGET_FIRST_RESULT = 1.0
TARGET_YARAX_SCALING = 1.7  # the yarax engine's scan time with 1 worker over that with 2 (issue 14)


# -- the measured processes -----------------------------------------------------------------------


class Run:
    """One finished process: wall time, CPU time, peak RSS and what it printed."""

    def __init__(self, wall: float, cpu: float, rss_mb: float, stdout: str, stderr: str, code: int,
                 peaks: dict[str, float] | None = None) -> None:
        self.wall, self.cpu = wall, cpu
        # wait4's ru_maxrss counts the parent's memory too: the child is forked (vfork) from this
        # process and the kernel keeps the larger high-water mark across exec. The process's own
        # VmHWM, read while it runs, is its peak (short of its last 10 ms).
        self.rss_mb = (peaks or {}).get("hwm", rss_mb)
        self.stdout, self.stderr, self.code = stdout, stderr, code
        #: sampled at the peak of the process tree's summed RSS: "tree" (MB), "RssAnon" and "RssFile"
        #: (MB, summed) and "processes" (how many there were then); "pss": the peak of the tree's summed
        #: proportional set size (pages shared between its processes counted once)
        self.peaks = peaks or {}

    @property
    def tree_mb(self) -> float:
        """Peak RSS of the whole process tree: the sampled sum, or the highest high-water mark of one
        of its processes (exact) when sampling missed the peak."""
        return max(self.peaks.get("tree", 0.0), self.rss_mb)

    @property
    def summary(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (worker processes, a managed clamd)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                    pids.extend(int(child) for child in f.read().split())
        except OSError:
            pass
        i += 1
    return pids


def _sample_memory(pid: int, peaks: dict[str, float], done: threading.Event) -> None:
    """The peak of the process tree's summed RSS every 10 ms, with its anonymous and file-backed parts
    (the files a scanner maps count as the latter) and the number of processes then; and the highest
    high-water mark (VmHWM) of any one of them."""
    while not done.wait(0.01):
        total: dict[str, float] = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
        pids = _tree(pid)
        for each in pids:
            try:
                with open(f"/proc/{each}/status") as f:
                    for line in f:
                        key = line.split(":", 1)[0]
                        if key in total:
                            total[key] += int(line.split()[1]) / 1024
                        elif key == "VmHWM":
                            peaks["hwm"] = max(peaks.get("hwm", 0.0), int(line.split()[1]) / 1024)
            except (OSError, ValueError, IndexError):
                pass
        if total["VmRSS"] > peaks.get("tree", 0.0):
            peaks.update(tree=total["VmRSS"], RssAnon=total["RssAnon"], RssFile=total["RssFile"],
                         processes=len(pids))
        if len(pids) > 1:  # forked workers share pages with their parent: summed RSS counts them twice
            peaks["pss"] = max(peaks.get("pss", 0.0), sum(_pss_mb(each) for each in pids))


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


def measure(argv: list[str], ok=(0,)) -> Run:
    """Run ``argv`` to its end; its own wall time, CPU time (from wait4) and peak RSS (sampled)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    peaks: dict[str, float] = {}
    done = threading.Event()
    sampler = threading.Thread(target=_sample_memory, args=(proc.pid, peaks, done), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    run = Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.read(), err.read(),
              proc.returncode, peaks)
    if run.code not in ok:
        raise RuntimeError(f"{' '.join(argv[:4])}... exited {run.code}: {run.stderr[-2000:]}")
    return run


def best(repeat: int, argv: list[str], ok=(0,)) -> Run:
    runs = [measure(argv, ok) for _ in range(repeat)]
    return min(runs, key=lambda r: r.wall)


def child(pipeline_path: str, place: str | None = None) -> None:
    """``--child``: run a pipeline as ``elkscan scan -p`` does and print the summary as JSON. ``place``
    (``threads``, ``processes``) overrides where the engines scan, for row 7b's comparison only."""
    from elkscan_core.pipeline import load_pipeline
    from elkscan_core.plugins import make_plugin_manager
    from elkscan_core.runner import build_session

    pipeline = load_pipeline(pipeline_path)
    if place:  # threads against worker processes per engine: a walk not split into shares
        import attrs

        pipeline = attrs.evolve(pipeline, limits=attrs.evolve(pipeline.limits, shares=False))
    session = build_session(pipeline, make_plugin_manager(pipeline.plugins))
    for engine in session.engines if place else ():
        engine.releases_gil = place == "threads"
    summary = session.run()
    print(json.dumps(summary.as_dict()))


def periodic(pipeline_path: str, passes: int) -> None:
    """``--child PIPELINE --passes N``: run a pipeline with a periodic dirscan as ``elkscan run`` does until
    its walk has made ``passes`` passes; print each pass's seconds (dirscan's log line) as JSON."""
    import logging

    from elkscan_core.pipeline import load_pipeline
    from elkscan_core.plugins import make_plugin_manager
    from elkscan_core.runner import build_session

    seconds: list[float] = []
    pipeline = load_pipeline(pipeline_path)
    session = build_session(pipeline, make_plugin_manager(pipeline.plugins))

    class Passes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "pass_seconds"):
                seconds.append(record.pass_seconds)
                if len(seconds) >= passes:
                    session.stop()

    logging.getLogger("elkscan").addHandler(Passes(logging.INFO))
    logging.getLogger("elkscan").setLevel(logging.INFO)
    summary = session.run()
    print(json.dumps({**summary.as_dict(), "passes": seconds}))


def walk_floor(roots: list[str]) -> None:
    """``--walk``: what any rescan pays before a look-up: each directory opened by descriptor, each regular
    file ``lstat``ed (as dirscan does, one filesystem, links not followed); prints files and seconds."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    started, files = time.monotonic(), 0
    for root in roots:
        dev = os.stat(root).st_dev
        stack = [root]
        while stack:
            path = stack.pop()
            try:
                fd = os.open(path, flags)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_dev != dev:
                    continue
                with os.scandir(fd) as listing:
                    for entry in listing:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(f"{path}/{entry.name}")
                        elif entry.is_file(follow_symlinks=False):
                            entry.stat(follow_symlinks=False)
                            files += 1
            finally:
                os.close(fd)
    print(files, time.monotonic() - started)


def raw_loop(list_path: str, compiled: str, threads: int) -> None:
    """``--raw-loop``: the minimal yara-python scanner a user would write; prints files and bytes."""
    from concurrent.futures import ThreadPoolExecutor

    import yara

    rules = yara.load(compiled)
    paths = Path(list_path).read_text().splitlines()

    def scan(path: str) -> int:
        try:
            return len(rules.match(filepath=path, timeout=5))
        except yara.Error:
            return 0

    with ThreadPoolExecutor(threads) as pool:
        hits = sum(pool.map(scan, paths, chunksize=16))
    print(json.dumps({"files": len(paths), "hits": hits}))


# -- the corpus -----------------------------------------------------------------------------------


def collect(roots: list[str], cap: int) -> list[tuple[str, int]]:
    """Regular files under ``roots`` up to ``cap`` bytes, symlinks not followed, one filesystem per root:
    the same set elkscan's dirscan (links: never) and ``yara -r -N -z`` visit."""
    files = []
    for root in roots:
        root_dev = os.stat(root).st_dev
        for directory, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(directory, d))
                       and os.lstat(os.path.join(directory, d)).st_dev == root_dev]
            for name in names:
                path = os.path.join(directory, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if os.path.stat.S_ISREG(st.st_mode) and st.st_size <= cap and os.access(path, os.R_OK):
                    files.append((path, st.st_size))
    return files


def warm(files: list[tuple[str, int]]) -> None:
    """Read every file once, so every tool sees the same warm page cache."""
    for path, _ in files:
        try:
            with open(path, "rb") as f:
                while f.read(4 * MiB):
                    pass
        except OSError:
            pass


def skipped_by_type(files: list[tuple[str, int]]) -> tuple[int, int]:
    """Files and bytes elkscan's file-type filter leaves out."""
    from elkscan_core.filetype import HEAD_SIZE, category

    count = size = 0
    for path, length in files:
        try:
            with open(path, "rb") as f:
                head = f.read(HEAD_SIZE)
        except OSError:
            continue
        if category(head):
            count += 1
            size += length
    return count, size


# -- the tools ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="elkscan-bench-"))
        self.state = self.work / "state"  # shared: the compiled-rule cache stays warm across runs
        if args.rules is None:
            args.rules = str(self.work / "generated-rules")
            generate(args.rules, GENERATED_RULES, GENERATED_SEED)
        self.rules = [str(p) for p in sorted(Path(args.rules).rglob("*.yar*")) if p.is_file()]
        if not self.rules:
            sys.exit(f"bench: no .yar/.yara files under {args.rules}")
        self.rows: list[tuple[str, str, str, str, str]] = []
        self._rules_warm = False
        self.notes: list[str] = []
        self.loads = [os.getloadavg()[0]]  # the 1-minute load average at the start and at each row

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def pipeline(self, name: str, roots: list[str], *, type_filter: bool = False, cache: bool = False,
                 state: Path | None = None, hashes: bool = False, engine: str = "yara", every: float | None = None,
                 shares: bool = False, **limits) -> str:
        options = {"rules": self.rules, "max_file_size": self.args.max_size}
        if engine == "yarax":
            options["on_error"] = "skip"  # the rules YARA-X refuses are named in its log, not the table
        data = {
            "version": 1, "plugins": ["yara_backend", *(["yarax_backend"] if engine == "yarax" else []),
                                      *(["hash_extractor"] if hashes else [])],
            "state_dir": str(state or self.state),
            "sources": [{"use": "dirscan", "with": {
                "roots": {r: -1 for r in roots}, "exclude": [], "min_size": 0, "max_size": self.args.max_size,
                "type_filter": type_filter, "links": "never", "one_filesystem": True,
                **({"every": every} if every else {})}}],
            "engines": [{"use": engine, "with": options, "canary": "none"}],  # --rules need not find EICAR
            "enrichers": [{"use": "hashes"}] if hashes else [],
            "limits": {"workers": self.args.threads, "cache": cache, "shares": shares, **limits},
        }
        if every:  # as `elkscan run` with the fanotify source: its change journal, no events of its own
            data["plugins"].append("fanotify_source")
            data["sources"].append({"use": "fanotify", "with": {"file_events": {"enabled": False},
                                                                "on_access": {"enabled": False}}})
        path = self.work / f"{name}.yaml"
        path.write_text(json.dumps(data))  # JSON is YAML
        return str(path)

    def warm_rules(self) -> None:
        """Compile the rules into the shared state directory once (a scan of an empty directory)."""
        if not self._rules_warm:
            empty = self.work / "empty"
            empty.mkdir(exist_ok=True)
            self.elkscan(self.pipeline("warm-rules", [str(empty)]), repeat=1)
            self._rules_warm = True

    def elkscan(self, pipeline: str, repeat: int | None = None, place: str | None = None) -> Run:
        return best(repeat or self.args.repeat, [PYTHON, __file__, "--child", pipeline,
                                                 *(["--place", place] if place else [])])

    def compiled_for_python(self) -> str:
        import yara

        path = self.work / "rules-python.yarc"
        if not path.exists():
            yara.compile(filepaths={p: p for p in self.rules}).save(str(path))
        return str(path)

    def compiled_for_cli(self) -> str | None:
        path = self.work / "rules-cli.yarc"
        if not path.exists():
            if not shutil.which("yarac"):
                return None
            done = subprocess.run(["yarac", *self.rules, str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                self.notes.append(f"yarac failed: {done.stderr.strip()[:300]}")
                return None
        return str(path)

    def raw(self, files: list[tuple[str, int]], repeat: int | None = None) -> Run:
        listing = self.work / "files.txt"
        listing.write_text("\n".join(p for p, _ in files))
        return best(repeat or self.args.repeat, [PYTHON, __file__, "--raw-loop", str(listing), self.compiled_for_python(),
                                       str(self.args.threads)])

    def cli(self, roots: list[str], repeat: int | None = None) -> Run | None:
        """``yara -C -r -N -p N -z CAP`` once per root (it takes one target); times summed."""
        compiled = self.compiled_for_cli()
        if compiled is None:
            return None
        total = None
        for root in roots:
            run = best(repeat or self.args.repeat, ["yara", "-C", "-r", "-N", "-p", str(self.args.threads),
                                          "-z", str(self.args.max_size), compiled, root], ok=(0, 1))
            if total is None:
                total = run
            else:
                total = Run(total.wall + run.wall, total.cpu + run.cpu, max(total.rss_mb, run.rss_mb),
                            total.stdout + run.stdout, total.stderr + run.stderr, 0)
        return total

    def row(self, number: str, measure_: str, elkscan: str, reference: str, target: str, met: bool | None) -> None:
        self.loads.append(os.getloadavg()[0])
        verdict = "n/a" if met is None else ("met" if met else "**missed**")
        self.rows.append((number, measure_, elkscan, reference, f"{target} ({verdict})"))

    # -- the rows ---------------------------------------------------------------------------------

    def first_scan(self, number: str, roots: list[str], target: float) -> tuple[Run, Run | None]:
        """A first scan of ``roots`` by elkscan, the yara-python loop and the CLI, interleaved, best of
        ``--repeat`` each; the row against ``target`` (of both references' speed). Returns elkscan's best
        run and the CLI's."""
        args = self.args
        files = collect(roots, args.max_size)
        size = sum(s for _, s in files)
        print(f"bench: corpus {', '.join(roots)}: {len(files):,} files, {size / 1e6:,.0f} MB "
              f"(<= {args.max_size // MiB} MiB each); warming the page cache", file=sys.stderr)
        warm(files)
        shares = args.shares and number != "1a"  # 717 files, a few of them large: threads balance them
        pipeline = self.pipeline(f"first-scan-{number}", roots, shares=shares)
        self.warm_rules()
        rounds = [(self.elkscan(pipeline, 1), self.raw(files, 1), self.cli(roots, 1))
                  for _ in range(args.repeat)]  # interleaved: a busy moment does not hit one tool only
        ours = min((r[0] for r in rounds), key=lambda run: run.wall)
        raw = min((r[1] for r in rounds), key=lambda run: run.wall)
        cli = min((r[2] for r in rounds if r[2] is not None), key=lambda run: run.wall, default=None)
        judged = ours.summary["names"]  # its "files" are inodes: hard links are read once
        if judged != len(files):
            self.notes.append(f"row {number}: elkscan judged {judged:,} names, the listing has {len(files):,} "
                              "(files that vanished or changed between the two)")

        def speed(run: Run) -> str:
            return f"{size / 1e6 / run.wall:,.0f} MB/s, {len(files) / run.wall:,.0f} files/s ({run.wall:.2f} s)"

        reference = f"yara-python loop {speed(raw)}"
        ratios = {"the loop": raw.wall / ours.wall}
        if cli is not None:
            reference += f"; `yara -N -p {args.threads}` {speed(cli)}"
            ratios["the CLI"] = cli.wall / ours.wall
        else:
            self.notes.append(f"no yara CLI (apt install yara): row {number} compares with the yara-python loop only")
        self.row(number, f"first scan, {', '.join(roots)}: {len(files):,} files / {size / 1e6:,.0f} MB, "
                 f"{args.threads} " + ("processes (limits.shares)" if shares else "threads"),
                 f"{speed(ours)}, of which {ours.summary['elapsed']:.2f} s scanning; "
                 + ", ".join(f"{ratio:.2f}x {name}" for name, ratio in ratios.items()) + " (process to process)",
                 reference, f">= {target:.2f}x both", min(ratios.values()) >= target)
        return ours, cli

    def throughput(self) -> None:
        """Rows 1a (/usr/bin alone) and 1 (the corpus)."""
        if self.args.bin_corpus:
            self.first_scan("1a", self.args.bin_corpus, TARGET_THROUGHPUT_BIN)
        self.first_scan_run, self.cli_first = self.first_scan("1", self.args.corpus, TARGET_THROUGHPUT)

    def rss(self) -> None:
        """Row 3: the peak RSS of elkscan's whole process tree on the RSS corpus, with the hashes enricher
        and the verdict cache (an empty store each run), as the default pipeline has them; the highest of
        ``--repeat`` runs, against the references' peaks on the same files."""
        args = self.args
        files = collect(args.rss_corpus, args.max_size)
        warm(files)
        self.warm_rules()
        hashes = "hash_extractor" in _installed_plugins()
        runs = []
        for i in range(args.repeat):
            state = self.work / f"rss-state-{i}"
            shutil.copytree(self.state, state)  # the warm compiled rules, an empty verdict cache
            runs.append(self.elkscan(self.pipeline(f"rss-{i}", args.rss_corpus, cache=True, state=state,
                                                   hashes=hashes), 1))
        ours = max(runs, key=lambda run: run.tree_mb)
        raw, cli = self.raw(files), self.cli(args.rss_corpus)
        if not hashes:
            self.notes.append("row 3: the hash_extractor plugin is not installed: measured without `hashes`")
        peaks = ours.peaks
        parts = (f"{peaks['RssAnon']:.0f} MB anonymous, {peaks['RssFile']:.0f} MB file-backed (libraries and the "
                 f"files being scanned) in {peaks['processes']:.0f} process(es)") if "processes" in peaks else ""
        self.row("3", f"peak RSS of the process tree, {', '.join(args.rss_corpus)}: {len(files):,} files, "
                 f"{self.rule_count} rules" + (", hashes" if hashes else "") + ", verdict cache",
                 f"{ours.tree_mb:.1f} MB, the highest of {len(runs)} runs ({', '.join(f'{r.tree_mb:.1f}' for r in runs)}; "
                 f"the sum sampled every 10 ms, or one process's high-water mark (VmHWM) when higher); at the peak: {parts}",
                 f"yara-python loop {raw.rss_mb:.0f} MB" + (f"; yara CLI {cli.rss_mb:.0f} MB" if cli else ""),
                 f"<= {TARGET_RSS_MB} MB", ours.tree_mb <= TARGET_RSS_MB)

    def mixed(self) -> None:
        args = self.args
        files = collect(args.mixed, args.max_size)
        size = sum(s for _, s in files)
        warm(files)
        skipped, skipped_bytes = skipped_by_type(files)
        ours = self.elkscan(self.pipeline("mixed", args.mixed, type_filter=True))
        cli = self.cli(args.mixed)
        share = f"type filter skipped {skipped:,} of {len(files):,} files ({skipped_bytes / max(size, 1):.0%} of " \
                f"{size / 1e6:,.0f} MB)"
        if cli is None:
            self.row("1b", f"mixed tree {', '.join(args.mixed)}", f"{ours.wall:.2f} s; {share}", "no yara CLI",
                     "ahead of the CLI", None)
            return
        self.row("1b", f"mixed tree {', '.join(args.mixed)}", f"{ours.wall:.2f} s "
                 f"({cli.wall / ours.wall:.1f}x the CLI's speed); {share}", f"yara CLI {cli.wall:.2f} s "
                 "(scans everything)", "ahead of the CLI", ours.wall < cli.wall)

    def clamav(self) -> None:
        """Row 2 is bench/clamav_bench.py's (it starts its own clamd); its table is quoted in a note."""
        bench = ROOT / "bench" / "clamav_bench.py"
        title = "clamav engine vs clamdscan --fdpass --multiscan, same clamd"
        if not bench.exists():
            self.row("2", title, "skipped", "", "within 10%", None)
            self.notes.append("row 2: bench/clamav_bench.py is not in this tree; nothing measured")
            return
        done = subprocess.run([PYTHON, str(bench), "--corpus", *self.args.clamav_corpus, "--workers",
                               str(self.args.threads), "--repeat", str(self.args.repeat)],
                              capture_output=True, text=True, timeout=3600)
        ratio = re.search(r"^\| elkscan / clamdscan throughput \| ([0-9.]+)", done.stdout, re.M)
        times = {name.split()[0]: seconds for name, seconds in re.findall(
            r"^\| (clamdscan --fdpass --multiscan|elkscan clamav engine) \| ([0-9.]+) \|", done.stdout, re.M)}
        if done.returncode != 0 or not ratio:
            self.row("2", title, "failed", "", "within 10%", None)
            self.notes.append(f"row 2: bench/clamav_bench.py exited {done.returncode}: "
                              f"{(done.stderr or done.stdout).strip()[-300:]}")
            return
        corpus = next((line for line in done.stdout.splitlines() if line.startswith("Corpus:")), "")
        self.row("2", title, f"{times.get('elkscan', '?')} s = {float(ratio.group(1)):.0%} of clamdscan's speed",
                 f"clamdscan {times.get('clamdscan', '?')} s", "within 10%", float(ratio.group(1)) >= 0.90)
        self.notes.append(f"row 2 (bench/clamav_bench.py, median): {corpus}")

    def cpu_share(self) -> None:
        args = self.args
        roots = args.cpu_corpus or args.corpus
        pipeline = self.pipeline("cpu-share", roots, cpu=f"{TARGET_CPU:.0%}")
        self.warm_rules()
        proc = subprocess.Popen([PYTHON, __file__, "--child", pipeline], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            time.sleep(3.0)  # start-up (rule loading) is not governed: measure the scanning
            t0, c0 = time.monotonic(), _cpu_seconds(proc.pid)
            finished = _wait(proc, args.duration)
            t1, c1 = time.monotonic(), _cpu_seconds(proc.pid) if not finished else None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if c1 is None:
            self.row("4", f"CPU share with cpu: 10% over {args.duration:.0f} s", "corpus ran out", "",
                     "10% +/- 1.5 points", None)
            self.notes.append("row 4: the corpus was scanned before the measurement ended; give a bigger "
                              "--cpu-corpus")
            return
        share = (c1 - c0) / (t1 - t0)
        self.row("4", f"CPU share with cpu: 10% over {t1 - t0:.0f} s of scanning", f"{share:.1%} of one CPU", "",
                 "10% +/- 1.5 points", abs(share - TARGET_CPU) <= CPU_TOLERANCE)

    def cached(self) -> None:
        """Rows 5a, 5 and 5b: the first scan with the cache on against the same scan with it off, the
        second scan, and what walking costs."""
        import statistics  # not at the top: a --child is row 3's measured process (decimal, fractions: 0.5 MB)

        args = self.args
        self.warm_rules()
        off_pipeline = self.pipeline("cache-off", args.corpus)
        # Not measured: the first scan of a series ran 10-60 % slower than the next ones, which made the
        # first pair (cache off first) read 0.88x in both of 2026-12-04's full runs.
        self.elkscan(off_pipeline, 1)
        pairs = []
        # At least 3 pairs, each back to back and in alternating order (off first, then on first), so a
        # busy moment or a warmer second run does not favour one side; the median pair is the figure
        # (single runs of the same pipeline vary by +-15 % on a 2-CPU machine).
        for i in range(max(PAIRS_CACHE_ON, args.repeat)):
            state = self.work / f"cache-state-{i}"
            shutil.copytree(self.state, state)  # the warm compiled rules, an empty verdict cache
            pipeline = self.pipeline(f"cached-{i}", args.corpus, cache=True, state=state)
            if i % 2:
                on = self.elkscan(pipeline, 1)
                pairs.append((self.elkscan(off_pipeline, 1), on))
            else:
                pairs.append((self.elkscan(off_pipeline, 1), self.elkscan(pipeline, 1)))
        walls = [p[1].summary["elapsed"] / p[0].summary["elapsed"] for p in pairs]
        cpus = [p[1].cpu / p[0].cpu for p in pairs]
        ratio_on = statistics.median(walls)
        self.row("5a", "first scan with the verdict cache on vs the same scan with it off",
                 f"median of {len(pairs)} pairs, alternating order: {ratio_on:.2f}x scanning time "
                 f"({', '.join(f'{r:.2f}x' for r in walls)}; "
                 f"{statistics.median(p[1].summary['elapsed'] for p in pairs):.2f} s vs "
                 f"{statistics.median(p[0].summary['elapsed'] for p in pairs):.2f} s), CPU "
                 f"{statistics.median(cpus):.2f}x ({', '.join(f'{r:.2f}x' for r in cpus)}; "
                 f"{statistics.median(p[1].cpu for p in pairs):.1f} s vs "
                 f"{statistics.median(p[0].cpu for p in pairs):.1f} s); "
                 f"{pairs[0][1].summary['files']:,} verdicts stored",
                 "the same pipeline without the cache", f"<= {TARGET_CACHE_ON:.2f}x", ratio_on <= TARGET_CACHE_ON)
        cli = getattr(self, "cli_first", None)
        # Row 5 compares each pipeline's second scan with that pipeline's first: threads (the default, what
        # must meet the target) with 5a's first scans (the faster of cache off and on: the stricter ratio),
        # and shares with a first scan of its own (and row 1's, which is on shares, when it ran). The
        # second scans and, when row 1 did not run it, the reference, are interleaved in this run: a busy
        # moment of a shared machine does not hit one of them only.
        first_threads = min((run for pair in pairs for run in pair), key=lambda r: r.summary["elapsed"])
        shared_state = self.work / "cache-state-shares"
        shutil.copytree(self.state, shared_state)  # the warm compiled rules, an empty verdict cache
        shares_pipeline = self.pipeline("cached-shares", args.corpus, cache=True, state=shared_state, shares=True)
        first_shares = self.elkscan(shares_pipeline, 1)
        if getattr(self, "first_scan_run", None) is not None and args.shares:
            first_shares = min(first_shares, self.first_scan_run, key=lambda r: r.summary["elapsed"])
        rounds = [(self.elkscan(pipeline, 1), self.elkscan(shares_pipeline, 1),
                   None if cli else self.cli(args.corpus, 1)) for _ in range(args.repeat)]
        second = min((r[0] for r in rounds), key=lambda run: run.wall)
        cli = cli or min((r[2] for r in rounds if r[2] is not None), key=lambda run: run.wall, default=None)
        s1 = first_threads.summary

        def described(name: str, first: Run, runs: list[Run]) -> str:
            again = min(runs, key=lambda run: run.wall)
            one, two = first.summary, again.summary
            each = ", ".join(f"{run.summary['elapsed']:.2f}" for run in runs)
            versus = f", {cli.wall / again.wall:.1f}x faster than the CLI" if cli else ""
            return (f"{name}: {two['elapsed']:.2f} s scanning ({again.wall:.2f} s process, {again.cpu:.2f} s CPU; "
                    f"runs {each} s) = {two['elapsed'] / one['elapsed']:.1%} of its first scan's "
                    f"{one['elapsed']:.2f} s{versus}")

        ratio = second.summary["elapsed"] / s1["elapsed"]
        self.row("5", "second scan of the unchanged corpus, verdict cache: each pipeline against its own first scan",
                 f"{second.summary['cached']:,} cached verdicts; "
                 + described("threads (the default)", first_threads, [r[0] for r in rounds]) + "; "
                 + described("shares", first_shares, [r[1] for r in rounds])
                 + (f"; `yara -p {args.threads}` {cli.wall:.2f} s, process to process" if cli else ""),
                 "yara CLI: no memory of earlier scans",
                 f"threads <= {TARGET_CACHED:.0%}"
                 + (f"; >= {TARGET_VS_CLI}x the CLI" if cli else " (no yara CLI installed)"),
                 ratio <= TARGET_CACHED and (cli is None or cli.wall / second.wall >= TARGET_VS_CLI))
        periodic_ = self.pipeline("periodic", args.corpus, cache=True, state=self.work / "cache-state-0", every=2)
        passes = min((measure([PYTHON, __file__, "--child", periodic_, "--passes", "4"]) for _ in range(args.repeat)),
                     key=lambda run: min(json.loads(run.stdout)["passes"][1:]))
        seconds = json.loads(passes.stdout)["passes"]
        later = min(seconds[1:])
        versus = f"; {cli.wall / later:.1f}x faster than `yara -p {args.threads}` ({cli.wall:.2f} s)" if cli else ""
        self.row("5c", "a later pass of a periodic scan of the unchanged corpus (`elkscan run`: dirscan every 2 s, "
                 "the fanotify source's change journal, verdict cache)",
                 f"{later:.2f} s a pass ({', '.join(f'{t:.2f}' for t in seconds[1:])} s; the first, which settles "
                 f"the journal, {seconds[0]:.2f} s) = {later / s1['elapsed']:.1%} of the first scan's "
                 f"{s1['elapsed']:.2f} s{versus}, in the running process",
                 "yara CLI: no memory of earlier scans",
                 f"<= {TARGET_CACHED:.0%}" + (f"; >= {TARGET_VS_CLI}x the CLI" if cli else ""),
                 later / s1["elapsed"] <= TARGET_CACHED and (cli is None or cli.wall / later >= TARGET_VS_CLI))
        walk = best(args.repeat, [PYTHON, __file__, "--walk", *args.corpus])
        find = best(args.repeat, ["find", *args.corpus, "-xdev", "-type", "f", "-printf", "%s\\n"])
        self.row("5b", "the walk alone: every regular file's lstat, links not followed",
                 f"a Python walk with directory descriptors {walk.wall:.2f} s process "
                 f"({float(walk.stdout.split()[1]):.2f} s walking, {walk.stdout.split()[0]} files)",
                 f"find -type f -printf %s {find.wall:.2f} s", "the floor of row 5", None)

    def first_result(self) -> None:
        pipeline = self.pipeline("first-result", self.args.corpus)
        # the `elkscan` script installed beside this interpreter, as users run it (`python -m` would load
        # the cli module twice: as __main__ and as elkscan_core.cli)
        command = [str(Path(PYTHON).with_name("elkscan")), "scan", "-p", pipeline, "-a", "-f", "jsonl", "-q"]
        self.warm_rules()
        times = [_first_line(command) for _ in range(self.args.repeat)]
        fastest = min(times)
        self.row("6", f"start-up to the first result, {self.rule_count} rules, compiled rules cached",
                 f"{fastest:.2f} s", "", f"< {TARGET_FIRST_RESULT:.0f} s", fastest < TARGET_FIRST_RESULT)

    def yarax(self) -> None:
        """Rows 7 and 7b: the yarax engine (worker processes: it holds the GIL) with 2 workers against 1;
        and threads against processes with 2 workers, for yarax and for yara (which lets go of the GIL).
        Runs are interleaved, so a busy moment does not hit one side only; the best of each counts."""
        args = self.args
        roots = args.yarax_corpus or args.corpus
        warm(collect(roots, args.max_size))
        self.warm_rules()
        plan = [("yarax 1", self.pipeline("yarax-1", roots, engine="yarax", workers=1), None),
                ("yarax 2", self.pipeline("yarax-2s" if args.shares else "yarax-2", roots, engine="yarax", workers=2,
                                          shares=args.shares), None),
                ("yarax 1 threads", self.pipeline("yarax-1", roots, engine="yarax", workers=1), "threads"),
                ("yarax 2 threads", self.pipeline("yarax-2", roots, engine="yarax", workers=2), "threads"),
                ("yara 2 threads", self.pipeline("yara-2", roots, workers=2), None),
                ("yara 2 processes", self.pipeline("yara-2", roots, workers=2), "processes")]
        runs: dict[str, list[Run]] = {name: [] for name, _, _ in plan}
        for _ in range(args.repeat):
            for name, pipeline, place in plan:
                runs[name].append(self.elkscan(pipeline, 1, place))
        fastest = {name: min(found, key=lambda r: r.summary["elapsed"]) for name, found in runs.items()}
        t = {name: run.summary["elapsed"] for name, run in fastest.items()}
        every = {name: ", ".join(f"{r.summary['elapsed']:.2f}" for r in found) for name, found in runs.items()}
        ratio = t["yarax 1"] / t["yarax 2"]
        one_cpu = t["yarax 1 threads"] / t["yarax 2"]
        cpu = {name: f"{run.cpu:.1f}" for name, run in fastest.items()}
        self.row("7", f"yara-x engine, 2 workers vs 1, {', '.join(roots)} "
                 f"({fastest['yarax 2'].summary['files']:,} files)",
                 f"{t['yarax 2']:.2f} s vs {t['yarax 1']:.2f} s scanning = {ratio:.2f}x ("
                 + ("2 workers: limits.shares, two processes each walking and scanning its share; 1 worker: "
                    if args.shares else "") + "worker "
                 f"processes for files of 64 KiB and more, a worker's process scanning beside its thread; "
                 f"CPU {cpu['yarax 2']} s vs {cpu['yarax 1']} s; every run: {every['yarax 2']} s vs "
                 f"{every['yarax 1']} s). Against 1 worker on one CPU (threads only, {t['yarax 1 threads']:.2f} s, "
                 f"CPU {cpu['yarax 1 threads']} s): {one_cpu:.2f}x", "",
                 f">= {TARGET_YARAX_SCALING}x", ratio >= TARGET_YARAX_SCALING)

        def side(name: str) -> str:
            run = fastest[name]
            return (f"{t[name]:.2f} s, CPU {run.cpu:.1f} s, {run.peaks.get('pss', run.tree_mb):.0f} MB "
                    f"(runs {every[name]} s)")

        self.row("7b", "threads vs processes, 2 workers: scan time, peak PSS of the process tree",
                 f"yarax: {'shares' if args.shares else 'processes'} {side('yarax 2')}; threads "
                 f"{side('yarax 2 threads')}. yara: threads "
                 f"{side('yara 2 threads')}; processes {side('yara 2 processes')}",
                 "", "(reference: where each engine runs)", None)

    @property
    def rule_count(self) -> int:
        import yara

        return sum(1 for _ in yara.load(self.compiled_for_python()))


def _installed_plugins() -> set[str]:
    from elkscan_core.plugins import installed

    return set(installed())


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _first_line(argv: list[str]) -> float:
    """Seconds from starting ``argv`` to its first line on stdout; the process is then stopped."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    timer = threading.Timer(60, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
        elapsed = time.monotonic() - started
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    if not line:
        raise RuntimeError(f"{' '.join(argv)} printed nothing")
    return elapsed


# -- the report -----------------------------------------------------------------------------------


def machine() -> list[str]:
    import yara

    from elkscan_core import __version__

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    cli = subprocess.run(["yara", "--version"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("yara") else "not installed"
    return [f"- machine: {model}, {os.cpu_count()} CPUs, {memory / 2**20:.0f} GiB RAM; "
            f"{platform.system()} {platform.release()}",
            f"- versions: elkscan {__version__}, Python {platform.python_version()}, yara-python "
            f"{yara.__version__} (libyara {yara.YARA_VERSION}), yara CLI {cli}"]


def rules_origin(args: argparse.Namespace) -> str:
    if args.rules_given:
        return f"from `--rules .../{Path(args.rules).name}`"
    return f"generated by bench/gen_rules.py (seed {GENERATED_SEED})"


def shown_arguments(argv: list[str]) -> list[str]:
    """The command line, with the rule directory by its name only: the results say which set was
    measured, not where it sat on the machine that measured it."""
    shown, rules_next = [], False
    for arg in argv:
        if rules_next or arg.startswith("--rules="):
            prefix = "" if rules_next else "--rules="
            arg = prefix + ".../" + Path(arg.removeprefix("--rules=")).name
        rules_next = arg == "--rules"
        shown.append(arg)
    return shown


def report(bench: Bench, started: datetime.datetime) -> str:
    args = bench.args
    lines = [f"## elkscan benchmarks, {started:%Y-%m-%d %H:%M} UTC", "",
             f"`{' '.join(['bench/run.py', *shown_arguments(sys.argv[1:])])}`", "", *machine(),
             f"- rules: {len(bench.rules)} files, {bench.rule_count} rules {rules_origin(args)}",
             f"- corpus: {', '.join(args.corpus)}; mixed tree: {', '.join(args.mixed)}; files up to "
             f"{args.max_size // MiB} MiB; {args.threads} threads; best of {args.repeat}",
             f"- load average (1 minute) at the start and at each row: {min(bench.loads):.1f} to "
             f"{max(bench.loads):.1f} on {os.cpu_count()} CPUs", "",
             "| # | measure | elkscan | reference | target |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in bench.rows]
    if bench.notes:
        lines += ["", *[f"- {note}" for note in bench.notes]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--corpus", nargs="+", default=["/usr/bin", "/usr/lib"], metavar="DIR",
                        help="directories scanned by rows 1, 5, 6 (default: /usr/bin /usr/lib)")
    parser.add_argument("--bin-corpus", nargs="*", default=["/usr/bin"], metavar="DIR",
                        help="directories of row 1a, the first scan of executables (default: /usr/bin; "
                             "none: no row 1a)")
    parser.add_argument("--rss-corpus", nargs="+", default=["/usr/bin", "/usr/lib/x86_64-linux-gnu"],
                        metavar="DIR", help="directories of row 3, peak RSS (default: /usr/bin "
                                            "/usr/lib/x86_64-linux-gnu)")
    parser.add_argument("--mixed", nargs="+", default=["/usr/share"], metavar="DIR",
                        help="a tree with images, fonts and documents for row 1b (default: /usr/share)")
    parser.add_argument("--clamav-corpus", nargs="+", default=["/usr/bin"], metavar="DIR",
                        help="directories for row 2 (default: /usr/bin; clamd is much slower than yara)")
    parser.add_argument("--cpu-corpus", nargs="+", metavar="DIR", help="directories for row 4 (default: --corpus)")
    parser.add_argument("--rules", metavar="DIR",
                        help="a YARA rule directory (default: a set bench/gen_rules.py generates at run time)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every tool (default: 2)")
    parser.add_argument("--max-size", type=int, default=18 * MiB, help="size cap in bytes (default: 18 MiB)")
    parser.add_argument("--repeat", type=int, help="runs per timed figure, the best counts (default 2; 3 with --full)")
    parser.add_argument("--duration", type=float, help="seconds of row 4 (default 15; 60 with --full)")
    parser.add_argument("--full", action="store_true", help="the issue's durations: 60 s of row 4, 3 repeats")
    parser.add_argument("--yarax-corpus", nargs="+", metavar="DIR", help="directories for row 7 (default: --corpus)")
    parser.add_argument("--shares", action=argparse.BooleanOptionalAction, default=True,
                        help="rows 1 and 7 (2 workers) split the walk across worker processes (limits.shares; "
                             "--no-shares: worker threads, as every other row)")
    parser.add_argument("--rows", default="1,2,3,4,5,6,7",
                        help="rows to run (1 includes 1a and 1b, 5 includes 5a, 5b and 5c, 7 includes 7b; default: all)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS.md"),
                        help="where the results go (default: bench/RESULTS.md; '-' for nowhere)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--place", choices=("threads", "processes"), help=argparse.SUPPRESS)
    parser.add_argument("--passes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--raw-loop", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--walk", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # ends as `elkscan` does: without the interpreter's teardown once the output is out
        from elkscan_core.quick_exit import quick_exit

        if args.passes:
            periodic(args.child, args.passes)
        else:
            child(args.child, args.place)
        quick_exit(0)
    if args.walk:
        walk_floor(args.walk)
        return 0
    if args.raw_loop:
        raw_loop(args.raw_loop[0], args.raw_loop[1], int(args.raw_loop[2]))
        return 0
    args.repeat = args.repeat or (3 if args.full else 2)
    args.duration = args.duration or (60.0 if args.full else 15.0)
    args.rules_given = args.rules is not None
    if args.rules_given:
        args.rules = os.path.abspath(args.rules)
    rows = set(re.split(r"[,\s]+", args.rows))
    started = datetime.datetime.now(datetime.timezone.utc)
    bench = Bench(args)
    try:
        if "1" in rows:
            bench.throughput()
            bench.mixed()
        if "2" in rows:
            bench.clamav()
        if "3" in rows:
            bench.rss()
        if "4" in rows:
            bench.cpu_share()
        if "5" in rows:
            bench.cached()
        if "6" in rows:
            bench.first_result()
        if "7" in rows:
            bench.yarax()
        text = report(bench, started)
    finally:
        bench.close()
    print(text)
    if args.output != "-":
        Path(args.output).write_text("# Benchmark results\n\nWritten by `bench/run.py`; see bench/README.md.\n\n"
                                     + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
