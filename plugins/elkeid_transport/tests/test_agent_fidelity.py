"""Elkeid 2.2.0.1's behaviour where the server or an operator sees it (issue 11, audit
elkeid-fidelity), through the real packaged ``scanner`` started as the agent starts it."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import zipfile

import yaml

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


def test_6057_skips_what_elkeids_type_filter_skips_archives_too_but_a_6053_opens_them(
        start_agent, plugin_dir, tmp_path):
    """Audit #7: the 6057 walk scanned images, documents and archives (clamd unpacking them); Elkeid's
    type filter skips them, and only a 6053 has its archives parsed."""
    root = tmp_path / "quick"
    root.mkdir()
    (root / "eicar.com").write_bytes(EICAR)
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("eicar.com", EICAR)  # only an engine that unpacks it sees the EICAR string
    (root / "eicar.zip").write_bytes(packed.getvalue())
    (root / "eicar.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 56 + EICAR)  # the rules see these two
    (root / "eicar.pdf").write_bytes(b"%PDF-1.4\n" + EICAR)
    plugin_dir.configure(clamav=True, quick_roots=[str(root)])
    agent = start_agent()
    agent.send(6057, {"mode": "quick", "cpu_idle": "100"}, token="typed")
    assert agent.done("typed", timeout=120).fields["status"] == "succeed"
    assert [r.fields["static_file"] for r in by_type(agent.records, 6001)] == [str(root / "eicar.com")]
    agent.send(6053, {"exe": str(root / "eicar.zip")}, token="zip")
    assert agent.done("zip", timeout=60).fields["status"] == "succeed"
    (result,) = by_type(agent.records, 6003)
    assert (result.fields["types"], result.fields["class"]) == ("Txt", "Test")  # clamd, inside the archive
    assert agent.close() == 0


def test_6057_sends_one_6002_per_process_from_one_scan_of_their_executable(start_agent, plugin_dir, tmp_path):
    """Audit #9: ten processes of one malicious binary gave one 6002 (an arbitrary pid); Elkeid sends one
    per process, each with its own pid and argv."""
    exe = tmp_path / "bin" / "miner-sleep"
    exe.parent.mkdir()
    exe.write_bytes(open(shutil.which("sleep"), "rb").read() + SAMPLES["miner.json"][0])
    exe.chmod(0o755)
    plugin_dir.configure(quick_roots=[str(tmp_path / "empty")])
    sleepers = [subprocess.Popen([str(exe), str(60 + n)]) for n in range(3)]
    try:
        agent = start_agent()
        agent.send(6057, {"mode": "quick", "cpu_idle": "100"}, token="procs")
        assert agent.done("procs", timeout=60).fields["status"] == "succeed"
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
    mine = {r.fields["pid"]: r.fields for r in by_type(agent.records, 6002) if r.fields["exe"] == str(exe)}
    assert sorted(mine) == sorted(str(s.pid) for s in sleepers)
    for sleeper, n in zip(sleepers, range(3)):
        fields = mine[str(sleeper.pid)]
        assert (fields["argv"], fields["comm"], fields["token"]) == (f"{exe} {60 + n}", "miner-sleep", "procs")
        assert (fields["types"], fields["class"]) == ("Linux", "Cryptominer")
    assert len({f["md5_hash"] for f in mine.values()}) == 1
    assert agent.close() == 0


def marker_bundle(path, version: str, marker: str) -> str:
    """A rule database whose only ClamAV signature flags ``marker`` and whose YARA file flags nothing;
    its SHA-256."""
    from elkscan_core import bundle
    bundle._write_zip(path, {"version": f"{version}\n".encode(),
                             "main.ndb": f"Txt.Test.Marker-1:0:*:{marker.encode().hex()}\n".encode(),
                             f"online_{version}.yar": b"rule Linux_Test_Nothing { condition: false }\n"},
                      bundle.DEFAULT_PASSWORD)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_databases_rules_are_the_ones_judging_and_elkscans_own_rules_are_opt_in(
        start_agent, plugin_dir, tmp_path):
    """Audit #4: clamd ran with its defaults and elkscan's own YARA rules always ran beside the database's;
    in the Elkeid profile the database's signatures judge, as libclamav's ELF-and-archives scan does."""
    marker = "ELKSCAN-PROFILE-" + secrets.token_hex(8)
    sha = marker_bundle(plugin_dir.workdir / "tmp" / "archive_db_default_profile_v1.zip", "profile_v1", marker)
    files = tmp_path / "files"
    files.mkdir()
    (files / "marked.txt").write_text(f"text with {marker} inside\n")
    (files / "revshell.sh").write_bytes(SAMPLES["revshell.sh"][0])  # elkscan's own rules flag it
    plugin_dir.configure(clamav=True)
    detail = json.dumps({"version": "profile_v1", "sha256": sha})

    def verdicts(token: str) -> dict:
        agent = start_agent(detail=detail)
        agent.send(6053, {"exe": str(files)}, token=token)
        assert agent.done(token, timeout=120).fields["status"] == "succeed"
        assert agent.close() == 0
        return {os.path.basename(r.fields["static_file"]): (r.fields["types"], r.fields["class"])
                for r in by_type(agent.records, 6003)}

    assert verdicts("database") == {"marked.txt": ("Txt", "Test"), "revshell.sh": ("not_detected", "")}
    log = (plugin_dir.workdir / "scanner.log").read_text()
    assert "rule database profile_v1 loaded" in log
    pipeline = yaml.safe_load(plugin_dir.pipeline.read_text())
    pipeline["engines"][1]["with"]["rules"] = ["builtin"]  # opting in
    plugin_dir.pipeline.write_text(yaml.safe_dump(pipeline))
    assert verdicts("opted-in")["revshell.sh"] == ("Linux", "ReverseShell")
