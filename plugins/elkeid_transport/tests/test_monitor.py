"""6051/6052/6054 through the real packaged scanner and the real fanotify source (root only):
decoys placed in a test user's home, a write to one reported as 6005, 6011 status, 6012 file events."""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root")

DECOY = "0_elkeid_hids_anti_ransom.txt"


def test_anti_ransomware_and_file_monitoring_tasks(start_agent, plugin_dir, tmp_path):
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:x:{os.getuid()}:{os.getgid()}::{home}:/bin/bash\n"
                      f"daemon:x:1:1::{tmp_path / 'home' / 'daemon'}:/usr/sbin/nologin\n")
    watched = tmp_path / "watched"
    watched.mkdir()
    plugin_dir.configure(fanotify={
        "file_events": {"profile": "none", "directories": [str(watched)], "containers": False},
        "on_access": {"enabled": False},
        "anti_ransom": {"passwd": str(passwd), "homes": [str(tmp_path / "home")], "status_first": "2s"}})  # after the 6051 below
    agent = start_agent()

    agent.send(6051)  # anti-ransomware on
    decoy = home / "elkeid_targets" / DECOY
    agent.wait_for(lambda rs: any(r.data_type == 6011 and r.fields["status"] == "on" for r in rs))
    assert decoy.exists() and not (tmp_path / "home" / "daemon").exists()
    original = decoy.read_bytes()

    # the writer stays alive a moment, so that its executable can be opened and scanned
    writer = subprocess.Popen(["/bin/sh", "-c", f"echo encrypted >> '{decoy}'; sleep 3"])
    (event,) = [r for r in agent.wait_for(lambda rs: any(r.data_type == 6005 for r in rs)) if r.data_type == 6005]
    fields = event.fields
    assert fields["file_path"] == str(decoy) and fields["class"] == "anti_ransom"
    assert fields["types"] == "not_detected" and fields["file_mask"] == "8"
    assert os.path.realpath(fields["exe"]) == os.path.realpath("/bin/sh")
    assert fields["pid"] == str(writer.pid) and fields["argv"].startswith("/bin/sh -c echo encrypted")
    assert len(fields["exe_hash"]) == 16 and len(fields["md5_hash"]) == 32
    writer.kill()
    writer.wait()

    agent.send(6054)  # reset anti-ransomware: the decoy's content comes back
    wait_until(lambda: decoy.read_bytes() == original)

    agent.send(6052)  # file monitoring on, anti-ransomware off: decoys removed
    wait_until(lambda: not decoy.exists())
    (watched / "dropped.bin").write_bytes(b"new file content\n")
    (change,) = [r for r in agent.wait_for(lambda rs: any(r.data_type == 6012 for r in rs)) if r.data_type == 6012]
    assert change.fields["file_path"] == str(watched / "dropped.bin") and change.fields["file_mask"] == "8"
    assert len(change.fields["file_hash"]) == 64

    agent.send(6054)  # as Elkeid 2.2.0.1 (audit #24): anti-ransomware back on, though a 6052 turned it off
    wait_until(lambda: decoy.exists() and decoy.read_bytes() == original)
    assert sorted(os.listdir(decoy.parent)) == [f"0_elkeid_hids_anti_ransom.{ext}"
                                                for ext in ("csv", "doc", "pdf", "png", "txt", "xls")]
    assert not [m for m in agent.logs() if "unsupported" in m]
    assert agent.close() == 0


def wait_until(condition, timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
