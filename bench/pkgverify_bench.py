"""Benchmark of the ``pkgverify`` engine: a rescan of ``/usr`` with ``trust_packages`` against one without.

    .venv/bin/python bench/pkgverify_bench.py                 # /usr, the generated rule set, best of 2
    .venv/bin/python bench/pkgverify_bench.py --root /usr/bin --rules DIR --repeat 1

Each scan is its own process (``--child``: what ``elkscan scan -p PIPELINE`` does), walking the root
with ``dirscan`` as bench/run.py's row 1 does (no excludes, no file-type filter, files up to 18 MiB),
on a warm page cache; wall time, CPU time (user + system) and peak RSS come from ``wait4``. Rows:

1. ``yara`` alone;
2. ``pkgverify`` then ``yara``, ``trust_packages: false``: every file is read by both;
3. the same with ``trust_packages: true``: files that match their package are read by ``pkgverify`` only;
4. with the verdict cache, after a rule update (the yara rules' version changes, so its clean verdicts
   no longer count): ``yara`` alone, and ``pkgverify`` + ``yara`` with ``trust_packages``, whose
   known-good verdicts do not depend on the rules.

Then the index alone, in this process: entries, packages, build time, its buffers and the growth of
RSS it caused; and the ``ModifiedVendorFile`` findings of row 2 (files of this host that differ from
their package).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gen_rules import generate  # bench/ is on sys.path: this script's directory
from run import GENERATED_RULES, GENERATED_SEED, PYTHON, best, collect, machine, measure, warm

MiB = 1024 * 1024


def child(pipeline_path: str) -> None:
    """``--child``: run the pipeline; its detection records (JSON lines), then the summary as JSON."""
    from elkscan_core.pipeline import load_pipeline
    from elkscan_core.plugins import make_plugin_manager
    from elkscan_core.runner import build_session

    pipeline = load_pipeline(pipeline_path)
    summary = build_session(pipeline, make_plugin_manager(pipeline.plugins)).run()
    sys.stdout.flush()
    print(json.dumps(summary.as_dict()))


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def index_alone() -> dict:
    from elkscan_pkgverify import Aliases, DpkgDatabase, IndexBuilder

    gc.collect()
    before = rss_mb()
    started = time.monotonic()
    builder = IndexBuilder(Aliases.of_root())
    DpkgDatabase().load(builder)
    index = builder.build()
    took = time.monotonic() - started
    gc.collect()
    lookups = time.monotonic()
    for _ in range(100_000):
        index.lookup("/usr/bin/ls")
    return {"entries": len(index), "packages": len(index.packages), "seconds": took,
            "buffers_mb": index.memory() / MiB, "rss_growth_mb": rss_mb() - before,
            "lookup_us": (time.monotonic() - lookups) * 10}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="elkscan-pkgverify-bench-"))
        if args.rules is None:
            args.rules = str(self.work / "rules")
            generate(args.rules, GENERATED_RULES, GENERATED_SEED)
        self.rules = [str(p) for p in sorted(Path(args.rules).rglob("*.yar*")) if p.is_file()]
        self.rule_update = self.work / "update.yar"  # one more rule: a new rule set version
        self.rule_update.write_text('rule Bench_Update { strings: $a = "elkscan bench rule update" condition: $a }\n')

    def pipeline(self, name: str, pkgverify: bool | None, *, cache: bool = False, updated: bool = False) -> str:
        engines = [{"use": "yara", "with": {"rules": self.rules + [str(self.rule_update)] * updated,
                                            "max_file_size": self.args.max_size}}]
        if pkgverify is not None:
            engines.insert(0, {"use": "pkgverify", "with": {"trust_packages": pkgverify}})
        data = {"version": 1, "plugins": ["yara_backend", "pkgverify", "stdout_sink"],
                "state_dir": str(self.work / "state"),
                "sources": [{"use": "dirscan", "with": {
                    "roots": {self.args.root: -1}, "exclude": [], "min_size": 0, "max_size": self.args.max_size,
                    "type_filter": False, "links": "never", "one_filesystem": True}}],
                "engines": engines, "sinks": [{"use": "stdout", "with": {"format": "jsonl"}}],
                "limits": {"workers": self.args.threads, "cache": cache,
                           "cache_path": str(self.work / f"{name}.sqlite")}}
        path = self.work / f"{name}.yaml"
        path.write_text(json.dumps(data))
        return str(path)

    def scan(self, pipeline: str, repeat: int | None = None):
        return best(repeat or self.args.repeat, [PYTHON, __file__, "--child", pipeline], ok=(0, 1))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def line(label: str, run, baseline=None) -> str:
    summary = run.summary
    share = f" ({run.wall / baseline.wall:.0%} of row 1)" if baseline is not None else ""
    return (f"| {label} | {run.wall:.1f} s{share} | {run.cpu:.1f} s | {run.rss_mb:.0f} MB | {summary['files']:,} "
            f"| {summary['known_good']:,} | {summary['cached']:,} | {summary['detected_files']:,} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/usr")
    parser.add_argument("--rules", help="a directory of .yar files (default: 400 generated rules)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=18 * MiB)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    bench = Bench(args)
    try:
        print(f"warming the page cache and the compiled rules for {args.root} ...", file=sys.stderr)
        warm(collect([args.root], args.max_size))
        bench.scan(bench.pipeline("warm", None), repeat=1)
        yara = bench.scan(bench.pipeline("yara", None))
        untrusted = bench.scan(bench.pipeline("untrusted", False))
        trusted = bench.scan(bench.pipeline("trusted", True))
        rows = [line("1. yara alone", yara), line("2. pkgverify + yara, trust_packages: false", untrusted, yara),
                line("3. pkgverify + yara, trust_packages: true", trusted, yara)]
        for name, trust in (("cache-yara", None), ("cache-trusted", True)):
            measure([PYTHON, __file__, "--child", bench.pipeline(name, trust, cache=True)], ok=(0, 1))
            after = bench.scan(bench.pipeline(name, trust, cache=True, updated=True), repeat=1)
            label = "yara alone" if trust is None else "pkgverify + yara, trust_packages: true"
            rows.append(line(f"4. after a rule update, verdict cache: {label}", after, yara))
        findings = [json.loads(text) for text in untrusted.stdout.splitlines()[:-1]]
        modified = [f for f in findings if f.get("class") == "ModifiedVendorFile"]
        index = index_alone()
        print("\n".join([
            *machine(),
            f"- root {args.root}; {len(bench.rules)} rule files from {args.rules}; {args.threads} workers; "
            f"files up to {args.max_size // MiB} MiB; no file-type filter; best of {args.repeat}",
            "",
            "| scan | wall | CPU | peak RSS | files | known good | cached verdicts | files detected |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"- the dpkg index alone: {index['entries']:,} files of {index['packages']:,} packages, read in "
            f"{index['seconds']:.2f} s; {index['buffers_mb']:.1f} MB of buffers, RSS grew by "
            f"{index['rss_growth_mb']:.1f} MB; {index['lookup_us']:.1f} us a look-up",
            f"- ModifiedVendorFile findings on this host ({len(modified)}): "
            + (", ".join(f"{f['path']} ({f['name']})" for f in modified[:20]) or "none"),
        ]))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
