"""The verdict cache: an unchanged file is not judged twice by the same rules; anything else is."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
from attrs import frozen

from elkscan_core import Detection, Engine, hookimpl
from elkscan_core.cache import VerdictCache
from elkscan_core.testing import run


@frozen
class CountingConfig:
    version: str = "rules-1"


class Counting(Engine):
    """Flags files containing 'bad' and counts what it was asked to judge."""

    id = "counting"
    Config = CountingConfig

    def start(self):
        self.judged: list[str] = []

    def version(self):
        return self.config.version

    def scan(self, subject):
        self.judged.append(os.path.basename(subject.path))
        return [Detection.from_signature(self.id, "Txt.Test.Bad")] if b"bad" in subject.read(4096) else []


class Other(Counting):
    id = "other"


class Versionless(Counting):
    id = "versionless"

    def version(self):
        return ""


class Engines:
    @hookimpl
    def elkscan_register_engines(self, registry):
        for cls in (Counting, Other, Versionless):
            registry.add(cls)


def scan(root, cache_path, engines=("counting",), versions=None, cache=True, report_clean=False):
    versions = versions or {}
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                "engines": [{"use": e, "with": {"version": versions[e]} if e in versions else {}}
                            for e in engines],
                "limits": {"cache": cache, "cache_path": str(cache_path)}}
    result = run(pipeline, extra_plugins=[Engines()], report_clean=report_clean)
    judged = {e.id: sorted(e.judged) for e in result.session.engines}
    return result, judged


@pytest.fixture(scope="module")
def settled(tmp_path_factory):
    """Trees whose files were last changed over a second ago: recent ones are never cached (their
    timestamps may not yet show a change made in the same clock tick)."""
    base = tmp_path_factory.mktemp("settled")
    for name in ("shared", "modified", "rules", "corrupt", "cli", "open"):
        tree = base / name
        tree.mkdir()
        for i in range(5):
            (tree / f"clean{i}.txt").write_bytes(b"fine content %d" % i)
        (tree / "hit.txt").write_bytes(b"this is bad content")
    time.sleep(1.1)
    return base


def test_unchanged_files_are_answered_from_the_cache(settled, tmp_path):
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    first, judged = scan(tree, db)
    assert judged["counting"] == sorted(os.listdir(tree)) and first.summary.cached == 0
    second, judged = scan(tree, db)
    assert judged["counting"] == ["hit.txt"]  # a file with detections is always judged again
    assert second.summary.cached == 5 and second.summary.files == 6
    assert second.detected == first.detected == {str(tree / "hit.txt"): ["Txt.Test.Bad"]}


def test_cached_files_are_still_reported_when_clean_files_are_asked_for(settled, tmp_path):
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    scan(tree, db)
    result, judged = scan(tree, db, report_clean=True)
    assert judged["counting"] == ["hit.txt"] and result.summary.cached == 5
    assert sorted(os.path.basename(r.target.path) for r in result.records) == sorted(os.listdir(tree))


def test_without_the_cache_option_every_file_is_judged(settled, tmp_path):
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    scan(tree, db)
    result, judged = scan(tree, db, cache=False)
    assert len(judged["counting"]) == 6 and result.summary.cached == 0


def test_a_modified_file_is_judged_again(settled, tmp_path):
    tree, db = settled / "modified", tmp_path / "verdicts.sqlite"
    scan(tree, db)
    target = tree / "clean0.txt"
    before = os.stat(target)
    target.write_bytes(b"now bad content")  # same size: only the timestamps tell
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with mtime put back
    result, judged = scan(tree, db)
    assert judged["counting"] == ["clean0.txt", "hit.txt"]
    assert result.detected == {str(target): ["Txt.Test.Bad"], str(tree / "hit.txt"): ["Txt.Test.Bad"]}


def test_a_rule_update_invalidates_only_that_engines_verdicts(settled, tmp_path):
    tree, db = settled / "rules", tmp_path / "verdicts.sqlite"
    scan(tree, db, engines=("counting", "other"))
    result, judged = scan(tree, db, engines=("counting", "other"), versions={"counting": "rules-2"})
    assert len(judged["counting"]) == 6 and judged["other"] == ["hit.txt"]
    assert result.summary.cached == 5


def test_an_engine_without_a_version_is_never_cached(settled, tmp_path):
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    scan(tree, db, engines=("versionless",))
    result, judged = scan(tree, db, engines=("versionless",))
    assert len(judged["versionless"]) == 6 and result.summary.cached == 0


def test_a_file_changed_just_now_is_not_cached(tmp_path):
    tree = tmp_path / "fresh"
    tree.mkdir()
    (tree / "new.txt").write_bytes(b"fresh content")
    db = tmp_path / "verdicts.sqlite"
    scan(tree, db)
    _, judged = scan(tree, db)
    assert judged["counting"] == ["new.txt"]


def test_a_corrupt_cache_is_rebuilt_with_a_warning(settled, tmp_path, caplog):
    tree, db = settled / "corrupt", tmp_path / "verdicts.sqlite"
    db.write_bytes(b"this is not an SQLite database, just garbage" * 100)
    with caplog.at_level(logging.WARNING, logger="elkscan.cache"):
        first, judged = scan(tree, db)
    assert len(judged["counting"]) == 6 and first.summary.errors == 0
    assert any("unreadable" in r.getMessage() and str(db) in r.getMessage() for r in caplog.records)
    assert (tmp_path / "verdicts.sqlite.corrupt").exists()
    second, judged = scan(tree, db)
    assert judged["counting"] == ["hit.txt"] and second.summary.cached == 5


def test_a_cache_others_can_write_is_not_trusted(settled, tmp_path, caplog):
    tree, shared = settled / "open", tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # whoever can write here could forge clean verdicts
    with caplog.at_level(logging.WARNING, logger="elkscan"):
        scan(tree, shared / "verdicts.sqlite")
        result, judged = scan(tree, shared / "verdicts.sqlite")
    assert len(judged["counting"]) == 6 and result.summary.cached == 0 and result.summary.errors == 0
    assert any("writable by others" in r.getMessage() for r in caplog.records)
    assert not (shared / "verdicts.sqlite").exists()


WRITER = textwrap.dedent("""
    import json, os, sys
    from elkscan_core.cache import VerdictCache
    db, tree, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cache = VerdictCache(db, settle=0)
    seen = 0
    for round in range(3):
        for i in range(start, stop):
            st = os.stat(os.path.join(tree, f"f{i}"))
            seen += cache.is_clean("counting", "v1", st)
            cache.record_clean("counting", "v1", st)
        cache.flush()
    cache.close()
    print(json.dumps({"seen": seen}))
""")


def test_two_processes_share_one_cache(tmp_path):
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(3000):
        (tree / f"f{i}").write_bytes(b"x")
    db = str(tmp_path / "verdicts.sqlite")
    # Overlapping halves, written at the same time by two processes.
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, db, str(tree), str(a), str(b)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for a, b in ((0, 2000), (1000, 3000))]
    for writer in writers:
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0 and "Traceback" not in err, err
        assert json.loads(out)["seen"] >= 2000  # rounds 2 and 3 found their own verdicts
    cache = VerdictCache(db)
    assert len(cache) == 3000
    assert all(cache.is_clean("counting", "v1", os.stat(tree / f"f{i}")) for i in range(3000))
    cache.close()


def test_the_cli_uses_the_cache_unless_told_not_to(settled, tmp_path):
    """The real command with the real yara engine: the second run answers from the cache."""
    tree = settled / "cli"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "version": 1, "plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
        "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}],
        "engines": [{"use": "yara"}], "limits": {"cache": True}}))

    def scan(*extra):
        out = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "scan", "-p", str(pipeline), *extra],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "from the cache" not in scan()
    assert "6 verdict(s) from the cache" in scan()
    assert "from the cache" not in scan("--no-cache")
    assert (tmp_path / "state" / "verdicts.sqlite").exists()


def test_a_walk_does_not_even_open_files_the_cache_holds_clean(settled, tmp_path, monkeypatch):
    tree, db = settled / "open", tmp_path / "verdicts.sqlite"
    scan(tree, db)
    opened = []
    real_open = os.open

    def spy(path, *args, **kwargs):  # observes, and opens for real
        if str(path).startswith(str(tree)):
            opened.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    result, judged = scan(tree, db)
    assert opened == ["hit.txt"] and result.summary.cached == 5 and result.summary.files == 6


# -- attacks on the cache (issue 10, audit C3) --------------------------------------------------------

def yara_scan(root, tmp_path, *, rules=None, extra_engines=(), extra_plugins=()):
    """The real pipeline: the yara engine (its bundled rules unless ``rules`` is a rule file) with the
    verdict cache on."""
    yara = {"use": "yara", "with": {"rules": [str(rules)]}} if rules else {"use": "yara"}
    pipeline = {"plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
                "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                "engines": [yara, *({"use": e} for e in extra_engines)],
                "limits": {"cache": True, "cache_path": str(tmp_path / "verdicts.sqlite")}}
    return run(pipeline, extra_plugins=extra_plugins)


def test_a_hard_link_is_judged_under_its_own_name_when_rules_read_the_name(tmp_path):
    """Audit C3: a rule on ``extension``; ``shell.php`` is a hard link of ``notes.txt``, which was
    found clean: that verdict must not cover the other name."""
    rules = tmp_path / "by_name.yar"
    rules.write_text('rule Php_Eval_By_Name { strings: $e = "eval(" condition: extension == "php" and $e }\n')
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "notes.txt").write_bytes(b"<?php eval($_GET['x']); ?>\n")
    os.link(tree / "notes.txt", tree / "shell.php")
    time.sleep(1.1)  # link() moved the ctime: let it settle
    for run_ in range(2):
        result = yara_scan(tree, tmp_path, rules=rules)
        assert result.detected == {str(tree / "shell.php"): ["Php_Eval_By_Name"]}, run_
    assert result.summary.cached == 1  # notes.txt, under its own name


def test_the_yara_engine_says_when_its_rules_read_the_file_name(tmp_path):
    plain, named = tmp_path / "plain.yar", tmp_path / "named.yar"
    plain.write_text('rule A { strings: $a = "x" condition: $a and filetype == "" and owner != "" }\n')
    named.write_text('rule B { condition: filename == "a" }\nrule C { condition: filepath == "/a" }\n')
    dependent = {}
    for rules in (plain, named):
        pipeline = {"plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
                    "sources": [], "engines": [{"use": "yara", "with": {"rules": [str(rules)]}}]}
        dependent[rules.name] = run(pipeline).session.engines[0].path_dependent
    assert dependent == {"plain.yar": False, "named.yar": True}


def test_a_verdict_kept_for_one_name_does_not_answer_for_another(tmp_path):
    victim = tmp_path / "f"
    victim.write_bytes(b"x")
    time.sleep(1.1)
    cache = VerdictCache(str(tmp_path / "v.sqlite"))
    st = os.stat(victim)
    cache.record_clean("e", "v1", st, "/srv/notes.txt")
    cache.record_clean("e", "v1", st)
    cache.flush()
    assert cache.is_clean("e", "v1", st, "/srv/notes.txt") and cache.is_clean("e", "v1", st)
    assert not cache.is_clean("e", "v1", st, "/srv/shell.php")
    cache.close()
