"""Benchmark: elkscan's clamav engine against ``clamdscan --fdpass --multiscan``, same clamd, same database,
same files, in one run.

    .venv/bin/python bench/clamav_bench.py [CORPUS ...] [--database DIR] [--workers 4] [--repeat 3]

One private clamd is started (elkscan's managed configuration, with clamd's clean-file cache disabled so
every run scans for real; the project's own signatures unless ``--database``). Each round runs
clamdscan over a list of the corpus's regular files, then an elkscan session (a ``dirscan`` of the
corpus, the ``clamav`` engine pointed at that clamd's socket, FILDES) over the same files; the page
cache is warmed first. The median of ``--repeat`` rounds is reported as files/s and MB/s, with
elkscan's rate as a fraction of clamdscan's (target: at least 0.90).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from elkscan_clamav_backend.daemon import ManagedClamd, find_binary
from elkscan_clamav_backend.engine import default_signatures
from elkscan_core.testing import run

TARGET = 0.90


def regular_files(roots: list[str]) -> list[str]:
    """Every regular file under the roots, without following symlinks (as both tools walk)."""
    found = []
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    found.append(path)
    return sorted(found)


def warm(paths: list[str]) -> int:
    total = 0
    for path in paths:
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    total += len(chunk)
        except OSError:
            pass
    return total


def time_clamdscan(config: str, file_list: str) -> float:
    started = time.perf_counter()
    subprocess.run(["clamdscan", "--fdpass", "--multiscan", "--infected", "--no-summary",
                    f"--config-file={config}", f"--file-list={file_list}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def time_elkscan(socket_path: str, roots: list[str], workers: int) -> tuple[float, object]:
    pipeline = {
        "plugins": ["clamav_backend"],
        "sources": [{"use": "dirscan", "with": {
            "roots": {os.path.abspath(r): -1 for r in roots}, "exclude": [], "type_filter": False,
            "min_size": 0, "max_size": "4GiB", "links": "never"}}],
        "engines": [{"use": "clamav", "with": {"socket": socket_path}}],
        "limits": {"workers": workers},
    }
    started = time.perf_counter()
    result = run(pipeline)
    return time.perf_counter() - started, result.summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="*", metavar="CORPUS", help="directories or files (default: /usr/bin)")
    parser.add_argument("--corpus", nargs="+", default=[], metavar="PATH", help="same as CORPUS")
    parser.add_argument("--database", help="a directory of ClamAV databases (default: the project's own)")
    parser.add_argument("--workers", type=int, default=4, help="elkscan workers and clamd threads (4)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported (3)")
    args = parser.parse_args(argv)
    roots = args.roots + args.corpus or ["/usr/bin"]
    if not find_binary("clamd") or not shutil.which("clamdscan"):
        print("clamd and clamdscan are needed (Debian packages clamav-daemon, clamdscan)", file=sys.stderr)
        return 2
    if args.database and not os.path.isdir(args.database):
        print(f"--database {args.database}: not a directory", file=sys.stderr)
        return 2
    files = regular_files(roots)
    size = warm(files)
    runtime = tempfile.mkdtemp(prefix="elkscan-clamav-bench-")
    database = os.path.join(runtime, "db")
    os.mkdir(database)
    sources = ([os.path.join(args.database, n) for n in os.listdir(args.database)] if args.database
               else default_signatures())
    for path in sources:
        shutil.copy(path, database)
    file_list = os.path.join(runtime, "files.txt")
    with open(file_list, "w") as handle:
        handle.write("\n".join(files) + "\n")
    daemon = ManagedClamd(find_binary("clamd"), runtime, database,
                          {"MaxThreads": args.workers, "DisableCache": True, "MaxFileSize": "100M",
                           "MaxScanSize": "400M", "StreamMaxLength": "100M"},
                          startup_timeout=600, timeout=120)
    clamdscan_times, elkscan_times, summary = [], [], None
    try:
        daemon.start()
        for _ in range(args.repeat):
            clamdscan_times.append(time_clamdscan(daemon.config_path, file_list))
            elapsed, summary = time_elkscan(daemon.socket_path, roots, args.workers)
            elkscan_times.append(elapsed)
    finally:
        daemon.stop()
        shutil.rmtree(runtime, ignore_errors=True)

    reference, ours = statistics.median(clamdscan_times), statistics.median(elkscan_times)
    ratio = reference / ours
    mb = size / 1e6
    print(f"Corpus: {', '.join(roots)}: {len(files):,} files, {mb:,.1f} MB (elkscan scanned {summary.files:,}, "
          f"{summary.detected_files} detected, {summary.errors} errors); "
          f"clamd {args.workers} threads, cache off; elkscan {args.workers} workers, FILDES; "
          f"median of {args.repeat}.\n")
    print("| tool | seconds | files/s | MB/s |")
    print("|---|---:|---:|---:|")
    print(f"| clamdscan --fdpass --multiscan | {reference:.2f} | {len(files) / reference:,.0f} | "
          f"{mb / reference:,.1f} |")
    print(f"| elkscan clamav engine | {ours:.2f} | {len(files) / ours:,.0f} | {mb / ours:,.1f} |")
    print(f"| elkscan / clamdscan throughput | {ratio:.2f} | | target >= {TARGET:.2f}: "
          f"{'met' if ratio >= TARGET else 'NOT met'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
