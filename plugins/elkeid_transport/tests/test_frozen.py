"""The packaged ``scanner`` as one executable: it runs in an empty root, gives its children the agent's
environment, and unpacks only into private directories that it cleans up."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


@pytest.fixture
def empty_root(package, tmp_path):
    """A root holding only the unpacked package (in Elkeid's plugin directory), /proc, /dev/null,
    /dev/urandom, /tmp and a target file: no libc, no loader, no Python, no shell."""
    root = tmp_path / "root"
    workdir = root / "etc" / "elkeid" / "plugin" / "scanner"
    shutil.copytree(package, workdir, copy_function=os.link)
    pipeline = workdir / "pipelines" / "elkeid.yaml"
    data = yaml.safe_load(pipeline.read_text())
    data["engines"] = [e for e in data["engines"] if e["use"] != "clamav"]  # clamd is a host program
    data["sources"] = [s for s in data["sources"] if s["use"] != "fanotify"]
    data["sources"][0]["with"].update({"lock_file": "/tmp/elkeid_scanners_plugin.pid", "cpu_sample": "100ms"})
    fresh = pipeline.with_suffix(".new")
    fresh.write_text(yaml.safe_dump(data))
    os.replace(fresh, pipeline)
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    (root / "dev").mkdir()
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev" / "urandom", 0o444 | stat.S_IFCHR, os.makedev(1, 9))
    (root / "eicar.com").write_bytes(EICAR)
    (root / "proc").mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield root, workdir
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=True)


def _private_dirs(directory: Path, prefix: str) -> list[Path]:
    found = [p for p in directory.iterdir() if p.name.startswith(prefix)]
    for path in found:
        info = path.lstat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == 0, path
    return found


def test_scanner_answers_a_6053_in_an_empty_root(empty_root, start_agent):
    root, workdir = empty_root
    assert sorted(p.name for p in root.iterdir()) == ["dev", "eicar.com", "etc", "proc", "tmp"]
    agent = start_agent(workdir=workdir, root=root)
    try:
        agent.send(6053, {"exe": "/eicar.com"}, token="empty-root")
        done = agent.done("empty-root", timeout=60)
        (result,) = [r for r in agent.records if r.data_type == 6003]
        # While it runs: staticx's loader unpacked into /tmp, PyInstaller's into the plugin directory;
        # both private to root.
        assert len(_private_dirs(root / "tmp", "staticx-")) == 1
        assert len(_private_dirs(workdir, "_MEI")) == 1
    finally:
        assert agent.close(timeout=20) == 0, agent.stderr()
    assert done.fields == {"status": "succeed", "msg": "", "token": "empty-root"}
    assert result.fields["static_file"] == "/eicar.com" and result.fields["token"] == "empty-root"
    assert result.fields["error"] == "" and "eicar" in result.fields["hit_data"].lower()
    assert result.fields["md5_hash"] == "44d88612fea8a8f36de82e1278abb02f"
    # Nothing left behind at exit.
    assert sorted(p.name for p in (root / "tmp").iterdir()) == ["elkeid_scanners_plugin.pid"]
    assert not [p for p in workdir.iterdir() if p.name.startswith("_MEI")]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat_line = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat_line and int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def test_clamd_gets_the_environment_the_agent_gave(start_agent, plugin_dir):
    """PyInstaller points LD_LIBRARY_PATH at the libraries it unpacked (built for the build machine's C
    library) and staticx adds its variables: a host clamd started with them could load the wrong ones."""
    plugin_dir.configure(clamav=True)
    agent = start_agent(detail='{"k": "v"}')
    agent.send(6053, {"exe": "/etc/hostname"}, token="env")
    assert agent.done("env", timeout=120).fields["status"] == "succeed"
    plugin_pid = int((plugin_dir.tmp / "elkeid_scanners_plugin.pid").read_text())  # the one running elkscan
    (clamd,) = [pid for pid in _children(plugin_pid) if Path(f"/proc/{pid}/comm").read_text().strip() == "clamd"]
    environ = Path(f"/proc/{clamd}/environ").read_bytes()
    assert environ.split(b"\0") == [b'DETAIL={"k": "v"}', b""]
    assert agent.close(timeout=20) == 0


def test_unpacked_directories_of_killed_instances_are_removed(start_agent, plugin_dir):
    """The agent SIGKILLs the process group of a plugin that does not exit in time: PyInstaller's
    parent then cannot remove what it unpacked into the plugin directory, so the next start does."""
    stale, young = plugin_dir.workdir / "_MEIstale1", plugin_dir.workdir / "_MEIyoung1"
    for path in (stale, young):
        (path / "lib").mkdir(parents=True, mode=0o700)
        (path / "lib" / "libpython3.so").write_bytes(b"\0" * 1024)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    agent = start_agent()
    agent.send(6053, {"exe": "/etc/hostname"}, token="sweep")
    agent.done("sweep")
    assert not stale.exists()
    assert young.exists()  # maybe a start still unpacking: spared for a minute
    (own,) = [p for p in plugin_dir.workdir.iterdir() if p.name.startswith("_MEI") and p != young]
    fd = os.open(own, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):  # the running instance holds it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert agent.close() == 0
    assert not own.exists()


def test_a_tmp_cleaner_emptying_what_staticx_unpacked_changes_nothing(start_agent, plugin_dir):
    """systemd-tmpfiles (RHEL: /tmp files unread for 10 days) may remove the program staticx unpacked
    while the plugin runs for weeks. Python read modules not imported yet from it by name: a 6050 then
    died silently on its first new import, and glibc loads libgcc_s from there at a thread's exit."""
    agent = start_agent()
    agent.send(6053, {"exe": "/etc/hostname"}, token="before")
    agent.done("before")
    plugin_pid = int((plugin_dir.tmp / "elkeid_scanners_plugin.pid").read_text())
    program = Path(os.readlink(f"/proc/{plugin_pid}/exe"))
    assert program.parent.name.startswith("staticx-")
    shutil.rmtree(program.parent)
    agent.send(6050, {"version": "20990101", "url": ["http://127.0.0.1:1/db"], "sha256": "0" * 64}, token="update")
    agent.wait_for(lambda rs: any(r.data_type == 1010 and "task 6050" in r.fields["msg"] for r in rs))
    agent.send(6053, {"exe": "/etc/hostname"}, token="after")
    assert agent.done("after").fields["status"] == "succeed"
    assert agent.close() == 0
    assert "moved or deleted" not in agent.stderr() and "libgcc_s" not in agent.stderr()
