"""Benchmark of the ``hashlist`` engine's index: load time, memory and look-up rate.

Writes N random MD5 signatures (ClamAV ``.hdb`` lines with realistic names) to a temporary file, loads
them with the same builder the engine uses, and measures:

- load time (parse, sort, index) and the index's memory: its buffers, and the growth of the
  process's resident memory (RSS) it caused, after loading and at the peak while loading;
- look-ups per second for digests that are not listed (the common case) and for listed ones;
- the size pre-filter (files whose size no signature has are never hashed);
- for reference, a plain Python ``dict`` of the same signatures (memory and look-up rate).

Prints a markdown table with the targets (1 million MD5 signatures in at most 40 MB, at least 1 million
look-ups per second). Run: ``.venv/bin/python bench/hashlist_bench.py [--count 1000000]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import tempfile
import time
import tracemalloc

from elkscan_hash_extractor.hashlist import HashListBuilder

TARGET_MB = 40
TARGET_LOOKUPS = 1_000_000
FAMILIES = ("Win.Trojan.Agent", "Unix.Malware.Mirai", "Win.Worm.Allaple", "Php.Webshell.Generic",
            "Unix.Trojan.Gafgyt", "Win.Downloader.Zbot", "Doc.Dropper.Emotet", "Unix.Coinminer.Xmrig")


def write_signatures(path: str, count: int, rng: random.Random) -> list[tuple[bytes, int]]:
    """``count`` random .hdb lines; returns a sample of (digest, size) that are listed."""
    sample = []
    with open(path, "w") as out:
        for number in range(count):
            digest = rng.randbytes(16)
            size = rng.randrange(5, 18 * 1024 * 1024)
            out.write(f"{digest.hex()}:{size}:{rng.choice(FAMILIES)}-{9000000 + number}-0\n")
            if number % 10 == 0 and len(sample) < 100_000:
                sample.append((digest, size))
    return sample


def rss_mb() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def rate(function, items, repeat: int = 3) -> float:
    """Best calls/second of ``function(*item)`` over ``items``."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for item in items:
            function(*item)
        best = min(best, time.perf_counter() - started)
    return len(items) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="MD5 signatures (default 1,000,000)")
    parser.add_argument("--lookups", type=int, default=500_000, help="look-ups per measurement")
    args = parser.parse_args()
    rng = random.Random(4)

    with tempfile.TemporaryDirectory(prefix="elkscan-hashlist-bench-") as directory:
        path = os.path.join(directory, "bench.hdb")
        listed = write_signatures(path, args.count, rng)
        file_mb = os.path.getsize(path) / 1e6

        gc.collect()
        before = rss_mb()
        started = time.perf_counter()
        builder = HashListBuilder()
        builder.add_file(path)
        index = builder.build()
        load_seconds = time.perf_counter() - started
        del builder
        gc.collect()
        retained_mb = rss_mb() - before
        peak_mb = peak_rss_mb() - before
        table = index.tables["md5"][0]

        misses = [(rng.randbytes(16), size) for _, size in
                  (listed[i % len(listed)] for i in range(args.lookups))]
        hits = [listed[i % len(listed)] for i in range(args.lookups)]
        assert all(table.find(d, s) for d, s in hits[:1000]), "a listed digest was not found"
        assert not any(table.find(d, s) for d, s in misses[:1000]), "an unlisted digest was found"
        miss_rate = rate(index.lookup, [("md5", d, s) for d, s in misses])
        hit_rate = rate(index.lookup, [("md5", d, s) for d, s in hits[: args.lookups // 5]])
        sizes = [(rng.randrange(5, 18 * 1024 * 1024),) for _ in range(args.lookups)]
        hashed = sum(bool(index.algorithms_for(s)) for (s,) in sizes) / len(sizes)
        filter_rate = rate(index.algorithms_for, sizes)

        gc.collect()
        tracemalloc.start()
        reference = {digest: (size, f"name-{n}") for n, (digest, size) in
                     enumerate((rng.randbytes(16), rng.randrange(5, 1 << 24)) for _ in range(args.count))}
        dict_mb = tracemalloc.get_traced_memory()[0] / 1e6
        tracemalloc.stop()
        probe = [(d,) for d, _ in misses]
        dict_rate = rate(reference.get, probe)
        del reference

    target_mb = TARGET_MB * args.count / 1_000_000  # the target scales with the signature count
    ok = "yes" if max(retained_mb, index.memory() / 1e6) <= target_mb else "NO"
    fast = "yes" if miss_rate >= TARGET_LOOKUPS else "NO"
    print(f"## hashlist: {args.count:,} random MD5 signatures ({file_mb:.0f} MB of .hdb lines)\n")
    print("| measure | elkscan hashlist | plain Python dict (reference) | target | met |")
    print("|---|---|---|---|---|")
    print(f"| load (parse + sort + index) | {load_seconds:.1f} s | | | |")
    print(f"| memory after load (RSS growth; index buffers) | {retained_mb:.1f} MB; "
          f"{index.memory() / 1e6:.1f} MB | {dict_mb:.1f} MB (tracemalloc) | <= {target_mb:g} MB | {ok} |")
    print(f"| memory peak while loading (RSS growth) | {peak_mb:.1f} MB | | | |")
    print(f"| look-ups/s, digest not listed | {miss_rate:,.0f} | {dict_rate:,.0f} | >= {TARGET_LOOKUPS:,} "
          f"| {fast} |")
    print(f"| look-ups/s, digest listed (name decompressed) | {hit_rate:,.0f} | | | |")
    print(f"| size pre-filter checks/s | {filter_rate:,.0f} | | | |")
    print(f"| random file sizes that need hashing | {hashed:.1%} | | | |")


if __name__ == "__main__":
    main()
