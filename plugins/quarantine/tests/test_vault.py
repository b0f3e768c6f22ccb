"""``elkscan quarantine list|restore|purge`` through the real command, on items a real session put in the
vault: a restore gives back the identical file with its owner, mode and times, and never writes over a
file or through a link."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from elkscan_core.testing import eicar, run
from elkscan_quarantine import Entry, VaultError

NOBODY, NOGROUP = 65534, 65534
ATIME, MTIME = 1_600_000_000_123_456_789, 1_500_000_000_987_654_321


def elkscan(*args):
    return subprocess.run([sys.executable, "-m", "elkscan_core.cli", *args], capture_output=True, text=True,
                          timeout=120)


def quarantine(tmp_path, name: bytes = b"dropper"):
    """EICAR written as ``name`` (owned by nobody, mode 4751, known times), scanned and quarantined."""
    root = tmp_path / "scan"
    (root / "www").mkdir(parents=True, exist_ok=True)
    path = os.path.join(os.fsencode(root / "www"), name)
    with open(path, "wb") as handle:
        handle.write(eicar())
    os.chown(path, NOBODY, NOGROUP)
    os.chmod(path, 0o4751)
    os.utime(path, ns=(ATIME, MTIME))
    before = os.stat(path)
    result = run({"plugins": ["yara_backend", "quarantine"], "state_dir": str(tmp_path / "state"),
                  "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "exclude": [],
                                                           "type_filter": False}}],
                  "engines": ["yara"], "enrichers": ["quarantine"],
                  "sinks": [{"use": "quarantine", "with": {"vault": str(tmp_path / "vault")}}]})
    assert result.summary.errors == 0 and not os.path.lexists(path)
    return path, before


def listed(tmp_path):
    out = elkscan("quarantine", "list", "--vault", str(tmp_path / "vault"))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_restore_gives_back_the_identical_file_with_its_metadata(tmp_path):
    path, before = quarantine(tmp_path)
    [line] = listed(tmp_path)
    item = line.split()[0]
    assert line.endswith(f"Multios_TestFile_Eicar  {os.fsdecode(path)}") and len(item) == 16
    out = elkscan("quarantine", "restore", item, "--vault", str(tmp_path / "vault"))
    assert out.returncode == 0, out.stderr
    after = os.stat(path)
    assert open(path, "rb").read() == eicar()
    assert (after.st_uid, after.st_gid, after.st_mode, after.st_atime_ns, after.st_mtime_ns) == (
        NOBODY, NOGROUP, before.st_mode, ATIME, MTIME)  # set-uid bit included
    assert listed(tmp_path) == [] and os.listdir(tmp_path / "vault") == []  # the item left the vault
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary left beside it


def test_a_name_that_is_not_utf8_is_kept_exactly(tmp_path):
    path, _ = quarantine(tmp_path, b"shell\xff\x1b[31m.php")
    [line] = listed(tmp_path)
    assert line.endswith("shell\\xff\\x1b[31m.php")  # escaped for the terminal, never obeyed
    out = elkscan("quarantine", "list", "-f", "jsonl", "--vault", str(tmp_path / "vault"))
    [entry] = [json.loads(x) for x in out.stdout.splitlines()]
    assert entry["path"].endswith("shell\ufffd\x1b[31m.php") and entry["path_bytes"].endswith("shell\\xff\x1b[31m.php")
    assert entry["sha256"] and entry["uid"] == NOBODY and "key" not in entry
    assert elkscan("quarantine", "restore", entry["id"], "--vault", str(tmp_path / "vault")).returncode == 0
    assert open(path, "rb").read() == eicar()


def test_restore_never_overwrites_a_file(tmp_path):
    path, _ = quarantine(tmp_path)
    with open(path, "wb") as handle:
        handle.write(b"the new index.php\n")
    item = listed(tmp_path)[0].split()[0]
    out = elkscan("quarantine", "restore", item, "--vault", str(tmp_path / "vault"))
    assert out.returncode == 2 and "exists; elkscan does not overwrite it" in out.stderr
    assert open(path, "rb").read() == b"the new index.php\n" and len(listed(tmp_path)) == 1
    assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)]  # no temporary left
    elsewhere = tmp_path / "kept.bin"
    out = elkscan("quarantine", "restore", item, "--to", str(elsewhere), "--vault", str(tmp_path / "vault"))
    assert out.returncode == 0 and elsewhere.read_bytes() == eicar()


def test_restore_never_follows_a_link_that_replaced_a_directory(tmp_path):
    """The directory's owner swaps it for a link to /etc/cron.d-like ground before root restores."""
    path, _ = quarantine(tmp_path)
    target = tmp_path / "cron.d"
    target.mkdir()
    directory = os.path.dirname(path)
    os.rename(directory, directory + b".old")
    os.symlink(target, directory)
    item = listed(tmp_path)[0].split()[0]
    out = elkscan("quarantine", "restore", item, "--vault", str(tmp_path / "vault"))
    assert out.returncode == 2 and "replaced by a link" in out.stderr
    assert os.listdir(target) == [] and len(listed(tmp_path)) == 1


def test_purge_by_id_age_or_all(tmp_path):
    quarantine(tmp_path, b"one")
    quarantine(tmp_path, b"two")
    vault = str(tmp_path / "vault")
    first, second = (line.split()[0] for line in listed(tmp_path))
    assert elkscan("quarantine", "purge", "--vault", vault).returncode == 2  # never everything by default
    assert elkscan("quarantine", "purge", "0123456789abcdef", "--vault", vault).returncode == 2
    assert elkscan("quarantine", "purge", "--older-than", "1h", "--vault", vault).stdout.startswith("purged 0")
    assert elkscan("quarantine", "purge", first, "--vault", vault).returncode == 0
    assert [line.split()[0] for line in listed(tmp_path)] == [second]
    assert elkscan("quarantine", "purge", "--all", "--vault", vault).stdout.startswith("purged 1")
    assert os.listdir(vault) == []


def test_the_command_refuses_a_vault_another_user_could_change(tmp_path):
    quarantine(tmp_path)
    os.chown(tmp_path / "vault", NOBODY, NOGROUP)  # nobody could now forge entries that root restores
    out = elkscan("quarantine", "list", "--vault", str(tmp_path / "vault"))
    assert out.returncode == 2 and "owned by uid 65534" in out.stderr and out.stdout == ""


def test_a_missing_vault_lists_nothing():
    out = elkscan("quarantine", "list", "--vault", "/nonexistent/vault")
    assert out.returncode == 0 and out.stdout == "" and "nothing quarantined" in out.stderr


ENTRY_FIELDS = st.fixed_dictionaries({}, optional={
    name: st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=40), st.booleans(), st.none(),
                    st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=5)), max_size=2))
    for name in ("id", "quarantined_at", "host", "path_hex", "real_path_hex", "uid", "gid", "user", "group",
                 "mode", "size", "atime_ns", "mtime_ns", "ctime_ns", "dev", "ino", "nlink", "sha256", "md5",
                 "detections", "record_id", "key")})


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), ENTRY_FIELDS.map(lambda d: json.dumps(d).encode())))
def test_a_damaged_manifest_entry_is_one_clear_error(data):
    """400 examples: bytes and near-entries; only an Entry or a VaultError comes out."""
    try:
        entry = Entry.loads(data)
    except VaultError as exc:
        assert str(exc).startswith("damaged manifest entry")
    else:
        assert Entry.loads(entry.dumps()) == entry
