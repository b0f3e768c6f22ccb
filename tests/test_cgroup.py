"""A cgroup of its own (elkscan_core/cgroup.py), on whatever this host has: cgroup v1's cpu and memory
hierarchies (hybrid hosts), cgroup v2 where it offers both controllers, else the logged fallback, which
every host also shows in a mount namespace without the cgroup file systems.

Sessions run in child processes (tests/cgroup_child.py): pytest itself is never moved. On cgroup v1 the
cgroups the tests make sit below the test's own, and "the top of the hierarchy" is the root of a cgroup
namespace made there: nothing leaves the cgroups the machine runs the tests in."""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elkscan_core.cgroup import _directory, parse_cgroup, parse_mountinfo
from elkscan_core.testing import eicar

CHILD = Path(__file__).with_name("cgroup_child.py")
_spec = importlib.util.spec_from_file_location("cgroup_helpers", CHILD.with_name("cgroup_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
HOST, KEYS, BELOW, homes, tops = helpers.HOST, helpers.KEYS, helpers.BELOW, helpers.homes, helpers.tops
limit_files, service, enter, enter_below_top, remove = (helpers.limit_files, helpers.service, helpers.enter,
                                                        helpers.enter_below_top, helpers.remove)

ELKEID = {"cpu": "39%", "memory": "256MiB"}  # Elkeid 2.2's budget
CLAMD = next((p for p in ("/usr/sbin/clamd", "/usr/bin/clamd") if os.path.exists(p)), None)
NOBODY = pwd.getpwnam("nobody").pw_uid


def run_child(config: dict, setup: str = "", prefix: tuple[str, ...] = ()) -> dict:
    """cgroup_child.py with ``config``, after the shell lines ``setup``, under the command ``prefix``."""
    command = [*prefix, "sh", "-c", f'{setup}\nexec "$@"', "sh", sys.executable, str(CHILD), json.dumps(config)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def logged(seen: dict, start: str) -> str:
    """The one log line of the child that starts so."""
    [found] = [text for text in seen["logs"] if text.startswith(start)]
    return found


def assert_fallback(seen: dict) -> str:
    """No cgroup to have: one warning says why and what holds the limits instead; the scan goes on."""
    warning = logged(seen, "WARNING: not confined in a cgroup: ")
    assert warning.endswith("; the CPU share is held by the duty cycle alone and memory by the soft ceiling")
    assert seen["files"] == 4 and seen["after"] == seen["before"]
    return warning


# -- what the kernel says (pure) ------------------------------------------------------------------------

HYBRID = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
36 31 0:31 / /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpuset
37 31 0:32 /docker/f00 /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
90 25 0:50 / /home/u/my\040cgroup rw,nosuid,nodev - fuse.cgroup a\040b rw,user_id=1000
"""


def test_mountinfo_gives_the_cgroup_mounts_with_their_controllers_and_roots():
    assert parse_mountinfo(HYBRID) == [
        ("cgroup2", {"rw", "nsdelegate"}, "/", "/sys/fs/cgroup/unified"),
        ("cgroup", {"rw", "cpu", "cpuacct"}, "/", "/sys/fs/cgroup/cpu,cpuacct"),
        ("cgroup", {"rw", "cpuset"}, "/", "/sys/fs/cgroup/cpuset"),
        ("cgroup", {"rw", "memory"}, "/docker/f00", "/sys/fs/cgroup/memory"),
    ]  # a user's FUSE file system named like one is not one


def test_proc_cgroup_gives_each_controllers_path():
    member = parse_cgroup("12:cpu,cpuacct:/system.slice/a.service\n4:memory:/docker/f00/x\n"
                          "1:name=systemd:/\n0::/init.scope\n")
    assert member == {"cpu": "/system.slice/a.service", "cpuacct": "/system.slice/a.service",
                      "memory": "/docker/f00/x", "name=systemd": "/", "": "/init.scope"}


def test_a_cgroup_path_is_found_under_the_mount_that_shows_it():
    assert _directory("/sys/fs/cgroup/cpu", "/", "/a/b") == "/sys/fs/cgroup/cpu/a/b"
    assert _directory("/sys/fs/cgroup/memory", "/docker/f00", "/docker/f00/x") == "/sys/fs/cgroup/memory/x"
    assert _directory("/sys/fs/cgroup/memory", "/docker/f00", "/docker/f001") is None  # another cgroup
    assert _directory("/sys/fs/cgroup/memory", "/docker/f00", "/other") is None
    assert _directory("/sys/fs/cgroup", "/", "/../escaped") is None  # outside this cgroup namespace


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=" -:,/\\\n0123457cgroup", max_size=400)))
def test_fuzzed_kernel_texts_only_ever_raise_value_error(text):
    """Mount points are partly users' (FUSE): whatever the text, a parse error, never another exception."""
    for parse in (parse_mountinfo, parse_cgroup):
        try:
            parse(text)
        except ValueError:
            pass


# -- on this host --------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "tree").mkdir()
    for i in range(4):
        (tmp_path / "tree" / f"f{i}.txt").write_bytes(b"content %d" % i)
    return tmp_path / "tree"


@pytest.fixture
def clamav_db(tmp_path):
    assert CLAMD, "clamd is not installed (Debian package clamav-daemon; setup.sh installs it)"
    db = tmp_path / "db"
    db.mkdir()
    (db / "test.ndb").write_text(f"Txt.Test.EicarBody-1:0:0:{eicar().hex()}\n")
    return str(db)


def test_a_session_confines_itself_and_clamd_and_applies_a_tasks_budget_until_it_ends(tree, clamav_db):
    """Elkeid 2.2's budget at start (39 % of a CPU, 256 MiB), a 6057's during the task (20 %, 512 MiB), the
    default again after it. Every thread (one started before the session too), a process a component starts
    and the managed clamd are in the cgroup; at the end the process is back and the cgroup gone."""
    seen = run_child({"tree": str(tree), "clamav_db": clamav_db, "budget": True,
                      "limits": {**ELKEID, "cgroup": BELOW}})
    if not HOST:
        assert_fallback(seen)
        return
    during, name = seen["during"], f"elkscan-{seen['pid']}"
    assert logged(seen, "INFO: confined in cgroup ").startswith(f"INFO: confined in cgroup {HOST} {name} (")
    assert logged(seen, "INFO: confined in cgroup ").endswith(
        "): 39% of a CPU and 256 MiB for elkscan and the processes it starts")
    assert str(seen["early"]) in during["threads"] and len(during["threads"]) >= 4 and len(during["clamd"]) == 1
    for key in KEYS:
        leaf = f"/{name}" if BELOW == "top" else f"{seen['before'][key].rstrip('/')}/{name}"
        assert during["child"][key] == during["clamd"][0][key] == leaf
        assert {member[key] for member in during["threads"].values()} == {leaf}
    assert seen["steps"]["task"] == during["limits"] == limit_files("20000", str(512 * 2**20))
    assert seen["steps"]["restored"] == limit_files("39000", str(256 * 2**20))
    assert seen["after"] == seen["before"] and seen["files"] == 4
    for parent in (tops() if BELOW == "top" else homes()).values():
        assert not os.path.exists(os.path.join(parent, name))


def test_without_cgroups_the_duty_cycle_and_the_soft_ceiling_hold_and_one_line_says_so(tree):
    """Every host (as root): in a mount namespace without the cgroup file systems, as in a container
    without its cgroups, the scan goes on and says once why it is not confined."""
    seen = run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": True}}, setup="umount -R /sys/fs/cgroup",
                     prefix=("unshare", "--mount", "--propagation", "private", "--"))
    warning = assert_fallback(seen)
    assert warning.startswith("WARNING: not confined in a cgroup: no cgroup v2 hierarchy; no cgroup v1 hierarchy "
                              "has cpu; no cgroup v1 hierarchy has memory; the CPU share")


@pytest.mark.parametrize("owner", [0, NOBODY], ids=["service", "another-users-cgroup"])
def test_top_leaves_the_services_cgroup_and_its_limits_as_elkeid_does(tree, owner):
    """cgroup: top, from inside a service's cgroup (the agent's unit: 250 MB, 10 %): the cgroup of its
    own is a sibling of the service's, not under its limits; at the end it goes back. From a cgroup another
    user can write, it goes to the top instead: root never writes into that user's cgroup."""
    if not HOST:
        assert_fallback(run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": "top"}}))
        return
    with service(owner) as made:
        seen = run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": "top"}}, *enter_below_top(made))
    name, svc = f"elkscan-{seen['pid']}", os.path.basename(next(iter(made.values())))
    for key in KEYS:
        assert seen["before"][key] == f"/{svc}"
        assert {member[key] for member in seen["during"]["threads"].values()} == {f"/{name}"}
        assert seen["after"][key] == (f"/{svc}" if not owner else "/")
    assert logged(seen, "INFO: confined in cgroup ")


def test_below_never_writes_into_a_cgroup_another_user_can_write(tree):
    """cgroup: true from inside a cgroup delegated to another user: that user could freeze, kill or starve
    what root puts there. Nothing is written there; the refusal says whose it is."""
    if not HOST:
        assert_fallback(run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": True}}))
        return
    with service(NOBODY) as made:
        seen = run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": True}}, enter(made))
        for path in made.values():
            assert not [entry for entry in os.listdir(path) if os.path.isdir(os.path.join(path, entry))]
    warning = assert_fallback(seen)
    assert f"is owned by uid {NOBODY}" in warning and "another user could change what elkscan trusts" in warning


def test_a_cgroup_of_the_same_name_is_never_joined(tree, tmp_path):
    """Another instance with the same pid (another pid namespace) already has elkscan-<pid>, with a process
    and its own limit in it: this one takes elkscan-<pid>.1 and leaves the other's alone."""
    if not HOST:
        assert_fallback(run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": BELOW}}))
        return
    parents = tops() if BELOW == "top" else homes()
    cpu_file = os.path.join(parents[KEYS[0]], "elkscan-$$", "cpu.max" if HOST == "v2" else "cpu.cfs_quota_us")
    pid_file = tmp_path / "pid"
    setup = "\n".join([f"echo $$ > {pid_file}", "sleep 300 >/dev/null 2>&1 &"] + [
        f"mkdir {p}/elkscan-$$ && echo $! > {p}/elkscan-$$/cgroup.procs" for p in parents.values()] + [
        f"echo 50000{' 100000' * (HOST == 'v2')} > {cpu_file}"])
    try:
        seen = run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": BELOW}}, setup)
        theirs = f"elkscan-{seen['pid']}"
        for key in KEYS:
            assert {member[key].rsplit("/", 1)[1] for member in seen["during"]["threads"].values()} == {f"{theirs}.1"}
        for parent in parents.values():
            assert Path(parent, theirs, "cgroup.procs").read_text().split()  # the other's process is still there
            assert not os.path.exists(os.path.join(parent, f"{theirs}.1"))
        assert Path(cpu_file.replace("$$", str(seen["pid"]))).read_text().split()[0] == "50000"
    finally:
        if pid_file.exists():
            for parent in parents.values():
                remove(os.path.join(parent, f"elkscan-{pid_file.read_text().strip()}"))


def test_a_cgroup_left_by_a_killed_instance_is_removed_at_the_next_start(tree):
    """An instance killed inside its cgroup (the OOM killer, SIGKILL) cannot remove it; the next start
    removes such an empty leftover once it is old enough (here: at once), never one a process is in."""
    config = {"tree": str(tree), "limits": {**ELKEID, "cpu": "5%", "cgroup": BELOW}, "stale_after": 0}
    if not HOST:
        assert_fallback(run_child(config))
        return
    killed = ("import os, signal\nfrom elkscan_core.cgroup import Cgroup\n"
              f"Cgroup.enter(0.05, 256 * 2**20, top={BELOW == 'top'})\nprint(os.getpid(), flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    with service() as made:  # the killed instance and the next start in the service (5 % < its 10 %)
        parents = tops() if BELOW == "top" else made
        out = subprocess.run(["sh", "-c", f'{enter(made)}\nexec "$@"', "sh", sys.executable, "-c", killed],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == -9, out.stderr
        leftover = f"elkscan-{out.stdout.split()[0]}"
        busy = subprocess.Popen(["sleep", "300"])
        try:
            for parent in parents.values():
                assert os.path.isdir(os.path.join(parent, leftover))
                os.mkdir(os.path.join(parent, f"elkscan-{busy.pid}"))  # another instance's, in use
                Path(parent, f"elkscan-{busy.pid}", "cgroup.procs").write_text(str(busy.pid))
            seen = run_child(config, enter(made))
            for parent in parents.values():
                assert not os.path.exists(os.path.join(parent, leftover))
                assert (f"INFO: removed {os.path.join(parent, leftover)}, left by an elkscan that ended without "
                        "leaving it") in seen["logs"]
                assert Path(parent, f"elkscan-{busy.pid}", "cgroup.procs").read_text().split() == [str(busy.pid)]
        finally:
            busy.kill()
            busy.wait()
            for parent in parents.values():
                remove(os.path.join(parent, f"elkscan-{busy.pid}"))
    assert logged(seen, "INFO: confined in cgroup ")


def test_below_a_service_that_gives_less_it_says_why(tree):
    """cgroup: true inside the agent's unit (10 % of a CPU): cgroup v1 refuses a cgroup below it more CPU
    (39 %), cgroup v2 gives a cgroup holding processes no controllers below it. Either way one line says
    so, and what to do: cgroup: top."""
    if not HOST:
        assert_fallback(run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": True}}))
        return
    with service() as made:
        seen = run_child({"tree": str(tree), "limits": {**ELKEID, "cgroup": True}}, enter(made))
        for path in made.values():
            assert not [entry for entry in os.listdir(path) if os.path.isdir(os.path.join(path, entry))]
    warning = assert_fallback(seen)
    assert warning.startswith(f"WARNING: not confined in a cgroup: cannot write {next(iter(made.values()))}")
    assert ("more CPU than a cgroup above allows; cgroup: top leaves it" if HOST == "v1" else
            "gives a cgroup with processes no controllers below it; cgroup: top avoids it") in warning
