"""Permission mode: an exec of a file an engine flags is denied; over the budget it is allowed."""

from __future__ import annotations

import os
import subprocess
import time

from elkscan_core import FINDING, Engine, hookimpl
from elkscan_core.testing import eicar


def guarded(downloads, www, **permission) -> dict:
    return {"file_events": {"enabled": False},
            "on_access": {"web_roots": [str(www)], "downloads": [str(downloads)]},
            "permission": {"enabled": True, **permission}}


def executable(path, content: bytes) -> str:
    path.write_bytes(content)
    path.chmod(0o755)
    return str(path)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, timeout=30)


def exec_denied(path: str) -> bool:
    """True when execve() of ``path`` fails with EPERM (what a denied FAN_OPEN_EXEC_PERM gives)."""
    try:
        run(path)
    except PermissionError:
        return True
    return False


def test_exec_of_a_flagged_download_is_denied_and_a_clean_one_runs(tmp_path, tools):
    downloads, www = tmp_path / "downloads", tmp_path / "www"
    downloads.mkdir()
    www.mkdir()
    bad = executable(downloads / "update", eicar())
    good = executable(downloads / "hello", b"#!/bin/sh\necho hello\n")
    with tools.monitoring(guarded(downloads, www, budget="5s"), **tools.engine_setup()) as monitor:
        denied = exec_denied(bad)  # execve itself fails: the kernel asked the source first
        allowed = run(good)
        again = exec_denied(bad)  # the verdict is remembered
        record = monitor.wait_for(lambda: [r for r in monitor.kinds(FINDING)
                                           if r.facts.get("action") == "denied"])[0]
    assert denied and again
    assert allowed.stdout == b"hello\n" and allowed.returncode == 0
    assert record.target.path == bad and record.detections
    assert monitor.source.stats["denied"] == 2


def test_opens_of_a_flagged_web_script_are_denied_when_asked(tmp_path, tools):
    downloads, www = tmp_path / "downloads", tmp_path / "www"
    downloads.mkdir()
    www.mkdir()
    from elkscan_core.testing import SAMPLES

    (www / "shell.php").write_bytes(SAMPLES["webshell.php"][0])
    (www / "index.php").write_bytes(SAMPLES["webshell-lookalike.php"][0])
    with tools.monitoring(guarded(downloads, www, opens=True, budget="5s"), **tools.engine_setup()):
        shell = run("cat", str(www / "shell.php"))
        index = run("cat", str(www / "index.php"))
        notes = run("cat", str(www / "index.php"))  # served from the verdict cache
    assert shell.returncode != 0 and b"Operation not permitted" in shell.stderr
    assert index.stdout == SAMPLES["webshell-lookalike.php"][0] == notes.stdout


class SlowEngine(Engine):
    """Flags everything, slowly: longer than the permission budget."""

    id = "slow"
    call_timeout = 30.0

    def scan(self, subject):
        time.sleep(1.0)
        from elkscan_core import Detection

        return [Detection.from_signature(self.id, "Test.Slow.Flag")]


class _SlowPlugin:
    @hookimpl
    def elkscan_register_engines(self, registry) -> None:
        registry.add(SlowEngine)


def test_over_the_latency_budget_the_exec_is_allowed_and_the_hit_still_reported(tmp_path, tools):
    downloads, www = tmp_path / "downloads", tmp_path / "www"
    downloads.mkdir()
    www.mkdir()
    tool = executable(downloads / "tool", b"#!/bin/sh\necho ran\n")
    with tools.monitoring(guarded(downloads, www, budget="50ms"), engines=({"use": "slow"},),
                          extra_plugins=(_SlowPlugin(),)) as monitor:
        result = run(tool)
        record = monitor.wait_for(lambda: [r for r in monitor.kinds(FINDING)
                                           if r.facts.get("action", "").startswith("allowed")])[0]
    assert result.stdout == b"ran\n"
    assert monitor.source.stats["permission_timeouts"] == 1
    assert record.target.path == tool
    assert os.path.exists(tool)
