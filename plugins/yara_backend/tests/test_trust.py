"""Rules and the compiled-rule cache another user could change are never used (audit A22, C10).

The attacks are performed for real: files planted by a process running as ``nobody``, then scanned by
this (root) test process, with the shipped default rules and samples.
"""

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_core import ComponentError
from elkscan_core.testing import SAMPLES, run, write_samples
from elkscan_yara_backend import ruleset

NOBODY = 65534
DETECTED = sorted(rule for _, rule in SAMPLES.values() if rule)


def scan(path, state, **options):
    return run({"plugins": ["yara_backend"], "state_dir": str(state),
                "sources": [{"use": "dirscan", "with": {"roots": {str(path): -1}, "type_filter": False}}],
                "engines": [{"use": "yara", "with": options}]})


def detected(result):
    return sorted(rule for rules in result.detected.values() for rule in rules)


def plant(cache: Path, user: int = 0) -> Path:
    """As ``user``, save a rule set that matches nothing under the name elkscan gives its builtin rules
    (a digest anyone can compute), with its digest beside it as elkscan writes one: the attacker knows
    the scheme. Returns the planted file."""
    import yara

    digest, _ = ruleset._digest(yara, ruleset.expand(["builtin"]))
    buffer = io.BytesIO()
    yara.compile(source="rule nothing { condition: false }").save(file=buffer)
    data = buffer.getvalue()
    target = cache / f"{digest}.yarc"
    for path, content in ((target, data), (Path(f"{target}.blake2b"), hashlib.blake2b(data, digest_size=32).hexdigest().encode())):
        subprocess.run(["/bin/sh", "-c", 'mkdir -p "$1" && cat > "$2"', "sh", str(cache), str(path)],
                       input=content, check=True, timeout=30, preexec_fn=lambda: _become(user))
    return target


def _become(user: int) -> None:
    if user:
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)


@pytest.fixture
def nobody_home():
    """A home directory owned by nobody where nobody can reach it (tmp_path is private to root)."""
    parent = tempfile.mkdtemp(prefix="elkscan-nbhome-")
    os.chmod(parent, 0o755)
    home = Path(parent, "home")
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    yield home
    subprocess.run(["rm", "-rf", parent], check=True)


def test_a_compiled_cache_planted_in_another_users_home_is_not_loaded(tmp_path, nobody_home, monkeypatch,
                                                                      caplog):
    """Audit C10: root runs with HOME of nobody (sudo -E); nobody planted a never-matching rule set
    under the digest of the builtin rules. Root's scan must still detect every sample."""
    planted = plant(nobody_home / ".cache" / "elkscan" / "yara-rules", NOBODY)
    assert planted.stat().st_uid == NOBODY
    write_samples(tmp_path / "samples")
    for name in ("XDG_CACHE_HOME", "ELKSCAN_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(nobody_home))
    result = run({"plugins": ["yara_backend"], "engines": ["yara"],
                  "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path / "samples"): -1},
                                                          "type_filter": False}}]})
    assert result.session.state_dir == str(nobody_home / ".cache" / "elkscan")
    assert detected(result) == DETECTED
    assert "compiling the rules in memory" in caplog.text and f"owned by uid {NOBODY}" in caplog.text
    assert sorted(p.name for p in planted.parent.iterdir()) == [planted.name, planted.name + ".blake2b"]


def test_a_cache_directory_others_can_write_is_not_used(tmp_path, caplog):
    state = tmp_path / "state"
    (state / "yara-rules").mkdir(parents=True)
    os.chmod(state / "yara-rules", 0o777)
    write_samples(tmp_path / "f")
    assert detected(scan(tmp_path / "f", state)) == DETECTED
    assert "world-writable" in caplog.text and list((state / "yara-rules").iterdir()) == []


def test_a_compiled_file_elkscan_did_not_write_is_not_loaded(tmp_path, caplog):
    """Even in a trusted cache directory, a .yarc without the digest elkscan recorded is not loaded."""
    planted = plant(tmp_path / "state" / "yara-rules")
    os.unlink(f"{planted}.blake2b")
    write_samples(tmp_path / "f")
    assert detected(scan(tmp_path / "f", tmp_path / "state")) == DETECTED
    assert "was not written by elkscan" in caplog.text
    # ... and elkscan replaced it with its own, which the next run loads
    caplog.clear()
    assert detected(scan(tmp_path / "f", tmp_path / "state")) == DETECTED
    assert "not written by elkscan" not in caplog.text


def test_a_cache_file_reached_through_a_symlink_is_not_loaded(tmp_path, caplog):
    write_samples(tmp_path / "f")
    scan(tmp_path / "f", tmp_path / "state")
    cache = tmp_path / "state" / "yara-rules"
    (ours,) = cache.glob("*.yarc")
    elsewhere = tmp_path / "elsewhere.yarc"
    planted = plant(tmp_path / "plant")
    os.replace(planted, elsewhere)
    os.replace(f"{planted}.blake2b", f"{ours}.blake2b")
    ours.unlink()
    ours.symlink_to(elsewhere)
    assert detected(scan(tmp_path / "f", tmp_path / "state")) == DETECTED


def test_the_cache_is_private(tmp_path):
    write_samples(tmp_path / "f")
    scan(tmp_path / "f", tmp_path / "state")
    cache = tmp_path / "state" / "yara-rules"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    files = sorted(cache.iterdir())
    assert sorted(p.suffix for p in files) == [".blake2b", ".files", ".yarc"]  # the record: _identity
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


@pytest.fixture
def nobodys_rules(tmp_path):
    """A rules directory nobody owns, holding a rule that never matches (audit A22)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "never.yar").write_text("rule never { condition: false }\n")
    for path in (rules, rules / "never.yar"):
        os.chown(path, NOBODY, NOBODY)
    return rules


def test_a_pipeline_naming_another_users_rules_is_refused(tmp_path, nobodys_rules):
    """Audit A22, end to end: root's own pipeline in a private place names nobody's rules directory."""
    write_samples(tmp_path / "samples")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("version: 1\nplugins: [yara_backend]\nengines: [{use: yara, with: {rules: [./rules/]}}]\n")
    for command in (["scan", "-p", str(pipeline), str(tmp_path / "samples")], ["validate", str(pipeline)]):
        out = subprocess.run([sys.executable, "-m", "elkscan_core.cli", *command], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 2, (command, out.stdout)
        (line,) = out.stderr.splitlines()
        assert f"rules directory {nobodys_rules} is owned by uid {NOBODY}" in line, line


@pytest.mark.parametrize("spec", ["file", "glob", "link"])
def test_rule_files_another_user_can_change_are_refused(tmp_path, spec):
    mine = tmp_path / "mine"
    mine.mkdir()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chmod(theirs, 0o777)
    (theirs / "never.yar").write_text("rule never { condition: false }\n")
    if spec == "link":  # a link in my directory to a file in one anyone can write
        (mine / "never.yar").symlink_to(theirs / "never.yar")
        rules = [str(mine)]
    else:
        rules = [str(theirs / ("never.yar" if spec == "file" else "*.yar"))]
    with pytest.raises(ComponentError, match=r"rule.* is world-writable"):
        scan(tmp_path / "mine", tmp_path / "state", rules=rules)


def test_a_bundles_rule_file_another_user_can_change_is_refused_and_the_old_rules_stay(tmp_path):
    write_samples(tmp_path / "f")
    engine = scan(tmp_path / "f", tmp_path / "state").session.engines[0]
    before = engine.version()
    extra = tmp_path / "online_1.yar"
    extra.write_text("rule never { condition: false }\n")
    os.chmod(extra, 0o666)
    with pytest.raises(ComponentError, match="world-writable"):
        engine.reload({"yara": [str(extra)]})
    assert engine.version() == before


def _rule_set(folder: Path, name: str) -> list[str]:
    """A rule file and one it includes; their paths, as ``ruleset.load`` takes them."""
    folder.mkdir(exist_ok=True)
    (folder / "included.yar").write_text(f'rule {name}_included {{ strings: $a = "{name}" condition: $a }}\n')
    (folder / "main.yar").write_text(f'include "included.yar"\nrule {name} {{ condition: true }}\n')
    return [str(folder / "main.yar")]


def _names(compiled) -> set[str]:
    return {rule.identifier for rule in compiled.rules}


def test_a_settled_rule_sets_identity_is_recorded_and_any_change_to_its_files_is_seen(tmp_path, monkeypatch):
    """The identity recorded beside the compiled rules is used only while every file (the rule file and
    what it includes) has the device, inode, size and times recorded; a write, even one that restores
    the modification time, moves the change time (docs/performance.md#start-up-and-shut-down)."""
    monkeypatch.setattr(ruleset, "SETTLED_NS", 0)  # the files written here count as settled at once
    cache = str(tmp_path / "cache")
    specs = _rule_set(tmp_path / "rules", "aaaa")
    first = ruleset.load(specs, cache_dir=cache)
    assert len(list(Path(cache).glob("*.files"))) == 1
    assert ruleset.load(specs, cache_dir=cache).digest == first.digest  # from the record
    included = tmp_path / "rules" / "included.yar"
    times = included.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick
    included.write_text(included.read_text().replace("aaaa", "bbbb"))  # same size
    os.utime(included, ns=(times.st_atime_ns, times.st_mtime_ns))
    changed = ruleset.load(specs, cache_dir=cache)
    assert changed.digest != first.digest and _names(changed) == {"aaaa", "bbbb_included"}
    os.chmod(included, 0o666)  # what a recorded include has become is trust-checked again
    with pytest.raises(ComponentError, match="world-writable"):
        ruleset.load(specs, cache_dir=cache)


def test_rule_files_written_just_now_are_read_and_hashed_every_time(tmp_path):
    """A file changed within SETTLED_NS could change again within the same timestamp: no record."""
    cache = tmp_path / "cache"
    ruleset.load(_rule_set(tmp_path / "rules", "aaaa"), cache_dir=str(cache))
    assert list(cache.glob("*.files")) == [] and len(list(cache.glob("*.yarc"))) == 1


def test_a_damaged_or_foreign_identity_record_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(ruleset, "SETTLED_NS", 0)
    cache = tmp_path / "cache"
    specs = _rule_set(tmp_path / "rules", "aaaa")
    expected = ruleset.load(specs, cache_dir=str(cache)).digest
    (record,) = cache.glob("*.files")
    for content in (b"{not json", b'{"digest": "0", "externals": [], "files": []}', b"[]"):
        record.write_bytes(content)
        assert ruleset.load(specs, cache_dir=str(cache)).digest == expected
    forged = record.read_text().replace(expected, "0" * 64)
    record.write_text(forged)
    os.chown(record, NOBODY, NOBODY)  # not ours: ignored, and replaced by one of ours
    assert ruleset.load(specs, cache_dir=str(cache)).digest == expected
    assert record.stat().st_uid == os.geteuid() and expected in record.read_text()


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | _JSON.map(lambda value: json.dumps(value).encode())
       | st.builds(lambda files, digest: json.dumps({"digest": digest, "externals": [], "files": files}).encode(),
                   _JSON, _JSON))
def test_an_identity_record_of_any_content_is_used_or_ignored_never_a_crash(tmp_path, content):
    record = tmp_path / "fuzzed.files"
    record.write_bytes(content)
    found = ruleset._recorded(record, [str(tmp_path / "main.yar")])
    assert found is None or isinstance(found[0], str)
