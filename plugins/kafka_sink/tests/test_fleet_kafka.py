"""Issue 15's end to end over Kafka, with real processes: two scanning hosts (``elkscan scan --all``,
each with its own state and ``host:`` name: dirscan, hashlist over a trimmed list, ``hashes`` with
``when: all``, the kafka sink) and a group of two verifiers (``elkscan run``: the kafka source, hashlist
over a compiled index made by ``elkscan db hashes``, the file sink), all on librdkafka's mock cluster,
which lives in this test's process and listens on a loopback port. A file whose MD5 is only in the full
set is detected centrally with its host and path; one verifier is SIGKILLed while records flow and
nothing is lost: every expected record is in the output at least once, duplicates share their id."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import yaml

ELKSCAN = [sys.executable, "-m", "elkscan_core.cli"]
FILES = 300  # per host
SESSION_TIMEOUT = "6s"  # how soon the group gives a dead verifier's partitions to the other


def write_tree(root, host: str) -> dict[str, bytes]:
    """``FILES`` small files, distinct on each host: path -> content."""
    root.mkdir()
    files = {}
    for n in range(FILES):
        content = f"{host} file {n}\n".encode() * (1 + n % 7)
        path = root / f"f{n:04d}.txt"
        path.write_bytes(content)
        files[str(path)] = content
    return files


def pipeline(path, **content) -> str:
    path.write_text(yaml.safe_dump({"version": 1, **content}))
    return str(path)


def elkscan(*args, **popen):
    return subprocess.Popen([*ELKSCAN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def outputs(paths) -> list[dict]:
    records = []
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                records.extend(json.loads(line) for line in f if line.endswith("\n"))
    return records


def test_two_hosts_two_verifiers_one_killed_nothing_lost(tmp_path, cluster):
    cluster.create_topic("records", 4)
    trees = {host: write_tree(tmp_path / host, host) for host in ("host-a", "host-b")}
    only_here = tmp_path / "host-a" / "only-here.bin"  # on one host only, its MD5 only in the full set
    only_here.write_bytes(b"a file the hosts' trimmed lists do not know\n")
    trees["host-a"][str(only_here)] = only_here.read_bytes()
    # the full set: the unique file, and every third file of each host (so that many records must arrive)
    expected = {(host, path) for host, files in trees.items() for i, path in enumerate(sorted(files)) if i % 3 == 0}
    expected.add(("host-a", str(only_here)))
    full = tmp_path / "full.hashes"
    full.write_text("".join(
        f"md5:{hashlib.md5(trees[host][path]).hexdigest()}:{len(trees[host][path])}:Fleet.Test.Full-{i}\n"
        for i, (host, path) in enumerate(sorted(expected))))
    index = tmp_path / "full.idx"
    subprocess.run([*ELKSCAN, "db", "hashes", str(full), "-o", str(index)], check=True, timeout=120)
    trimmed = tmp_path / "trimmed.hashes"
    trimmed.write_text(f"md5:{'0' * 32}:1:Fleet.Test.Trimmed\n")

    verifiers, outs = [], []
    for n in (1, 2):
        outs.append(str(tmp_path / f"verifier-{n}.jsonl"))
        config = pipeline(
            tmp_path / f"verifier-{n}.yaml", host=f"verifier-{n}", state_dir=str(tmp_path / f"verifier-{n}-state"),
            plugins=["kafka_sink", "hash_extractor", "file_sink"],
            sources=[{"use": "kafka", "with": {"brokers": cluster.brokers, "topic": "records", "group": "verifiers",
                                               "session_timeout": SESSION_TIMEOUT, "max_in_flight": 50}}],
            engines=[{"use": "hashlist", "with": {"files": [str(index)]}}],
            sinks=[{"use": "file", "with": {"path": outs[-1]}}])
        verifiers.append(elkscan("run", config))
    hosts = []
    for host in trees:
        config = pipeline(
            tmp_path / f"{host}.yaml", host=host, state_dir=str(tmp_path / f"{host}-state"),
            plugins=["kafka_sink", "hash_extractor"],
            sources=[{"use": "dirscan", "with": {"roots": {str(tmp_path / host): -1}, "type_filter": False}}],
            engines=[{"use": "hashlist", "with": {"files": [str(trimmed)]}}],
            enrichers=[{"use": "hashes", "with": {"when": "all"}}],
            sinks=[{"use": "kafka", "with": {"brokers": cluster.brokers, "topic": "records",
                                             "flush_interval": "50ms", "batch": 20}}])
        hosts.append(elkscan("scan", "--all", "-q", "-p", config))
    try:
        deadline = time.monotonic() + 120
        while not outputs(outs[:1]):  # the first verifier is judging: kill it while records flow
            assert time.monotonic() < deadline and verifiers[0].poll() is None, "the first verifier wrote nothing"
            time.sleep(0.02)
        verifiers[0].send_signal(signal.SIGKILL)
        for process in hosts:
            assert process.wait(120) in (0, 1), process.stderr.read().decode()  # every record on the topic
        found = lambda: {(r["host"], r["path"]) for r in outputs(outs)}  # noqa: E731
        while not expected <= found():
            assert time.monotonic() < deadline, f"{len(expected - found())} record(s) lost"
            assert verifiers[1].poll() is None, verifiers[1].stderr.read().decode()
            time.sleep(0.2)
    finally:
        for process in (*verifiers, *hosts):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (*verifiers, *hosts):
            process.wait(30)
    assert verifiers[1].returncode in (0, 1), verifiers[1].stderr.read().decode()
    records = outputs(outs)
    assert {(r["host"], r["path"]) for r in records} == expected  # nothing else is detected
    [unique] = {r["id"]: r for r in records if r["path"] == str(only_here)}.values()
    assert unique["host"] == "host-a" and unique["verifier"] in ("verifier-1", "verifier-2")
    assert unique["signature"].startswith("Fleet.Test.Full-") and unique["status"] == "detected"
    ids: dict[tuple[str, str], set[str]] = {}
    for record in records:  # a record judged twice (redelivered after the kill) is recognised by its id
        ids.setdefault((record["host"], record["path"]), set()).add(record["id"])
    assert all(len(same) == 1 for same in ids.values())
    assert len(records) >= len(expected)
