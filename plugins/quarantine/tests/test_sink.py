"""The quarantine sink in real sessions: its policy, and a file owner who swaps the file between the scan
and the move (the attack a quarantine running as root must survive)."""

from __future__ import annotations

import hashlib
import os
import stat
import time

import pytest

from elkscan_core import KNOWN_GOOD, ComponentError, Engine, Enricher, hookimpl
from elkscan_core.pipeline import parse_pipeline
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.runner import build_session
from elkscan_core.testing import eicar, run
from elkscan_quarantine import Vault
from elkscan_quarantine.fileops import NotQuarantined, locate, open_judged, remove_if_same
from elkscan_quarantine.judged import Judged

BENIGN = b"an ordinary file, nothing to see\n"


@pytest.fixture
def host(tmp_path):
    """A scanned tree with EICAR (in a subdirectory) and a benign file, and a hash list naming EICAR."""
    root = tmp_path / "scan"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "eicar.com").write_bytes(eicar())
    os.chmod(root / "sub" / "eicar.com", 0o755)
    (root / "benign.txt").write_bytes(BENIGN)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "eicar.hashes").write_text(f"md5:{hashlib.md5(eicar()).hexdigest()}:68:Multios.TestFile.Eicar-1\n")
    return tmp_path


def pipeline(host, *, hashlist=False, enrichers=("quarantine",), engines=(), **options):
    listed = [{"use": "hashlist", "with": {"files": [str(host / "lists" / "eicar.hashes")]}}] if hashlist else []
    return {
        "plugins": ["yara_backend", "hash_extractor", "quarantine"],
        "state_dir": str(host / "state"),
        "sources": [{"use": "dirscan", "with": {"roots": {str(host / "scan"): -1}, "exclude": [],
                                                 "type_filter": False}}],
        "engines": ["yara", *listed, *engines],
        "enrichers": list(enrichers),
        "sinks": [{"use": "quarantine", "with": {"vault": str(host / "vault"), **options}}],
    }


def vault_items(host):
    vault = Vault.open(str(host / "vault"))
    try:
        return vault.entries()[0]
    finally:
        vault.close()


def test_a_detected_file_moves_into_a_private_defanged_vault(host):
    original = host / "scan" / "sub" / "eicar.com"
    st = original.stat()
    result = run(pipeline(host))
    assert result.summary.errors == 0 and result.summary.detected_files == 1
    assert not original.exists() and (host / "scan" / "benign.txt").read_bytes() == BENIGN
    vault = host / "vault"
    assert stat.S_IMODE(vault.stat().st_mode) == 0o700
    [entry] = vault_items(host)
    assert (entry.path, entry.real_path, entry.size) == (str(original), os.fsencode(original), 68)
    assert (entry.uid, entry.gid, entry.mode, entry.mtime_ns, entry.ino) == (st.st_uid, st.st_gid, 0o755,
                                                                            st.st_mtime_ns, st.st_ino)
    assert entry.sha256 == hashlib.sha256(eicar()).hexdigest() and entry.md5 == hashlib.md5(eicar()).hexdigest()
    assert entry.detections == [{"engine": "yara", "signature": "Multios_TestFile_Eicar", "class": "TestFile"}]
    assert entry.record_id == result.records[0].id
    data = vault / f"{entry.id}.data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o600  # no exec bit
    stored = data.read_bytes()
    assert len(stored) == 68 and b"EICAR" not in stored and not stored.startswith(eicar()[:8])
    # what the vault holds is detected by nothing: a scan of it finds no hit
    rescan = run({"plugins": ["yara_backend"], "state_dir": str(host / "state"), "engines": ["yara"],
                  "sources": [{"use": "dirscan", "with": {"roots": {str(vault): -1}, "exclude": [],
                                                           "type_filter": False}}]})
    assert rescan.detected == {} and rescan.summary.files == 2


def test_min_engines_counts_distinct_engines_that_agree(host):
    original = host / "scan" / "sub" / "eicar.com"
    run(pipeline(host, min_engines=2))  # yara alone
    assert original.exists() and not vault_items(host)
    result = run(pipeline(host, hashlist=True, min_engines=2))  # yara and hashlist
    assert {d.engine for d in result.records[0].detections} == {"yara", "hashlist"}
    assert not original.exists() and len(vault_items(host)) == 1


def test_only_the_given_signature_classes_are_acted_on(host):
    original = host / "scan" / "sub" / "eicar.com"
    run(pipeline(host, classes=["Trojan", "Backdoor"]))
    assert original.exists()
    run(pipeline(host, classes=["testfile"]))  # a detection's class, whatever its case
    assert not original.exists()


def test_max_age_goes_by_the_last_change_which_an_owner_cannot_backdate(host):
    original = host / "scan" / "sub" / "eicar.com"
    time.sleep(0.05)
    run(pipeline(host, max_age="10ms"))
    assert original.exists()
    os.utime(original, (946684800, 946684800))  # its owner says 2000-01-01: ctime still says now
    run(pipeline(host, max_age="1h"))
    assert not original.exists()


def test_dry_run_moves_nothing_and_creates_no_vault(host, caplog):
    run(pipeline(host, dry_run=True))
    assert (host / "scan" / "sub" / "eicar.com").exists() and not (host / "vault").exists()
    assert "would move" in caplog.text and "Multios_TestFile_Eicar" in caplog.text


class Broken(Engine):
    id = "broken"

    def scan(self, subject):
        raise RuntimeError("engine crashed")


class BrokenPlugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Broken)


def test_never_on_an_engine_error(host):
    result = run(pipeline(host, engines=("broken",)), extra_plugins=[BrokenPlugin()])
    record = next(r for r in result.records if r.detections)
    assert record.errors and record.detections
    assert (host / "scan" / "sub" / "eicar.com").exists() and not vault_items(host)


class Vouching(Engine):
    id = "vouching"

    def scan(self, subject):
        return KNOWN_GOOD

    @property
    def vouches(self):
        return True


class VouchingPlugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Vouching)


def test_never_a_file_an_engine_vouches_for(host):
    """A package's own file, matched by a rule before the package check vouched for it, stays."""
    result = run(pipeline(host, engines=("vouching",)), extra_plugins=[VouchingPlugin()])
    record = next(r for r in result.records if r.detections)
    assert record.known_good == "vouching" and not record.errors
    assert (host / "scan" / "sub" / "eicar.com").exists() and not vault_items(host)


def test_without_the_enricher_it_refuses_to_start(host):
    with pytest.raises(ComponentError, match="add 'quarantine' to the pipeline's enrichers"):
        run(pipeline(host, enrichers=()))


@pytest.mark.parametrize("mode,problem", [(0o777, "world-writable"), (0o750, "must be private")])
def test_a_vault_others_can_reach_is_refused(host, mode, problem):
    (host / "vault").mkdir(mode=mode)
    os.chmod(host / "vault", mode)
    with pytest.raises(ComponentError, match=problem):
        run(pipeline(host))
    assert (host / "scan" / "sub" / "eicar.com").exists()
    parsed = parse_pipeline({"version": 1, **pipeline(host)})
    sink = build_session(parsed, make_plugin_manager(parsed.plugins)).sinks[0]
    with pytest.raises(ComponentError, match=problem):  # elkscan validate says so too
        sink.check()


# -- the owner swaps the file after the scan, before the move ------------------------------------


def swapping(action):
    """A plugin whose enricher, listed after the quarantine enricher, performs ``action(path)`` on each
    detected file: after the scan recorded what it judged, before the sink moves it."""

    class Swap(Enricher):
        id = "swap"

        def enrich(self, subject, detections):
            action(subject.path)
            return {}

    class Plugin:
        @hookimpl
        def elkscan_register_enrichers(self, registry):
            registry.add(Swap)

    return Plugin()


def victim(host):
    """A file of root's that the attacker would like the quarantine to take away."""
    path = host / "victim"
    path.mkdir(exist_ok=True)
    (path / "eicar.com").write_bytes(eicar())  # even the same bytes: it is not the file that was judged
    (path / "shadow").write_bytes(b"root:$6$secret:19000:0:99999:7:::\n")
    return path


def replace_with_new_file(path):
    os.rename(path, path + ".gone")
    with open(path, "wb") as handle:
        handle.write(BENIGN)


def replace_with_hard_link(path):
    os.unlink(path)
    os.link(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))), "victim", "shadow"), path)


def replace_with_symlink(path):
    os.unlink(path)
    os.symlink(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))), "victim", "shadow"), path)


def replace_directory_with_link(path):
    directory = os.path.dirname(path)
    os.rename(directory, directory + ".old")
    os.symlink(os.path.join(os.path.dirname(os.path.dirname(directory)), "victim"), directory)


def change_in_place_keeping_size_and_mtime(path):
    st = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(b"Y" * 68)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("attack", [replace_with_new_file, replace_with_hard_link, replace_with_symlink,
                                    replace_directory_with_link, change_in_place_keeping_size_and_mtime])
def test_a_file_swapped_after_the_scan_is_left_alone_and_nothing_else_is_taken(host, attack, caplog):
    places = victim(host)
    before = {p: (p.read_bytes(), p.stat().st_ino) for p in places.iterdir()}
    result = run(pipeline(host, enrichers=("quarantine", "swap")), extra_plugins=[swapping(attack)])
    assert result.summary.detected_files == 1
    assert result.summary.errors == 1  # the refusal is counted and said
    assert "not the file that was judged" in caplog.text or "not what was judged" in caplog.text
    assert {p: (p.read_bytes(), p.stat().st_ino) for p in places.iterdir()} == before
    assert not vault_items(host) and [p.name for p in (host / "vault").iterdir()] == []
    assert os.path.lexists(host / "scan" / "sub" / "eicar.com")  # the attacker's name is still theirs


def test_a_name_swapped_between_the_copy_and_the_removal_is_put_back(host):
    """The last step: the name is renamed aside and removed only if it is still the judged inode."""
    path = str(host / "scan" / "sub" / "eicar.com")
    with open(path, "rb") as handle:
        judged = Judged.of(handle.fileno(), os.fstat(handle.fileno()))
    with locate(path) as (dir_fd, name, real):
        fd, st = open_judged(dir_fd, name, path, judged)
        os.close(fd)
        replace_with_new_file(path)  # the race: after the verified copy, before the removal
        with pytest.raises(NotQuarantined, match="was replaced by another file.*it was put back"):
            remove_if_same(dir_fd, name, path, st)
    assert open(path, "rb").read() == BENIGN
    assert sorted(os.listdir(host / "scan" / "sub")) == ["eicar.com", "eicar.com.gone"]  # nothing left aside
