"""``elkscan rules update|status|rollback`` end to end: local git repositories made with the real git, a
local HTTP server thread, the real yara-python, the real package database as the benign baseline."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import pytest

from elkscan_core.bundle import open_bundle
from elkscan_core.testing import run
from elkscan_rules import baseline
from elkscan_rules.config import Baseline

_spec = importlib.util.spec_from_file_location("rules_helpers", Path(__file__).with_name("rules_helpers.py"))
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)


def write_config(tmp_path, sources: list[dict], baseline_yaml: str | None = None) -> str:
    """A rules config; the baseline is a directory of benign files unless given (fast)."""
    benign = tmp_path / "benign"
    if not benign.exists():
        benign.mkdir()
        # a profiling sample big enough to tell an expensive rule: 2 MiB of varied bytes
        (benign / "blob.bin").write_bytes(bytes(range(256)) * 8192)
        (benign / "notes.txt").write_text("an ordinary text file\n" * 100)
    lines = [f"state_dir: {tmp_path / 'state'}", "sources:"]
    for source in sources:
        lines.append("  - " + json.dumps(source))
    lines.append(baseline_yaml or f"vetting:\n  baseline: {{packages: false, paths: [{benign}]}}")
    path = tmp_path / "rules.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def status(config: str) -> list[dict]:
    result = h.elkscan("rules", "status", "-c", config, "-f", "jsonl")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def aside(records: list[dict]) -> dict[str, dict]:
    return {f"{r['file']}/{r['rule']}": r for r in records if r["type"] == "set_aside"}


def bundle_yara(tmp_path, records) -> str:
    current = next(r for r in records if r["type"] == "bundle" and r["role"] == "current")
    extracted = open_bundle(current["bundle"], password="clamav_default_passwd", dest=tmp_path / "check")
    text = "".join(Path(p).read_text() for p in extracted.rules["yara"])
    os.system(f"rm -rf {tmp_path / 'check'}")
    return text


def test_git_source_vetting_sets_aside_what_does_not_compile_or_costs_too_much(tmp_path):
    repo = tmp_path / "repo"
    h.make_repo(repo, {"rules/good.yar": h.GOOD + "\n" + h.EXPENSIVE,
                       "rules/broken.yar": h.BROKEN, "README.md": "not a rule",
                       "rules/warned.yar": "rule Short_Atom { strings: $a = { 00 00 } condition: $a }\n"})
    config = write_config(tmp_path, [{"name": "mine", "git": str(repo), "path": "rules"}])
    result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 0, result.stderr
    records = status(config)
    found = aside(records)
    broken = found["broken.yar/"]
    assert broken["reason"] == "does not compile"
    assert broken["detail"].startswith("broken.yar, line ") and "undefined string \"$b\"" in broken["detail"]
    slow = found["good.yar/Expensive_Loop"]
    assert slow["reason"] == "over the cost budget" and "ms CPU per MiB" in slow["detail"]
    assert "Good_Marker" not in found  # the rest of its file stays
    text = bundle_yara(tmp_path, records)
    assert "rule Good_Marker" in text and "Expensive_Loop" not in text and "Broken_Rule" not in text
    source = next(r for r in records if r["type"] == "source")
    assert source["version"] == h.git("rev-parse", "HEAD", cwd=repo).strip() and source["state"] == "ok"
    assert any('mine/warned.yar, line 1: string "$a" may slow down scanning' in w for w in records[0]["warnings"])
    table = h.elkscan("rules", "status", "-c", config)
    assert "over the cost budget" in table.stdout and "Expensive_Loop" in table.stdout
    # what scans use: the current directory, through the real yara engine
    sample = tmp_path / "scanme" / "x.txt"
    sample.parent.mkdir()
    sample.write_text("prefix elkscan-rules-test-marker suffix")
    scanned = run({"plugins": ["yara_backend"], "state_dir": str(tmp_path / "scanstate"),
                   "sources": [{"use": "dirscan", "with": {"roots": {str(sample.parent): -1}, "exclude": [],
                                                           "type_filter": False}}],
                   "engines": [{"use": "yara", "with": {"rules": [str(tmp_path / "state" / "current")],
                                                        "cache": False}}]})
    assert [d.signature for r in scanned.records for d in r.detections] == ["Good_Marker"]


def test_a_rule_matching_a_package_verified_file_is_a_false_positive(tmp_path):
    """The rule is made from bytes of an ELF file the package-verified sample holds (the sample is the
    same on every run); a rule that needs it goes with it."""
    bounds = Baseline(max_files=30, max_bytes=16 * 2**20)
    chosen = next(f for f in baseline.sample(bounds) if f.package and f.read()[:4] == b"\x7fELF")
    data = chosen.read()
    middle = len(data) // 2
    window = data[middle:middle + 24].hex(" ")
    rules = (f"rule Fp_Vendor_Bytes {{ strings: $a = {{ {window} }} condition: $a }}\n"
             "rule Needs_Fp { condition: Fp_Vendor_Bytes and filesize > 1099511627776 }\n" + h.GOOD)
    repo = tmp_path / "repo"
    h.make_repo(repo, {"fp.yar": rules})
    config = write_config(tmp_path, [{"name": "fp", "git": str(repo)}],
                          "vetting:\n  baseline: {packages: true, max_files: 30, max_bytes: 16MiB}")
    result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 0, result.stderr
    found = aside(status(config))
    fp = found["fp.yar/Fp_Vendor_Bytes"]
    assert fp["reason"] == "false positive"
    assert chosen.path in fp["detail"] and f"package {chosen.package.split()[0]}" in fp["detail"]
    assert found["fp.yar/Needs_Fp"]["reason"] == "needs a rule set aside"
    assert "fp.yar/Good_Marker" not in found


def test_rollback_restores_the_previous_bundle(tmp_path):
    repo = tmp_path / "repo"
    h.make_repo(repo, {"a.yar": h.GOOD})
    config = write_config(tmp_path, [{"name": "a", "git": str(repo)}])
    assert h.elkscan("rules", "update", "-c", config).returncode == 0
    first = status(config)[0]
    again = h.elkscan("rules", "update", "-c", config)  # nothing changed: the same bundle, still no previous
    assert again.returncode == 0 and "(unchanged)" in again.stdout
    h.make_repo(repo, {"b.yar": 'rule Second_Rule { strings: $a = "second-marker" condition: $a }\n'})
    assert h.elkscan("rules", "update", "-c", config).returncode == 0
    second = status(config)
    assert second[0]["version"] != first["version"] and second[1]["version"] == first["version"]
    current = tmp_path / "state" / "current"
    assert any("Second_Rule" in p.read_text() for p in current.glob("*.yar"))
    result = h.elkscan("rules", "rollback", "-c", config)
    assert result.returncode == 0, result.stderr
    back = status(config)
    assert back[0]["version"] == first["version"] and back[0]["sha256"] == first["sha256"]
    assert os.readlink(current) == f"active/{first['version']}"
    assert not any("Second_Rule" in p.read_text() for p in current.glob("*.yar"))
    assert h.elkscan("rules", "rollback", "-c", config).returncode == 0  # and forth again
    assert status(config)[0]["version"] == second[0]["version"]


def test_rollback_with_nothing_before_is_an_error(tmp_path):
    repo = tmp_path / "repo"
    h.make_repo(repo, {"a.yar": h.GOOD})
    config = write_config(tmp_path, [{"name": "a", "git": str(repo)}])
    assert h.elkscan("rules", "update", "-c", config).returncode == 0
    result = h.elkscan("rules", "rollback", "-c", config)
    assert result.returncode == 2 and "no previous rules bundle" in result.stderr


def test_git_hooks_never_run_and_submodules_are_not_fetched(tmp_path):
    """Hooks wherever git would look for them (a template directory, core.hooksPath in the user's
    configuration, the source repository's own) and a submodule: none runs, none is fetched."""
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for name in ("reference-transaction", "post-checkout", "post-merge", "pre-auto-gc", "post-rewrite",
                 "fsmonitor-watchman", "post-index-change"):
        hook = hooks / name
        hook.write_text(f"#!/bin/sh\ntouch {marker_dir}/{name}\n")
        hook.chmod(0o755)
    other = tmp_path / "other"
    h.make_repo(other, {"sub.yar": 'rule From_Submodule { condition: true }\n'})
    repo = tmp_path / "repo"
    h.make_repo(repo, {"a.yar": h.GOOD})
    h.git("-c", "protocol.file.allow=always", "submodule", "add", "-q", str(other), "sub", cwd=repo)
    h.git("commit", "-q", "-m", "submodule", cwd=repo)
    for hook in hooks.iterdir():  # the source's own hooks
        (repo / ".git" / "hooks" / hook.name).write_bytes(hook.read_bytes())
        (repo / ".git" / "hooks" / hook.name).chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(f"[core]\n\thooksPath = {hooks}\n[init]\n\ttemplateDir = {tmp_path}/tpl\n")
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "hooks").symlink_to(hooks)
    config = write_config(tmp_path, [{"name": "hooked", "git": f"file://{repo}"}])
    env = {**os.environ, "HOME": str(home), "GIT_TEMPLATE_DIR": str(tmp_path / "tpl"),
           "XDG_CONFIG_HOME": str(home)}
    result = h.elkscan("rules", "update", "-c", config, env=env)
    assert result.returncode == 0, result.stderr
    assert list(marker_dir.iterdir()) == []
    text = bundle_yara(tmp_path, status(config))
    assert "Good_Marker" in text and "From_Submodule" not in text
    assert not (tmp_path / "state" / "sources" / "hooked" / "repo.git" / "hooks").exists()


def test_pinned_ref_is_used(tmp_path):
    repo = tmp_path / "repo"
    first = h.make_repo(repo, {"a.yar": h.GOOD})
    h.make_repo(repo, {"b.yar": 'rule Later_Rule { condition: false }\n'})
    config = write_config(tmp_path, [{"name": "pinned", "git": str(repo), "ref": first}])
    assert h.elkscan("rules", "update", "-c", config).returncode == 0, "pinned update"
    records = status(config)
    assert next(r for r in records if r["type"] == "source")["version"] == first
    assert "Later_Rule" not in bundle_yara(tmp_path, records)


def _zip(path: Path, entries: dict[str, bytes], links: dict[str, str] = {}) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, target)


def test_https_sources_archive_and_single_file_and_a_failed_source_keeps_its_last_copy(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    _zip(served / "rules.zip", {"pack/core/one.yar": h.GOOD.encode(), "pack/README": b"x"})
    (served / "single.yar").write_text('rule Single_File { strings: $a = "single-file-marker" condition: $a }\n')
    with h.http_server(served) as base:
        config = write_config(tmp_path, [{"name": "zip", "url": f"{base}/rules.zip", "path": "pack"},
                                         {"name": "one", "url": f"{base}/single.yar"}])
        result = h.elkscan("rules", "update", "-c", config)
        assert result.returncode == 0, result.stderr
        records = status(config)
        text = bundle_yara(tmp_path, records)
        assert "Good_Marker" in text and "Single_File" in text
        (served / "single.yar").unlink()
        result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 1, result.stderr  # a source failed: its last good copy is used
    assert "404" in result.stderr
    sources = {r["name"]: r for r in status(config) if r["type"] == "source"}
    assert sources["one"]["state"].startswith("stale (last good copy)") and sources["zip"]["state"] == "ok"
    assert "Single_File" in bundle_yara(tmp_path, status(config))


def _bomb_zip(path: Path) -> None:
    _zip(path, {"bomb.yar": b"\0" * (64 * 2**20)})


def _tar(path: Path, mode: str, add) -> None:
    import io
    import tarfile

    with tarfile.open(path, mode) as archive:
        add(archive, tarfile, io)


def _tar_link(archive, tarfile, io) -> None:
    info = tarfile.TarInfo("rules/link.yar")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
    archive.addfile(info)


def _tar_traversal(archive, tarfile, io) -> None:
    data = h.GOOD.encode()
    info = tarfile.TarInfo("../../escaped.yar")
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _tar_bomb(archive, tarfile, io) -> None:
    info = tarfile.TarInfo("huge.yar")
    info.size = 64 * 2**20
    archive.addfile(info, io.BytesIO(b"\0" * info.size))


@pytest.mark.parametrize("name,make,message", [
    ("traversal.zip", lambda p: _zip(p, {"../../escaped.yar": h.GOOD.encode()}), "unsafe entry"),
    ("absolute.zip", lambda p: _zip(p, {"/tmp/escaped.yar": h.GOOD.encode()}), "unsafe entry"),
    ("link.zip", lambda p: _zip(p, {"a.yar": h.GOOD.encode()}, {"b.yar": "/etc/shadow"}), "link or special"),
    ("bomb.zip", _bomb_zip, "zip bomb"),
    ("link.tar", lambda p: _tar(p, "w", _tar_link), "link or special"),
    ("traversal.tar.gz", lambda p: _tar(p, "w:gz", _tar_traversal), "unsafe entry"),
    ("bomb.tar.gz", lambda p: _tar(p, "w:gz", _tar_bomb), "bomb"),
])
def test_malicious_archives_are_refused(tmp_path, name, make, message):
    served = tmp_path / "www"
    served.mkdir()
    make(served / name)
    with h.http_server(served) as base:
        config = write_config(tmp_path, [{"name": "bad", "url": f"{base}/{name}"}])
        result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not list(tmp_path.rglob("escaped.yar")) and not (tmp_path / "state" / "current").exists()
    assert not list((tmp_path / "state" / "tmp").iterdir())  # nothing left behind


def test_plain_http_to_another_host_and_an_untrusted_config_are_refused(tmp_path):
    config = write_config(tmp_path, [{"name": "x", "url": "http://rules.example.org/r.yar"}])
    result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 2 and "rules.yaml:3" in result.stderr and "https" in result.stderr
    config = write_config(tmp_path, [{"name": "x", "dir": str(tmp_path)}])
    os.chmod(config, 0o666)
    result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 2 and "world-writable" in result.stderr


def test_a_local_directory_works_offline_and_must_be_ours(tmp_path):
    rules = tmp_path / "local"
    rules.mkdir()
    (rules / "a.yar").write_text(h.GOOD)
    config = write_config(tmp_path, [{"name": "local", "dir": str(rules)}])
    assert h.elkscan("rules", "update", "-c", config).returncode == 0
    os.chmod(rules, 0o777)
    result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 1 and "world-writable" in result.stderr  # the last good copy stays in use


def test_freshclam_source_runs_the_real_freshclam_against_a_local_mirror(tmp_path):
    """No network: a private mirror on this host that has no database. freshclam's own error is said,
    and nothing changes; without freshclam installed the error says so."""
    empty = tmp_path / "mirror"
    empty.mkdir()
    with h.http_server(empty) as base:
        config = write_config(tmp_path, [{"name": "clamav", "freshclam": base}])
        result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 2
    assert "freshclam failed" in result.stderr and "Update failed" in result.stderr, result.stderr
    result = h.elkscan("rules", "update", "-c", config, env={**os.environ, "PATH": str(tmp_path / "nothing")})
    assert result.returncode == 2 and "freshclam and sigtool are not installed" in result.stderr


def test_a_local_repository_another_user_owns_is_refused(tmp_path):
    """Its configuration would steer the git that reads it (as root): git's own ownership check stands."""
    repo = tmp_path / "repo"
    h.make_repo(repo, {"a.yar": h.GOOD})
    for directory, dirs, files in os.walk(repo):
        for name in [directory, *(os.path.join(directory, f) for f in dirs + files)]:
            os.lchown(name, 65534, 65534)
    config = write_config(tmp_path, [{"name": "theirs", "git": str(repo)}])
    result = h.elkscan("rules", "update", "-c", config)
    assert result.returncode == 2 and "dubious ownership" in result.stderr, result.stderr


def test_rules_are_vetted_as_the_bytes_the_bundle_holds(tmp_path):
    """A string literal in Latin-1 (not UTF-8) is vetted as written: its false positive is found."""
    repo = tmp_path / "repo"
    repo.mkdir()
    h.git("init", "-q", "-b", "main", cwd=repo)
    (repo / "latin.yar").write_bytes(b'rule Latin_Marker { strings: $a = "caf\xe9-benign-marker" condition: $a }\n'
                                     + h.GOOD.encode())
    h.git("add", "-A", cwd=repo)
    h.git("commit", "-q", "-m", "latin", cwd=repo)
    config = write_config(tmp_path, [{"name": "latin", "git": str(repo)}])
    (tmp_path / "benign" / "menu.txt").write_bytes(b"today: caf\xe9-benign-marker\n")
    assert h.elkscan("rules", "update", "-c", config).returncode == 0
    found = aside(status(config))
    assert found["latin.yar/Latin_Marker"]["reason"] == "false positive"
    assert "menu.txt (baseline.paths)" in found["latin.yar/Latin_Marker"]["detail"]
