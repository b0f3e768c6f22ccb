"""procscan against processes the test starts."""

import os
import shutil
import subprocess
import time

import pytest

from elkscan_core import make_plugin_manager, parse_pipeline
from elkscan_core.default_plugins.procscan import Procscan, ProcscanConfig
from elkscan_core.pipeline import structure
from elkscan_core.runner import Session


def targets(**options):
    session = Session(parse_pipeline({"version": 1}), make_plugin_manager([]))
    source = Procscan(structure(options, ProcscanConfig, "with"), session)
    found = list(source.scan_processes())
    for t in found:
        os.close(t.fd)
    return found


@pytest.fixture
def sleeper(tmp_path):
    """Two processes running one private copy of sleep, and one running a copy deleted after start."""
    exe = tmp_path / "elkscan-sleeper"
    shutil.copy("/bin/sleep", exe)
    gone = tmp_path / "elkscan-deleted"
    shutil.copy("/bin/sleep", gone)
    procs = [subprocess.Popen([str(exe), "30"]), subprocess.Popen([str(exe), "30"]),
             subprocess.Popen([str(gone), "30"])]
    time.sleep(0.1)
    os.unlink(gone)
    yield exe, gone, procs
    for p in procs:
        p.kill()
        p.wait()


def test_each_distinct_executable_once_with_a_pid_and_every_process_running_it(sleeper):
    exe, gone, procs = sleeper
    found = targets()
    mine = [t for t in found if t.path == str(exe)]
    assert len(mine) == 1 and mine[0].pid in (procs[0].pid, procs[1].pid)
    assert mine[0].origin == "procscan" and mine[0].size == exe.stat().st_size
    assert sorted(mine[0].extra["pids"]) == sorted([procs[0].pid, procs[1].pid])
    assert mine[0].extra["pids"][0] == mine[0].pid


def test_the_executable_is_opened_through_a_process_that_still_runs_it(sleeper):
    exe, _, procs = sleeper
    listed = Procscan(structure({}, ProcscanConfig, "with"), Session(parse_pipeline({"version": 1}),
                                                                      make_plugin_manager([])))
    key_and_path = listed._executable(procs[0].pid)
    procs[0].kill()
    procs[0].wait()
    target = listed._open(key_and_path[0], [(procs[0].pid, str(exe)), (procs[1].pid, str(exe))])
    try:
        assert target.pid == procs[1].pid and target.extra["pids"] == (procs[0].pid, procs[1].pid)
    finally:
        os.close(target.fd)


def test_deleted_executables_are_scanned_through_proc(sleeper):
    _, gone, procs = sleeper
    deleted = [t for t in targets() if t.pid == procs[2].pid]
    assert deleted and deleted[0].path == f"{gone} (deleted)"


def test_filter_prefixes_apply_to_the_executable_path(sleeper):
    exe, gone, _ = sleeper
    paths = {t.path for t in targets(exclude=[str(exe.parent)])}
    assert str(exe) not in paths and f"{gone} (deleted)" not in paths


def test_own_process_and_kernel_threads_are_skipped():
    found = targets()
    assert os.getpid() not in {t.pid for t in found}
    assert all(t.path for t in found)
