"""Elkeid's process facts of real processes the tests start, checked against what the kernel says
through other means (os.getpgid/getsid, the ns inode, the values the test chose)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from elkscan_core import UNREADABLE
from elkscan_proc_enricher import docker_id_from_cgroup, process_facts, read_process


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


def wait_for_state(pid: int, wanted: str) -> None:
    """Popen may return before the exec completes (vfork): wait until the new program sleeps."""
    for _ in range(1000):
        if state(pid) == wanted:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never reached state {wanted}")


@pytest.fixture
def spawn():
    """spawn(argv, **popen) -> Popen of a process that waits (on stdin, or sleeps), once it does; all are
    killed at the end."""
    started = []

    def start(argv, **options):
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, **options)
        started.append(process)
        if argv[0] != "unshare":
            wait_for_state(process.pid, "S")
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def copy_of(tool: str, path) -> str:
    shutil.copy2(shutil.which(tool), path)
    return str(path)


def test_argv_drops_empty_items_and_keeps_non_ascii(spawn):
    process = spawn(["/bin/sh", "-c", "read line", "", "héllo wörld", "", "日本", b"\xffbad", ""])
    facts = process_facts(process.pid)
    assert facts.argv == "/bin/sh -c read line héllo wörld 日本 \ufffdbad"
    assert facts.comm == "sh"


def test_own_session_and_process_group(spawn):
    process = spawn(["/bin/sh", "-c", "read line"], start_new_session=True)
    facts = process_facts(process.pid)
    assert facts.pid == facts.tgid == facts.pgid == facts.sessionid == process.pid
    assert (facts.pgid, facts.sessionid) == (os.getpgid(process.pid), os.getsid(process.pid))
    assert facts.ppid == os.getpid()
    assert facts.uid == os.getuid()
    assert facts.pns == os.stat("/proc/self/ns/pid").st_ino  # a namespace's id is its inode number


@pytest.mark.skipif(os.getuid() != 0, reason="changing uid needs root")
def test_uid_is_the_real_uid_of_the_process(spawn):
    process = spawn(["/bin/sh", "-c", "read line"], user=65534)
    assert process_facts(process.pid).uid == 65534


def test_comm_with_spaces_and_parentheses_does_not_shift_stat_fields(spawn, tmp_path):
    odd = copy_of("sleep", tmp_path / "a) b (c) d")
    process = spawn([odd, "60"], start_new_session=True)
    facts = process_facts(process.pid)
    assert facts.comm == "a) b (c) d"
    assert (facts.pgid, facts.sessionid, facts.ppid) == (process.pid, process.pid, os.getpid())


def test_a_process_running_a_deleted_executable(spawn, tmp_path):
    exe = copy_of("sleep", tmp_path / "gone")
    process = spawn([exe, "60"])
    os.unlink(exe)
    assert os.readlink(f"/proc/{process.pid}/exe").endswith(" (deleted)")
    facts = process_facts(process.pid)
    assert (facts.comm, facts.argv, facts.ppid, facts.tgid) == ("gone", f"{exe} 60", os.getpid(), process.pid)


def test_a_process_that_exits_while_being_read_gives_unreadable_fields(spawn):
    process = spawn(["/bin/sh", "-c", "read line"])
    directory = os.open(f"/proc/{process.pid}", os.O_RDONLY | os.O_DIRECTORY)
    try:
        process.kill()
        process.wait()  # exited and reaped after the reader opened its /proc directory
        facts = read_process(directory, process.pid)
    finally:
        os.close(directory)
    assert facts.as_fields() == {"pid": process.pid, "ppid": UNREADABLE, "pgid": UNREADABLE,
                                 "tgid": UNREADABLE, "argv": "-3", "comm": "-3",
                                 "sessionid": UNREADABLE, "uid": UNREADABLE, "pns": UNREADABLE,
                                 "docker_id": ""}
    assert process_facts(process.pid) == facts


def test_a_zombie_keeps_what_the_kernel_still_shows(spawn):
    process = spawn(["/bin/sh", "-c", "read line"])
    process.send_signal(signal.SIGKILL)
    wait_for_state(process.pid, "Z")  # exited, not reaped
    facts = process_facts(process.pid)
    assert (facts.comm, facts.ppid, facts.argv) == ("sh", os.getpid(), "")


def test_processes_exiting_under_a_reader_never_raise():
    """Many short processes read while they start and exit: every field is a value or -3."""
    own_comm = process_facts(os.getpid()).comm  # what a child shows until its exec completes
    seen_gone = 0
    for _ in range(30):
        process = subprocess.Popen(["/bin/true"])
        results = []
        reader = threading.Thread(
            target=lambda: results.extend(process_facts(process.pid) for _ in range(50)))
        reader.start()
        process.wait()
        reader.join()
        results.append(process_facts(process.pid))
        for facts in results:
            assert facts.pid == process.pid
            # PPid is 0 in status while the kernel releases a task that is no longer alive
            assert facts.ppid in (os.getpid(), 0, UNREADABLE)
            assert facts.comm in ("true", own_comm, "-3")
        seen_gone += results[-1].comm == "-3"
    assert seen_gone == 30


def test_host_view_of_a_process_in_a_new_pid_namespace(spawn):
    if os.getuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to create a pid namespace")
    outer = spawn(["unshare", "--pid", "--fork", "/bin/sh", "-c", "read line"])
    inner = None
    for _ in range(500):
        children = open(f"/proc/{outer.pid}/task/{outer.pid}/children").read().split()
        if children:
            inner = int(children[0])
            break
        if outer.poll() is not None:
            pytest.skip(f"unshare --pid could not create a pid namespace here (exit {outer.returncode})")
        time.sleep(0.01)
    assert inner is not None, "unshare's child did not appear"
    wait_for_state(inner, "S")
    facts = process_facts(inner)
    nspid = next(line.split()[1:] for line in open(f"/proc/{inner}/status") if line.startswith("NSpid:"))
    assert nspid == [str(inner), "1"]  # pid 1 inside; the facts use the host's numbers
    assert (facts.pid, facts.tgid, facts.ppid) == (inner, inner, outer.pid)
    assert facts.pns == os.stat(f"/proc/{inner}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino
    assert facts.comm == "sh" and facts.argv == "/bin/sh -c read line"


@pytest.mark.parametrize("cgroup, expected", [
    ("12:memory:/docker/3f1e9a7b2c4d\n11:cpu:/docker/3f1e9a7b2c4d\n", "3f1e9a7b2c4d"),
    ("5:cpuset:/kubepods/besteffort/0123abcd\n", "0123abcd"),
    ("5:cpuset:/kubepods/pod1234-ab/0123abcd\n", "0123abcd"),
    ("5:cpuset:/kubepods/besteffort/pod1234-ab/0123abcd\n", ""),  # two levels: Elkeid's rule misses it
    ("0::/system.slice/docker-3f1e9a7b2c4d.scope\n", ""),  # systemd cgroup driver: Elkeid finds none
    ("0::/user.slice/session-1.scope\n", ""),
    ("12:memory:/docker/3f1e9a7b2c4d/sub\n", ""),  # the id must end the line
])
def test_docker_id_follows_elkeids_patterns(cgroup, expected):
    assert docker_id_from_cgroup(cgroup) == expected


def test_docker_id_of_a_real_process():
    with open("/proc/self/cgroup") as cgroup:
        expected = docker_id_from_cgroup(cgroup.read())
    assert process_facts(os.getpid()).docker_id == expected
