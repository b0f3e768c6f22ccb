"""One 6002 per process from one scan of their executable (audit #9), in a real session: the real
procscan, YARA engine, process enricher and elkeid sink, plus an engine of the test's own that counts
what it is given."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

from elkscan_core import TASK_DONE, Engine, Sink, hookimpl
from elkscan_core.testing import SAMPLES, run


class Count(Engine):
    id = "count"
    scanned: list = []

    def scan(self, subject) -> list:
        Count.scanned.append(subject.target.path)
        return []


class Ended(Sink):
    id = "ended"
    event = threading.Event()

    def write(self, record) -> None:
        if record.kind == TASK_DONE:
            Ended.event.set()


class _Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry) -> None:
        registry.add(Count)

    @hookimpl
    def elkscan_register_sinks(self, registry) -> None:
        registry.add(Ended)


def test_three_processes_of_one_executable_are_three_6002s_from_one_scan(tmp_path, task_frame, decode):
    exe = tmp_path / "miner-sleep"
    exe.write_bytes(open(shutil.which("sleep"), "rb").read() + SAMPLES["miner.json"][0])
    exe.chmod(0o755)
    task_r, task_w = os.pipe()
    record_r, record_w = os.pipe()
    os.write(task_w, task_frame(6057, {"cpu_idle": "100"}, "t"))
    received = bytearray()
    reader = threading.Thread(target=lambda: [received.extend(chunk) for chunk in iter(
        lambda: os.read(record_r, 65536), b"")])
    reader.start()
    data = {"plugins": ["elkeid_transport", "yara_backend", "proc_enricher", "hash_extractor"],
            "sources": [{"use": "elkeid", "with": {
                "fd": task_r, "lock_file": str(tmp_path / "lock"), "db_dir": str(tmp_path / "tmp"),
                "cpu_sample": "50ms", "quick_roots": [str(tmp_path / "none")]}}],
            "engines": [{"use": "yara"}, {"use": "count"}], "enrichers": [{"use": "hashes"}, {"use": "process"}],
            "sinks": [{"use": "elkeid", "with": {"fd": record_w}}, {"use": "ended"}],
            "state_dir": str(tmp_path / "state")}
    Count.scanned = []
    Ended.event.clear()
    sleepers = [subprocess.Popen([str(exe), str(60 + n)]) for n in range(3)]
    session = threading.Thread(target=run, args=(data,), kwargs={"extra_plugins": [_Plugin()]})
    try:
        session.start()
        assert Ended.event.wait(60), "the 6057 never ended"
    finally:
        os.close(task_w)  # the agent hangs up: the session ends
        session.join(60)
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
        os.close(record_w)
        reader.join(10)
        os.close(task_r)
        os.close(record_r)
    records = decode(bytes(received))
    mine = sorted(r.fields["pid"] for r in records if r.data_type == 6002 and r.fields["exe"] == str(exe))
    assert mine == sorted(str(s.pid) for s in sleepers)
    assert Count.scanned.count(str(exe)) == 1  # judged once
