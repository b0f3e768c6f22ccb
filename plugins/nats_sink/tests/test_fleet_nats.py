"""Issue 15 end to end over NATS, with real processes: two scanning hosts (``elkscan run`` with their own
state and ``host:`` names, dirscan + ``hashes`` ``when: new`` + the ``nats`` sink) send the record of
every file judged afresh to ``nats-server -js``; a group of two verifiers (``elkscan run`` with the ``nats`` source, ``hashlist``
over an index compiled by ``elkscan db hashes``, the file sink) judges them. A file whose MD5 only the
full set holds is detected centrally with its host and path, and killing one verifier (SIGKILL) while
records flow loses none: every expected detection is in the verifiers' files at least once (by id)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

STREAM, GROUP = "ELKSCAN", "verifiers"
ELKSCAN = os.path.join(os.path.dirname(sys.executable), "elkscan")
FILES = 300  # per host; every third is on the full hash set
SIGNATURE = "Unix.Trojan.FleetTest"


def wait_until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {seconds} s")


def write_yaml(path, data) -> str:
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def host_tree(tmp_path, host: str) -> dict[str, bytes]:
    tree = tmp_path / host / "srv"
    tree.mkdir(parents=True)
    files = {}
    for n in range(FILES):
        path, data = tree / f"f{n}.bin", f"{host} file {n}\n".encode() * (n % 7 + 1)
        path.write_bytes(data)
        files[str(path)] = data
    return files


def verifier_lines(path) -> list[dict]:
    """The records a verifier's file sink wrote (a process killed in a write may leave a torn last line)."""
    if not os.path.exists(path):
        return []
    found = []
    for line in open(path, "rb").read().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def test_hosts_to_nats_to_a_group_of_two_verifiers_one_killed(tmp_path, nats_server):
    server = nats_server()
    server.add_stream(STREAM, ["elkscan.records.>"])
    hosts = {host: host_tree(tmp_path, host) for host in ("web-1", "db-1")}
    only_here = tmp_path / "web-1" / "srv" / "dropper"  # on one host only, and only the full set has it
    only_here.write_bytes(b"#!/bin/sh\n# a dropper only the verifiers' full hash set knows\n")
    hosts["web-1"][str(only_here)] = only_here.read_bytes()

    # the full hash set: every third file of each host, and the dropper, compiled for the verifiers
    listed = {(host, path) for host, files in hosts.items() for n, path in enumerate(sorted(files))
              if n % 3 == 0 or path == str(only_here)}
    hdb = tmp_path / "full.hdb"
    hdb.write_text("".join(f"{hashlib.md5(hosts[h][p]).hexdigest()}:{len(hosts[h][p])}:{SIGNATURE}-{i}\n"
                           for i, (h, p) in enumerate(sorted(listed))))
    index = tmp_path / "full.idx"
    subprocess.run([ELKSCAN, "db", "hashes", str(hdb), "-o", str(index)], check=True, timeout=60)
    trimmed = tmp_path / "trimmed.hdb"  # what the hosts hold: none of these
    trimmed.write_text(f"{'0' * 32}:1:Unix.Test.NotHere\n")

    verifiers, outputs = [], []
    for name in ("v1", "v2"):
        outputs.append(tmp_path / f"{name}.jsonl")
        pipeline = write_yaml(tmp_path / f"{name}.yaml", {
            "version": 1, "plugins": ["nats_sink", "hash_extractor", "file_sink"], "host": f"verifier-{name}",
            "state_dir": str(tmp_path / f"state-{name}"), "canary_every": 0,
            "sources": [{"use": "nats", "with": {"servers": server.url, "subject": "elkscan.records.>",
                                                 "stream": STREAM, "group": GROUP, "ack_wait": "3s",
                                                 "max_in_flight": 32, "timeout": "2s"}}],
            "engines": [{"use": "hashlist", "with": {"files": [str(index)]}}],
            "sinks": [{"use": "file", "with": {"path": str(outputs[-1])}}]})
        verifiers.append(subprocess.Popen([ELKSCAN, "run", "-q", "--log", str(tmp_path / f"{name}.log"), pipeline]))

    scans = []
    for host in hosts:
        pipeline = write_yaml(tmp_path / f"{host}.yaml", {
            "version": 1, "plugins": ["nats_sink", "hash_extractor"], "host": host,
            "state_dir": str(tmp_path / f"state-{host}"),
            "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path / host / "srv"): -1},
                                                    "type_filter": False}}],
            "engines": [{"use": "hashlist", "with": {"files": [str(trimmed)]}}],
            "enrichers": [{"use": "hashes", "with": {"when": "new", "sha256": True}}],
            "sinks": [{"use": "nats", "with": {"servers": server.url, "subject": f"elkscan.records.{host}",
                                               "stream": STREAM, "batch": 25}}]})
        scans.append(subprocess.Popen([ELKSCAN, "run", "-q", pipeline]))
    try:
        # kill -9 the first verifier as soon as it wrote a detection, while the hosts' records flow
        wait_until(lambda: verifier_lines(outputs[0]), seconds=60, what="the first verifier's first detection")
        assert any(scan.poll() is None for scan in scans) or sum(server.consumer(STREAM, GROUP))
        verifiers[0].send_signal(signal.SIGKILL)
        verifiers[0].wait(10)
        for scan in scans:
            assert scan.wait(120) == 0  # a walk without every: the run ends with it
        sent = server.count(STREAM)
        assert sent == sum(len(files) for files in hosts.values())  # a first pass: every file is new

        def found():
            return {(r["host"], r["path"]) for r in verifier_lines(outputs[0]) + verifier_lines(outputs[1])}
        wait_until(lambda: found() >= listed and server.consumer(STREAM, GROUP) == (0, 0), seconds=90,
                   what="every listed file detected by the group")
    finally:
        for process in verifiers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for scan in scans:
            if scan.poll() is None:
                scan.kill()
    assert verifiers[1].wait(20) == 0  # SIGTERM: an orderly stop, within a bound

    records = verifier_lines(outputs[0]) + verifier_lines(outputs[1])
    assert {(r["host"], r["path"]) for r in records} == listed  # nothing lost, nothing else detected
    by_id: dict[str, dict] = {}
    for record in records:  # a record judged twice (the killed verifier's) has the same id
        assert by_id.setdefault(record["id"], record)["path"] == record["path"]
    assert len(by_id) == len(listed)

    async def deliveries(nc):
        return (await nc.jsm().consumer_info(STREAM, GROUP)).delivered.consumer_seq
    assert server.call(deliveries) > server.count(STREAM)  # what the killed verifier held came again

    # the steady state: a second pass of a host finds nothing new (the verdict cache) and sends nothing
    assert subprocess.run([ELKSCAN, "run", "-q", str(tmp_path / "web-1.yaml")], timeout=120).returncode == 0
    assert server.count(STREAM) == sent
    (dropper,) = [r for r in records if r["path"] == str(only_here)][:1]
    assert dropper["host"] == "web-1" and dropper["status"] == "detected"
    assert dropper["signature"].startswith(SIGNATURE) and dropper["verifier"] in ("verifier-v1", "verifier-v2")
    assert dropper["md5_hash"] == hashlib.md5(only_here.read_bytes()).hexdigest()
