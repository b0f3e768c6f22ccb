"""A file clamd cannot scan whole under its limits ends not scanned, with the limit as the reason, never
clean; the verdict cache keeps that outcome as what it is, under clamd's version, rules and limits, so it
is not judged again until one of them changes. Errors (a clamd that died, a time limit) are never kept.
Real clamd throughout; the verdict cache in a real store."""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
import zipfile
from pathlib import Path

import pytest
from attrs import frozen

from elkscan_core import Engine, hookimpl
from elkscan_core.testing import dated_directory, run

HERE = Path(__file__).resolve().parent  # a tmpfs /tmp dates no write: directories made here instead

OVER = "above clamav's max_scan_size"


@pytest.fixture
def tree(tmp_path):
    """A file over a 2 KiB MaxScanSize and one under it, last changed over a second ago (the cache
    keeps nothing about a file changed within its settle time)."""
    with dated_directory(tmp_path, HERE) as base:
        files = base / "files"
        files.mkdir()
        (files / "big.txt").write_bytes(b"x" * 3000)
        (files / "small.txt").write_bytes(b"y" * 100)
        time.sleep(1.1)
        yield files


def _scan(tree: Path, store: Path, database: Path, engines: tuple = (), **options):
    clamav = {"use": "clamav", "with": {"managed": True, "database": str(database), "max_scan_size": "2KiB",
                                        **options}}
    return run({"plugins": ["clamav_backend"],
                "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False,
                                                        "exclude": []}}],
                "engines": [*engines, clamav],
                "limits": {"cache": True, "cache_path": str(store), "workers": 1}},
               extra_plugins=[_Killers()], report_clean=True)


def _status(result) -> dict[str, tuple[str, str]]:
    return {Path(r.target.path).name: (r.status, r.skipped) for r in result.records}


def test_a_file_over_a_limit_is_judged_once_then_answered_from_the_cache(clamd_binary, test_database, tree,
                                                                        tmp_path):
    store = tmp_path / "verdicts.sqlite"
    first = _scan(tree, store, test_database)
    assert _status(first) == {"big.txt": ("not_scanned", OVER), "small.txt": ("clean", "")}
    assert first.summary.not_scanned == {OVER: 1} and first.summary.errors == 0
    assert first.summary.cached == 0

    again = _scan(tree, store, test_database)
    assert _status(again) == _status(first)  # reported as the first time: not scanned, never clean
    assert again.summary.not_scanned == {OVER: 1} and again.summary.clean == 1
    assert again.summary.cached == 2  # neither file went to clamd
    (big,) = [r for r in again.records if r.target.path.endswith("big.txt")]
    assert big.judged_by == () and big.status == "not_scanned"

    os.truncate(tree / "big.txt", 1000)  # changed: judged again, and now read whole
    changed = _scan(tree, store, test_database)
    assert _status(changed)["big.txt"] == ("clean", "") and changed.summary.cached == 1


def test_a_change_of_the_limits_or_the_rules_judges_it_again(clamd_binary, test_database, tree, tmp_path):
    store = tmp_path / "verdicts.sqlite"
    _scan(tree, store, test_database)
    other_limit = _scan(tree, store, test_database, max_files=5000)  # any limit, not only the one hit
    assert _status(other_limit)["big.txt"] == ("not_scanned", OVER)
    assert other_limit.summary.cached == 1  # small.txt's clean verdict does not depend on the limits

    rules = tmp_path / "rules"
    shutil.copytree(test_database, rules)
    (rules / "more.ndb").write_text(f"Unix.Test.More-1:0:*:{b'elkscan-more-rules'.hex()}\n")
    new_rules = _scan(tree, store, rules)
    assert _status(new_rules)["big.txt"] == ("not_scanned", OVER) and new_rules.summary.cached == 0

    raised = _scan(tree, store, test_database, max_scan_size="4KiB")
    assert _status(raised)["big.txt"] == ("clean", "")


class _KillClamd(Engine):
    """Before clamd gets ``big.txt``: its database is broken, so its next start fails, and it is killed.
    Its own verdict is never cached (no version)."""

    id = "kill_clamd"

    @frozen
    class Config:
        pass

    def scan(self, subject):
        if subject.path.endswith("big.txt"):
            daemon = next(e for e in self.session.engines if e.id == "clamav").daemon
            Path(daemon.database_dir, "zz-broken.ndb").write_text("Unix.Test.Broken-1:0:*:zz\n")
            os.kill(daemon.pid, signal.SIGKILL)
        return []


class _Killers:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(_KillClamd)


def test_an_error_is_never_cached(clamd_binary, test_database, tree, tmp_path):
    store = tmp_path / "verdicts.sqlite"
    killed = _scan(tree, store, test_database, engines=({"use": "kill_clamd"},), restart_timeout="2s")
    (big,) = [r for r in killed.records if r.target.path.endswith("big.txt")]
    assert big.status == "error" and "has not come back" in big.error

    small_was_judged = _status(killed)["small.txt"] == ("clean", "")  # before clamd died, or not
    healthy = _scan(tree, store, test_database)  # judged by clamd, which gives its limit this time
    assert _status(healthy)["big.txt"] == ("not_scanned", OVER)
    assert healthy.summary.cached == small_was_judged  # big.txt's error was not kept


def test_a_time_limit_is_an_error_judged_again_every_time(clamd_binary, test_database, tmp_path):
    with dated_directory(tmp_path, HERE) as base:
        files = base / "files"
        files.mkdir()
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zipped:
            for i in range(9000):  # below MaxFiles; clamd takes over 0.5 s to look at every member
                zipped.writestr(f"member{i}.txt", f"member {i} " * 50)
        (files / "many.zip").write_bytes(archive.getvalue())
        time.sleep(1.1)
        store = tmp_path / "verdicts.sqlite"
        for _ in range(2):
            result = _scan(files, store, test_database, max_scan_size="100MiB", max_scan_time="0.2s")
            (record,) = result.records
            assert record.status == "error" and "MaxScanTime" in record.error
            assert result.summary.cached == 0


def test_an_external_clamds_limits_are_unknown_so_nothing_it_leaves_unread_is_cached(
        engine_factory, test_database, tree, tmp_path):
    owner = engine_factory({"managed": True, "database": str(test_database), "max_scan_size": "2KiB"})
    store = tmp_path / "verdicts.sqlite"
    for _ in range(2):
        result = run({"plugins": ["clamav_backend"],
                      "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False,
                                                              "exclude": []}}],
                      "engines": [{"use": "clamav", "with": {"socket": owner.daemon.socket_path}}],
                      "limits": {"cache": True, "cache_path": str(store)}}, report_clean=True)
        assert _status(result)["big.txt"] == ("not_scanned", "above clamd's MaxScanSize")
    assert result.summary.cached == 1  # small.txt only
