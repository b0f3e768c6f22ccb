"""Elkeid 2.2.0.1's behaviour where the server or an operator sees it (issue 11, audit
elkeid-fidelity), through the real packaged ``scanner`` started as the agent starts it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil

from elkscan_core.testing import SAMPLES

EICAR = SAMPLES["eicar.com"][0]


def by_type(records, data_type):
    return [r for r in records if r.data_type == data_type]


def test_6057_settings_that_elkeid_would_not_take_mean_its_defaults(start_agent, plugin_dir, tmp_path):
    """Audit #8: "0" or odd values failed the task, and "Full" was refused; Elkeid uses its defaults."""
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "eicar.com").write_bytes(EICAR)
    plugin_dir.configure(quick_roots=[str(quick)], full_roots=[str(tmp_path / "nothing")])
    agent = start_agent()
    agent.send(6057, {"mode": "Full", "cpu_idle": "0", "timeout": "-1", "mem": "64", "worker": "1"}, token="odd")
    assert agent.done("odd", timeout=60).fields == {"status": "succeed", "msg": "", "token": "odd"}
    assert [r.fields["static_file"] for r in by_type(agent.records, 6001)] == [str(quick / "eicar.com")]
    assert agent.close() == 0
    log = (plugin_dir.workdir / "scanner.log").read_text()
    assert "6057 quick scan (token 'odd'), timeout 1 h" in log
    assert "1 of 2 worker(s), memory ceiling 64 MiB (cpu_idle 30%)" in log


def test_task_keys_named_token_error_or_hit_data_never_replace_the_real_ones(start_agent, tmp_path):
    """Audit #13: a 6053 key named token, error or hit_data replaced the scanner's own value."""
    sample = tmp_path / "eicar.com"
    sample.write_bytes(EICAR)
    agent = start_agent()
    agent.send(6053, {"exe": str(sample), "token": "forged", "error": "forged", "hit_data": "forged",
                      "task_id": "kept"}, token="real")
    assert agent.done("real").fields["status"] == "succeed"
    (result,) = by_type(agent.records, 6003)
    fields = result.fields
    assert (fields["token"], fields["error"], fields["task_id"]) == ("real", "", "kept")
    assert fields["hit_data"] != "forged" and json.loads(fields["hit_data"])  # the YARA rule's string matches
    assert agent.close() == 0


def test_logs_go_to_scanner_log_only_and_the_lock_comes_before_anything_else(start_agent, plugin_dir, tmp_path):
    """Audit #29/#30: every INFO line was duplicated into scanner.stderr, which nothing rotates; the lock
    was taken after the session (engines, clamd) was built."""
    agent = start_agent()
    agent.send(6053, {"exe": "/etc/hostname"}, token="up")
    agent.done("up")
    assert agent.close() == 0
    assert "task 6053 received (token 'up')" in agent.log()
    assert agent.stderr() == ""
    (plugin_dir.workdir / "scanner.log").unlink()
    state = plugin_dir.workdir / "state"
    if state.exists():
        shutil.rmtree(state)
    lock = os.open(tmp_path / "elkeid_scanners_plugin.pid", os.O_RDWR)  # the test pipeline's lock file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another scanner holds it
        second = start_agent()
        assert second.process.wait(20) == 0
    finally:
        os.close(lock)
    assert second.stderr() == "Clamav running duplicate, exit\n" and second.records == []
    assert not (plugin_dir.workdir / "scanner.log").exists() and not state.exists()  # nothing was started
