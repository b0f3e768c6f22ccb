"""A whole session: procscan finds a running process's (deleted) executable, a test engine flags it,
and the record carries Elkeid's full file set and process set with the true values."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import pytest
import xxhash

from elkscan_core import Detection, Engine, hookimpl
from elkscan_core.testing import run


class FlagOneFile:
    """A plugin with an engine that detects exactly one file, known by (device, inode)."""

    def __init__(self, identity: tuple[int, int]) -> None:
        identity_of_flagged = identity

        class FlagEngine(Engine):
            id = "flag"

            def scan(self, subject):
                if (subject.stat.st_dev, subject.stat.st_ino) == identity_of_flagged:
                    return [Detection.from_signature(self.id, "Unix.Trojan.TestFlag-1")]
                return []

        self.engine = FlagEngine

    @hookimpl
    def elkscan_register_engines(self, registry) -> None:
        registry.add(self.engine)


@pytest.fixture
def deleted_program(tmp_path):
    """A copy of sh, waiting on its stdin in its own session, whose file is then deleted."""
    exe = tmp_path / "elkscan-test-prog"
    shutil.copy2("/bin/sh", exe)
    content = exe.read_bytes()
    st = os.stat(exe)
    birth = int(subprocess.run(["stat", "-c", "%W", str(exe)], capture_output=True, text=True).stdout)
    process = subprocess.Popen([str(exe), "-c", "read line", "", "ünïcode"], stdin=subprocess.PIPE,
                               start_new_session=True)
    for _ in range(1000):  # wait until the exec has completed and the program waits
        with open(f"/proc/{process.pid}/stat") as stat:
            if stat.read().rpartition(")")[2].split()[0] == "S":
                break
        time.sleep(0.005)
    else:
        raise AssertionError(f"{exe} did not start: {process.poll()}")
    os.unlink(exe)
    yield process, str(exe), content, st, birth
    process.kill()
    process.wait()


def test_procscan_record_carries_elkeids_file_and_process_sets(deleted_program):
    process, exe, content, st, birth = deleted_program
    result = run({
        "plugins": ["hash_extractor", "proc_enricher"],
        "sources": [{"use": "procscan"}],
        "engines": [{"use": "flag"}],
        "enrichers": [{"use": "hashes"}, {"use": "process"}],
    }, extra_plugins=[FlagOneFile((st.st_dev, st.st_ino))])
    [record] = result.records
    assert record.target.pid == process.pid
    assert record.target.path == f"{exe} (deleted)"
    assert [d.signature for d in record.detections] == ["Unix.Trojan.TestFlag-1"]
    size = len(content)
    assert record.facts == {
        # file set: the deleted executable, read through /proc/<pid>/exe
        "exe_size": size,
        "exe_hash": xxhash.xxh64(size.to_bytes(8, "little") + content[:32768]).hexdigest(),
        "md5_hash": hashlib.md5(content).hexdigest(),
        "create_at": birth,
        "modify_at": int(st.st_mtime),
        # process set
        "pid": process.pid,
        "ppid": os.getpid(),
        "pgid": process.pid,
        "tgid": process.pid,
        "sessionid": process.pid,
        "argv": f"{exe} -c read line ünïcode",
        "comm": "elkscan-test-pr",  # the kernel keeps 15 characters
        "uid": os.getuid(),
        "pns": os.stat("/proc/self/ns/pid").st_ino,
        "docker_id": "",
        "pids": (process.pid,),  # procscan: every process running this executable
    }
    assert result.summary.errors == 0


def test_targets_without_a_pid_get_no_process_facts(tmp_path):
    (tmp_path / "plain.txt").write_bytes(b"not a process\n")
    result = run({
        "plugins": ["proc_enricher", "yara_backend"],
        "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path): 1}, "exclude": []}}],
        "engines": ["yara"],
        "enrichers": [{"use": "process", "with": {"when": "all"}}],
    }, report_clean=True)
    [record] = result.records
    assert record.target.pid is None and record.facts == {} and record.status == "clean"
