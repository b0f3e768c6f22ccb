"""Benchmark of fleet verifiers (issue 15): digests/s per verifier process and its memory, for a compiled
index of 1 million and of 10 million MD5 signatures.

For each count it writes that many random ClamAV ``.hdb`` signatures and compiles them with ``elkscan db
hashes`` (as bench/hashindex_bench.py does), starts Debian's ``nats-server -js`` with its store in the work
directory and publishes ``--digests`` record documents into a stream, as hosts' ``nats`` sinks send them
(``hashes`` with ``sha256: true``: ``md5_hash``, ``sha256``, ``exe_size``, ``exe_hash``, times, a path;
1 in 100 listed). Then ``elkscan run`` verifiers (the ``nats`` source, ``hashlist`` over the index, the
file sink for the detections) consume the whole stream, first one process alone, then a group of two on
the same index (each run a new consumer group, so each reads every message). Measured: digests/s from the
first delivery until every message is acked (JetStream's consumer info, read every 0.2 s), start-up
(process start to first delivery), peak RSS (``VmHWM``) and the highest PSS (``/proc/PID/smaps_rollup``,
read every 0.2 s) of each process, and that every listed digest was detected.

Prints a markdown table. Run: ``.venv/bin/python bench/fleet_bench.py [--counts 1000000 10000000]
[--digests 100000] [--dir DIR]`` (DIR needs about 0.9 GB per 10 million signatures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import nats

from hashindex_bench import build, write_signatures

STREAM, SUBJECT = "FLEET", "elkscan.records.>"
ELKSCAN = os.path.join(os.path.dirname(sys.executable), "elkscan")


def nats_server(directory: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")
    if not binary:
        raise SystemExit("nats-server is missing (apt package nats-server, installed by setup.sh)")
    log = os.path.join(directory, "nats-server.log")
    process = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd",
                                os.path.join(directory, "nats-store")], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while b"Server is ready" not in open(log, "rb").read():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("nats-server did not start: " + open(log).read()[-2000:])
        time.sleep(0.05)
    return process, f"nats://127.0.0.1:{port}"


def documents(count: int, sample_path: str, rng: random.Random):
    """``count`` record documents as hosts send them; every 100th has a listed MD5 and size."""
    with open(sample_path) as sample:
        listed = [line.split() for line in sample]
    now = int(time.time())
    for n in range(count):
        if n % 100 == 0:
            md5, size = listed[(n // 100) % len(listed)]
            size = int(size)
        else:
            md5, size = rng.randbytes(16).hex(), rng.randrange(5, 18 * 1024 * 1024)
        host = f"web-{n % 50}"
        yield f"elkscan.records.{host}", json.dumps({
            "kind": "finding", "time": now, "id": f"{n:032x}", "origin": "dirscan", "host": host,
            "path": f"/usr/lib/x86_64-linux-gnu/lib{n}.so.1", "status": "clean", "judged_by": ["yara"],
            "exe_size": size, "exe_hash": rng.randbytes(8).hex(), "md5_hash": md5,
            "sha256": rng.randbytes(32).hex(), "create_at": now - 86400, "modify_at": now - 3600}).encode()


async def publish(url: str, count: int, sample_path: str) -> float:
    nc = await nats.connect(url)
    try:
        await nc.jsm().add_stream(name=STREAM, subjects=[SUBJECT])
        js, pending, started = nc.jetstream(timeout=30), [], time.perf_counter()
        for subject, data in documents(count, sample_path, random.Random(count)):
            pending.append(js.publish(subject, data))
            if len(pending) == 1000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        return count / (time.perf_counter() - started)
    finally:
        await nc.close()


def consumer_state(url: str, group: str) -> tuple[int, int, int]:
    """(messages delivered, not yet delivered, delivered and not acked); zeros before the group exists."""
    async def read():
        nc = await nats.connect(url)
        try:
            info = await nc.jsm().consumer_info(STREAM, group)
            return info.delivered.stream_seq, info.num_pending, info.num_ack_pending
        except nats.js.errors.NotFoundError:
            return 0, 1, 0
        finally:
            await nc.close()
    return asyncio.run(read())


def memory(pid: int) -> tuple[float, float]:
    """Peak RSS (VmHWM) and the current PSS of a process, MB."""
    peak = pss = 0.0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1e3
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1e3
    return peak, pss


def verify(directory: str, url: str, index: str, group: str, processes: int, expected: int) -> dict:
    """``processes`` verifiers of a new consumer group read the whole stream: their figures."""
    started, runs = time.perf_counter(), []
    for number in range(processes):
        name = f"{group}-{number}"
        output = os.path.join(directory, f"{name}.jsonl")
        pipeline = os.path.join(directory, f"{name}.yaml")
        with open(pipeline, "w") as out:
            json.dump({"version": 1, "plugins": ["nats_sink", "hash_extractor", "file_sink"], "host": name,
                       "state_dir": os.path.join(directory, f"state-{name}"), "canary_every": 0,
                       "sources": [{"use": "nats", "with": {"servers": url, "subject": SUBJECT, "stream": STREAM,
                                                            "group": group}}],
                       "engines": [{"use": "hashlist", "with": {"files": [index]}}],
                       "sinks": [{"use": "file", "with": {"path": output}}]}, out)
        process = subprocess.Popen([ELKSCAN, "run", "-q", "--log", os.path.join(directory, f"{name}.log"), pipeline])
        runs.append({"process": process, "output": output, "peak": 0.0, "pss": 0.0})
    first = None
    while True:
        for run in runs:
            peak, pss = memory(run["process"].pid)
            run["peak"], run["pss"] = max(run["peak"], peak), max(run["pss"], pss)
        delivered, pending, unacked = consumer_state(url, group)
        now = time.perf_counter()
        if first is None and delivered:
            first = now
        if first is not None and pending == 0 and unacked == 0:
            break
        if any(run["process"].poll() is not None for run in runs):
            raise SystemExit(f"a verifier ended early; see {directory}/{group}-*.log")
        time.sleep(0.2)
    for run in runs:
        run["process"].send_signal(signal.SIGTERM)
    for run in runs:
        run["process"].wait(60)
    detected = set()
    for run in runs:
        with open(run["output"]) as lines:
            detected |= {json.loads(line)["host_record_id"] for line in lines if line.strip()}
    return {"rate": expected / (now - first), "startup": first - started, "detected": len(detected),
            "peak": [run["peak"] for run in runs], "pss": [run["pss"] for run in runs]}


def report(count: int, digests: int, published: float, one: dict, two: dict) -> None:
    def each(values):
        return " / ".join(f"{value:,.0f}" for value in values)

    print(f"\n### {count:,} MD5 signatures, {digests:,} digests ({digests // 100:,} listed)\n")
    print("| measure | one verifier | two verifiers, one group |")
    print("|---|---|---|")
    print(f"| digests/s (first delivery to the last ack) | {one['rate']:,.0f} | {two['rate']:,.0f} together, "
          f"{two['rate'] / 2:,.0f} each |")
    print(f"| start-up to the first delivery | {one['startup']:.1f} s | {two['startup']:.1f} s |")
    print(f"| peak RSS (VmHWM), MB | {each(one['peak'])} | {each(two['peak'])} |")
    print(f"| highest PSS, MB | {each(one['pss'])} | {each(two['pss'])} |")
    print(f"| listed digests detected | {one['detected']:,} | {two['detected']:,} |")
    print(f"\n(publishing the {digests:,} documents: {published:,.0f} a second)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--digests", type=int, default=100_000)
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args()
    with open("/proc/loadavg") as loadavg:
        print(f"load average at start: {' '.join(loadavg.read().split()[:3])} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="elkscan-fleet-bench-", dir=args.dir) as directory:
        os.chmod(directory, 0o755)
        for count in args.counts:
            work = os.path.join(directory, str(count))
            os.mkdir(work)
            lists = os.path.join(work, "lists")
            os.mkdir(lists)
            sample = os.path.join(work, "sample.txt")
            write_signatures(os.path.join(lists, "full.hdb"), count, random.Random(count), sample)
            index = os.path.join(work, "full.idx")
            build(lists, index)
            shutil.rmtree(lists)
            server, url = nats_server(work)
            try:
                published = asyncio.run(publish(url, args.digests, sample))
                one = verify(work, url, index, "one", 1, args.digests)
                two = verify(work, url, index, "two", 2, args.digests)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(30)
            listed = len(range(0, args.digests, 100))
            if one["detected"] != listed or two["detected"] != listed:
                raise SystemExit(f"expected {listed} detections, got {one['detected']} and {two['detected']}")
            report(count, args.digests, published, one, two)
    with open("/proc/loadavg") as loadavg:
        print(f"\nload average at the end: {' '.join(loadavg.read().split()[:3])}")


if __name__ == "__main__":
    main()
