"""Benchmark of compiled hash indexes (``elkscan db hashes``) as fleet verifiers use them.

For each count (default 1 million and 10 million random MD5 signatures, ClamAV ``.hdb`` lines with
realistic names and sizes up to 18 MiB) it measures:

- the build: ``elkscan db hashes`` as its own process (wall time and peak RSS) and the index's size;
- verifier processes, each its own Python process that maps the index with ``open_index``: load time
  (checks and SHA-256 included), RSS and PSS (``/proc/PID/smaps``) after loading and after the
  look-ups (their inputs freed again), and how much of the RSS is the index's mapping, for one process
  alone and for two at once on the same file;
- look-ups per second for digests not listed and listed (``HashIndex.lookup``), and digests per
  second from a stream of ``<md5 hex> <size>`` lines (1 in 100 listed), parsed and looked up as a
  verifier judging hosts' digests does.

Prints a markdown table. Run: ``.venv/bin/python bench/hashindex_bench.py [--counts 1000000 10000000]
[--dir DIR]`` (DIR needs about 0.9 GB per 10 million signatures; default: a temporary directory).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time

FAMILIES = ("Win.Trojan.Agent", "Unix.Malware.Mirai", "Win.Worm.Allaple", "Php.Webshell.Generic",
            "Unix.Trojan.Gafgyt", "Win.Downloader.Zbot", "Doc.Dropper.Emotet", "Unix.Coinminer.Xmrig")
LOOKUPS = 300_000
STREAM = 300_000


def write_signatures(path: str, count: int, rng: random.Random, sample_path: str) -> None:
    """``count`` random .hdb lines; every 10th (up to 100,000) also goes to ``sample_path``."""
    with open(path, "w") as out, open(sample_path, "w") as sample:
        for number in range(count):
            digest = rng.randbytes(16).hex()
            size = rng.randrange(5, 18 * 1024 * 1024)
            out.write(f"{digest}:{size}:{rng.choice(FAMILIES)}-{9000000 + number}-0\n")
            if number % 10 == 0 and number < 1_000_000:
                sample.write(f"{digest} {size}\n")


def memory(pid: int, path: str) -> tuple[float, float, float]:
    """RSS and PSS of a process, and the RSS of its mapping of ``path`` (MB)."""
    total: dict[str, int] = {}
    mapped, inside = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                key = parts[0].rstrip(":")
                total[key] = total.get(key, 0) + int(parts[1])
                mapped += int(parts[1]) if inside and key == "Rss" else 0
            elif "-" in parts[0] and len(parts) >= 5:
                inside = parts[-1] == path
    return total["Rss"] / 1e3, total["Pss"] / 1e3, mapped / 1e3


def worker(index_path: str, sample_path: str) -> None:
    """One verifier process: load, say so, wait; look up, say the rates, wait; exit."""
    from elkscan_hash_extractor.compiled import open_index
    from elkscan_hash_extractor.hashlist import HashIndex, release_free_memory

    started = time.perf_counter()
    digest, tables = open_index(index_path)
    index = HashIndex({name: [table] for name, table in tables.items()}, digest)
    loaded = time.perf_counter() - started
    print(json.dumps({"load": loaded}), flush=True)
    sys.stdin.readline()
    rng = random.Random(os.getpid())
    with open(sample_path) as sample:
        listed = [(bytes.fromhex(d), int(s)) for d, s in (line.split() for line in sample)]
    misses = [(rng.randbytes(16), size) for _, size in (rng.choice(listed) for _ in range(LOOKUPS))]
    hits = [rng.choice(listed) for _ in range(LOOKUPS // 5)]
    lookup = index.lookup
    assert all(lookup("md5", d, s) for d, s in hits[:1000]) and not any(lookup("md5", d, s) for d, s in misses[:1000])
    started = time.perf_counter()
    for digest_, size in misses:
        lookup("md5", digest_, size)
    miss_rate = len(misses) / (time.perf_counter() - started)
    started = time.perf_counter()
    for digest_, size in hits:
        lookup("md5", digest_, size)
    hit_rate = len(hits) / (time.perf_counter() - started)
    stream = "".join(f"{(d if n % 100 else hits[n % len(hits)][0]).hex()} {s}\n"
                     for n, (d, s) in enumerate(misses[:STREAM])).splitlines()
    started, found = time.perf_counter(), 0
    for line in stream:  # what a verifier does with each host record's md5_hash and exe_size
        hex_digest, size = line.split(" ")
        found += bool(lookup("md5", bytes.fromhex(hex_digest), int(size)))
    stream_rate = len(stream) / (time.perf_counter() - started)
    del listed, misses, hits, stream  # what remains is the verifier: Python, elkscan and the map
    gc.collect()
    release_free_memory()
    print(json.dumps({"miss": miss_rate, "hit": hit_rate, "stream": stream_rate, "found": found}), flush=True)
    sys.stdin.readline()


def verifiers(index_path: str, sample_path: str, how_many: int) -> dict:
    """Run ``how_many`` verifier processes at once on one index; their figures (memory as the kernel
    counts it while all of them are alive)."""
    processes = [subprocess.Popen([sys.executable, __file__, "--worker", index_path, sample_path],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(how_many)]
    loads = [json.loads(p.stdout.readline())["load"] for p in processes]
    after_load = [memory(p.pid, index_path) for p in processes]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    rates = [json.loads(p.stdout.readline()) for p in processes]
    after_lookups = [memory(p.pid, index_path) for p in processes]
    for process in processes:
        process.communicate("end\n", timeout=120)
    return {"load": loads, "after_load": after_load, "after_lookups": after_lookups, "rates": rates}


def build(lists: str, output: str) -> tuple[float, float]:
    """``elkscan db hashes`` in its own process: seconds and peak RSS (MB)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "elkscan_core.cli", "db", "hashes", lists, "-o", output],
                               stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"db hashes failed ({process.returncode})")
    return time.perf_counter() - started, usage.ru_maxrss / 1e3


def report(count: int, text_mb: float, seconds: float, peak: float, size_mb: float, one: dict, two: dict) -> None:
    def mb(pairs, which):
        return " / ".join(f"{pair[which]:.0f}" for pair in pairs)

    def rate(result, key):
        return " / ".join(f"{r[key]:,.0f}" for r in result["rates"])

    print(f"\n### {count:,} MD5 signatures ({text_mb:,.0f} MB of .hdb lines)\n")
    print("| measure | one verifier | two verifiers at once (each) |")
    print("|---|---|---|")
    print(f"| build (`elkscan db hashes`): time; peak RSS | {seconds:.0f} s; {peak:,.0f} MB | |")
    print(f"| index file | {size_mb:,.0f} MB | |")
    print(f"| load (map, check, SHA-256) | {one['load'][0]:.2f} s | {' / '.join(f'{s:.2f}' for s in two['load'])} s |")
    print(f"| RSS after load, MB | {mb(one['after_load'], 0)} | {mb(two['after_load'], 0)} |")
    print(f"| PSS after load, MB | {mb(one['after_load'], 1)} | {mb(two['after_load'], 1)} |")
    print(f"| RSS after the look-ups, MB | {mb(one['after_lookups'], 0)} | {mb(two['after_lookups'], 0)} |")
    print(f"| PSS after the look-ups, MB | {mb(one['after_lookups'], 1)} | {mb(two['after_lookups'], 1)} |")
    print(f"| of the RSS, the index's mapping, MB | {mb(one['after_lookups'], 2)} | "
          f"{mb(two['after_lookups'], 2)} |")
    print(f"| look-ups/s, digest not listed | {rate(one, 'miss')} | {rate(two, 'miss')} |")
    print(f"| look-ups/s, digest listed (name decompressed) | {rate(one, 'hit')} | {rate(two, 'hit')} |")
    print(f"| digests/s from a stream of `<md5> <size>` lines (1 % listed) | {rate(one, 'stream')} | "
          f"{rate(two, 'stream')} |")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args()
    with open("/proc/loadavg") as loadavg:
        print(f"load average at start: {' '.join(loadavg.read().split()[:3])} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="elkscan-hashindex-bench-", dir=args.dir) as directory:
        os.chmod(directory, 0o755)
        for count in args.counts:
            lists = os.path.join(directory, f"lists-{count}")
            os.mkdir(lists)
            sample = os.path.join(directory, f"sample-{count}.txt")
            write_signatures(os.path.join(lists, "full.hdb"), count, random.Random(count), sample)
            text_mb = os.path.getsize(os.path.join(lists, "full.hdb")) / 1e6
            output = os.path.join(directory, f"full-{count}.idx")
            seconds, peak = build(lists, output)
            os.unlink(os.path.join(lists, "full.hdb"))
            one = verifiers(output, sample, 1)
            two = verifiers(output, sample, 2)
            report(count, text_mb, seconds, peak, os.path.getsize(output) / 1e6, one, two)
            os.unlink(output)
    with open("/proc/loadavg") as loadavg:
        print(f"\nload average at the end: {' '.join(loadavg.read().split()[:3])}")


if __name__ == "__main__":
    main()
