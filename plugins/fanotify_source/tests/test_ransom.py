"""Anti-ransomware: decoys for a temporary passwd-style user list, ransom events, on/off/reset."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from elkscan_fanotify_source.decoys import CONTENTS, DECOY_DIR

from elkscan_core import RANSOM_EVENT


def users(tmp_path) -> tuple[dict, dict]:
    homes = tmp_path / "home"
    root_home = tmp_path / "root"
    for home in (homes / "alice", homes / "bob", homes / "dave", root_home, tmp_path / "srv" / "carol"):
        home.mkdir(parents=True)
    passwd = tmp_path / "passwd"
    passwd.write_text(
        f"root:x:0:0:root:{root_home}:/bin/bash\n"
        f"alice:x:1501:1502:Alice:{homes / 'alice'}:/bin/zsh\n"
        f"bob:x:1503:1503:Bob:{homes / 'bob'}:/usr/sbin/nologin\n"          # no login shell
        f"carol:x:1504:1504:Carol:{tmp_path / 'srv' / 'carol'}:/bin/sh\n"   # home elsewhere
        f"dave:x:1505:1505:Dave:{homes / 'dave'}:/bin/sh\n"
        "broken line\n")
    options = {"file_events": {"enabled": False}, "on_access": {"enabled": False},
               "anti_ransom": {"enabled": True, "passwd": str(passwd),
                               "homes": [str(root_home), str(homes)], "status_first": 0}}
    dirs = {"root": root_home / DECOY_DIR, "alice": homes / "alice" / DECOY_DIR,
            "dave": homes / "dave" / DECOY_DIR}
    return options, dirs


def test_decoys_are_placed_for_login_users_under_the_homes_owned_by_them(tmp_path, tools):
    options, dirs = users(tmp_path)
    with tools.monitoring(options):
        for name, directory in dirs.items():
            assert sorted(os.listdir(directory)) == sorted(CONTENTS)
            owner = {"root": 0, "alice": 1501, "dave": 1505}[name]
            assert os.stat(directory).st_uid == owner
            for decoy, content in CONTENTS.items():
                st = os.stat(directory / decoy)
                assert (st.st_uid, (directory / decoy).read_bytes()) == (owner, content)
        assert (dirs["alice"] / "0_elkeid_hids_anti_ransom.png").read_bytes().startswith(b"\x89PNG")
        assert (dirs["alice"] / "0_elkeid_hids_anti_ransom.pdf").read_bytes().startswith(b"%PDF-")
        assert not (tmp_path / "home" / "bob" / DECOY_DIR).exists()
        assert not (tmp_path / "srv" / "carol" / DECOY_DIR).exists()
    assert not any(d.exists() for d in dirs.values())  # a stopped scanner leaves no decoys


def test_a_write_to_a_decoy_gives_a_ransom_event_naming_the_writer(tmp_path, tools):
    options, dirs = users(tmp_path)
    decoy = dirs["alice"] / "0_elkeid_hids_anti_ransom.doc"
    with tools.monitoring(options) as monitor:
        status = monitor.wait_for(lambda: monitor.kinds("ransom_status"))
        with tools.write_file(decoy, b"encrypted!") as writer:
            [record] = monitor.wait_for(lambda: monitor.kinds(RANSOM_EVENT))
    assert status[0].facts == {"status": "on"}
    assert record.target.path == writer.exe
    assert record.target.pid == writer.pid and record.target.origin == "ransomware"
    assert record.facts["file_path"] == str(decoy)
    assert record.facts["file_mask"] == "8"
    assert record.facts["pid"] == writer.pid and record.facts["comm"] == "sh"
    assert not record.detections  # a clean writer is still reported


def test_off_removes_every_decoy_it_made_and_nothing_else(tmp_path, tools):
    options, dirs = users(tmp_path)
    theirs = tmp_path / "home" / "dave" / DECOY_DIR
    theirs.mkdir()  # dave already had this directory, with a file of a decoy's name
    (theirs / "0_elkeid_hids_anti_ransom.txt").write_text("dave's own notes\n")
    with tools.monitoring(options) as monitor:
        (dirs["alice"] / "mine.txt").write_text("alice keeps this\n")
        caller = threading.Thread(target=monitor.source.anti_ransom, args=(False,))
        caller.start()  # the transport calls from its own thread
        caller.join()
        assert not dirs["root"].exists()
        assert os.listdir(dirs["alice"]) == ["mine.txt"]
        assert os.listdir(theirs) == ["0_elkeid_hids_anti_ransom.txt"]
        assert (theirs / "0_elkeid_hids_anti_ransom.txt").read_text() == "dave's own notes\n"
        assert not monitor.source.ransom_on


def test_reset_restores_decoys_and_off_then_on_places_them_again(tmp_path, tools):
    options, dirs = users(tmp_path)
    decoy = dirs["root"] / "0_elkeid_hids_anti_ransom.csv"
    with tools.monitoring(options) as monitor:
        decoy.unlink()
        monitor.source.reset_honeypots()
        assert decoy.read_bytes() == CONTENTS[decoy.name]
        monitor.source.anti_ransom(False)
        assert not decoy.exists()
        monitor.source.reset_honeypots()  # off: nothing to reset
        assert not decoy.exists()
        monitor.source.anti_ransom(True)
        assert decoy.read_bytes() == CONTENTS[decoy.name]
    assert not monitor.kinds(RANSOM_EVENT)  # its own writes are never events


def test_an_unreadable_user_list_is_reported_and_the_rest_keeps_working(tmp_path, tools, caplog):
    options, _ = users(tmp_path)
    options["anti_ransom"]["passwd"] = str(tmp_path / "missing-passwd")
    watched = tmp_path / "bin"
    watched.mkdir()
    options["file_events"] = {"profile": "none", "directories": [str(watched)]}
    with tools.monitoring(options) as monitor:
        assert monitor.session.summary.errors == 1
        missing = tmp_path / "missing-passwd"
        assert f"cannot read the user list {missing}: No such file or directory" in caplog.text
        with tools.write_file(watched / "x", b"x"):
            monitor.wait_for(lambda: monitor.kinds("file_event"))


def test_the_controls_need_a_running_source(tmp_path, tools):
    import pytest

    from elkscan_core import ComponentError

    options, _ = users(tmp_path)
    with tools.monitoring(options) as monitor:
        pass
    with pytest.raises(ComponentError, match="not running"):
        monitor.source.anti_ransom(True)


def test_decoys_left_by_a_crashed_run_are_removed_by_the_next_one(tmp_path):
    from elkscan_fanotify_source.decoys import Decoys

    options, dirs = users(tmp_path)
    ransom = options["anti_ransom"]
    manifest = str(tmp_path / "state" / "fanotify-decoys.json")
    placed, problems = Decoys(ransom["passwd"], ransom["homes"], manifest).place()
    assert sorted(placed) == sorted(str(d) for d in dirs.values()) and not problems
    # a new process (after a crash, nothing was cleaned up) reads what the last one made
    assert Decoys(ransom["passwd"], ransom["homes"], manifest).remove() == []
    assert not any(d.exists() for d in dirs.values())
    assert not os.path.exists(manifest)


def test_a_user_cannot_turn_decoy_upkeep_against_other_files(tmp_path, tools):
    options, dirs = users(tmp_path)
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "0_elkeid_hids_anti_ransom.csv").write_text("not a decoy\n")
    with tools.monitoring(options) as monitor:
        decoy = dirs["alice"] / "0_elkeid_hids_anti_ransom.txt"
        decoy.unlink()
        os.link(victim, decoy)  # a hard link to someone else's file where a decoy was
        monitor.source.reset_honeypots()
        assert victim.read_text() == "precious\n" and os.stat(victim).st_uid == 0
        assert decoy.read_bytes() == CONTENTS[decoy.name]
        for name in os.listdir(dirs["dave"]):
            (dirs["dave"] / name).unlink()
        dirs["dave"].rmdir()
        dirs["dave"].symlink_to(outside)  # the decoy directory swapped for a link elsewhere
        monitor.source.anti_ransom(False)
    assert (outside / "0_elkeid_hids_anti_ransom.csv").read_text() == "not a decoy\n"
    assert victim.read_text() == "precious\n"


NOBODY = 65534


def victims(tmp_path) -> dict:
    """What root must never delete: a password file, and files and a directory shaped like decoys
    (where elkscan puts them, with a decoy's name, content and owner), so only the manifest's trust
    check stands between them and root's removal."""
    shadow = tmp_path / "etc" / "shadow"
    shadow.parent.mkdir()
    shadow.write_text("root:$6$secret:19000:0:99999:7:::\n")
    shaped = tmp_path / "srv" / DECOY_DIR
    shaped.mkdir(parents=True)
    lookalike = shaped / "0_elkeid_hids_anti_ransom.txt"
    lookalike.write_bytes(CONTENTS[lookalike.name])
    empty = tmp_path / "opt" / DECOY_DIR
    empty.mkdir(parents=True)
    return {"files": [shadow, lookalike], "dirs": [empty]}


def plant_manifest(manifest, targets: dict) -> None:
    """A manifest listing ``targets`` as decoys root made, with their real digests and owners."""
    manifest.write_text(json.dumps({
        "files": [{"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "uid": 0}
                  for p in targets["files"]],
        "dirs": [str(d) for d in targets["dirs"]]}))


@pytest.mark.parametrize("untrusted", ["state dir owned by nobody", "state dir in a 0777 directory",
                                       "manifest owned by nobody"])
def test_a_manifest_another_user_could_write_makes_root_delete_nothing(tmp_path, tools, monkeypatch,
                                                                       caplog, untrusted):
    """nobody lists files in the decoy manifest (e.g. ``sudo -E`` kept their HOME, so the state
    directory is theirs); turning the decoys off used to make root delete every one of them."""
    options, dirs = users(tmp_path)
    targets = victims(tmp_path)
    if untrusted == "state dir in a 0777 directory":
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)  # not sticky: nobody can rename our state directory and put theirs there
        state = shared / "state"
        monkeypatch.setenv("ELKSCAN_STATE_DIR", str(state))
    else:
        state = tmp_path / "state"
    state.mkdir(mode=0o700)
    manifest = state / "fanotify-decoys.json"
    plant_manifest(manifest, targets)
    if untrusted == "state dir owned by nobody":
        os.chown(state, NOBODY, NOBODY)
    if untrusted != "state dir in a 0777 directory":
        os.chown(manifest, NOBODY, NOBODY)
    planted = manifest.read_bytes()
    with tools.monitoring(options) as monitor:
        assert all(sorted(os.listdir(d)) == sorted(CONTENTS) for d in dirs.values())
        monitor.source.anti_ransom(False)
    for path in targets["files"]:
        assert path.exists(), f"root deleted {path}"
    assert targets["files"][0].read_text() == "root:$6$secret:19000:0:99999:7:::\n"
    assert targets["dirs"][0].is_dir()
    assert not any(d.exists() for d in dirs.values())  # this run's own decoys still go
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].startswith("decoy manifest ") and str(state) in refused[0]
    if untrusted != "manifest owned by nobody":  # nothing is written where another user could change it
        assert manifest.read_bytes() == planted
        assert "not recording the decoys: state directory" in caplog.text


def test_decoys_are_deleted_only_while_they_are_what_was_placed(tmp_path, tools):
    """A user replaces their decoys with a link to a root file, a hard link to one with a decoy's
    content, or a file of their own, and swaps a decoy directory for a link: turning the decoys off
    deletes none of these (nor what they point to), only the decoys still as placed."""
    options, dirs = users(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = outside / "0_elkeid_hids_anti_ransom.txt"  # root's, with a decoy's exact content
    victim.write_bytes(CONTENTS[victim.name])
    twin = outside / "0_elkeid_hids_anti_ransom.csv"
    twin.write_bytes(CONTENTS[twin.name])
    alice = dirs["alice"]
    with tools.monitoring(options) as monitor:
        swapped = {name: alice / f"0_elkeid_hids_anti_ransom.{name}" for name in ("txt", "csv", "doc")}
        for path in swapped.values():
            path.unlink()
        swapped["txt"].symlink_to(victim)
        os.link(twin, swapped["csv"])
        swapped["doc"].write_text("alice's own document\n")
        os.chown(swapped["doc"], 1501, 1502)
        for name in os.listdir(dirs["dave"]):
            (dirs["dave"] / name).unlink()
        dirs["dave"].rmdir()
        dirs["dave"].symlink_to(outside)
        errors = monitor.session.summary.errors
        monitor.source.anti_ransom(False)
        # one line each: alice's three, her directory (kept: not empty), dave's six and his directory
        assert monitor.session.summary.errors - errors == 3 + 1 + 6 + 1
        assert sorted(os.listdir(alice)) == sorted(p.name for p in swapped.values())
        assert os.readlink(swapped["txt"]) == str(victim)
        assert os.path.samefile(swapped["csv"], twin)
        assert swapped["doc"].read_text() == "alice's own document\n"
        assert victim.read_bytes() == CONTENTS[victim.name] and twin.read_bytes() == CONTENTS[twin.name]
        assert sorted(os.listdir(outside)) == [twin.name, victim.name]
        assert not dirs["root"].exists()
    manifest = json.loads((tmp_path / "state" / "fanotify-decoys.json").read_text())
    assert manifest == {"files": [], "dirs": [str(alice)]}  # what is not a decoy any more is forgotten


def test_a_trusted_manifest_still_never_makes_root_delete_what_is_not_a_decoy(tmp_path):
    """Defence in depth: even a manifest root wrote (an old one, a restored backup) that lists other
    files deletes nothing but decoys where decoys are placed."""
    from elkscan_fanotify_source.decoys import Decoys

    options, _ = users(tmp_path)
    targets = victims(tmp_path)
    (tmp_path / "state").mkdir()
    manifest = tmp_path / "state" / "fanotify-decoys.json"
    plant_manifest(manifest, {"files": targets["files"][:1], "dirs": [tmp_path / "opt"]})
    ransom = options["anti_ransom"]
    problems = Decoys(ransom["passwd"], ransom["homes"], str(manifest)).remove()
    assert targets["files"][0].exists() and (tmp_path / "opt").is_dir()
    assert problems == [f"{targets['files'][0]} is not where elkscan places decoys: left alone",
                        f"{tmp_path / 'opt'} is not where elkscan places decoys: left alone"]


def test_a_manifest_that_is_a_link_or_damaged_is_refused_with_one_warning(tmp_path, caplog):
    from elkscan_fanotify_source.decoys import Decoys

    options, _ = users(tmp_path)
    targets = victims(tmp_path)
    listing = tmp_path / "listing.json"  # root's own file, trusted: only the link is wrong
    plant_manifest(listing, {"files": targets["files"][1:], "dirs": []})
    (tmp_path / "state").mkdir()
    manifest = tmp_path / "state" / "fanotify-decoys.json"
    manifest.symlink_to(listing)
    ransom = options["anti_ransom"]
    assert Decoys(ransom["passwd"], ransom["homes"], str(manifest)).remove() == []
    assert not os.path.lexists(manifest) and listing.exists()  # the link goes, not what it names
    manifest.write_text('{"files": ["/etc/shadow"], "dirs": []}')  # not a list of entries
    assert Decoys(ransom["passwd"], ransom["homes"], str(manifest)).remove() == []
    assert targets["files"][1].exists()
    assert [r.getMessage().split("(")[1].split(")")[0] for r in caplog.records] == [
        "Too many levels of symbolic links", "not a decoy manifest "]


@settings(max_examples=400, deadline=None)  # 400 examples per run
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["files", "dirs", "path", "sha256", "uid", "x"]), inner, max_size=4),
    max_leaves=20).map(lambda value: json.dumps(value).encode())))
def test_parse_manifest_takes_a_manifest_or_says_it_is_damaged(data):
    from elkscan_fanotify_source.decoys import Made, parse_manifest

    try:
        files, dirs = parse_manifest(data)
    except ValueError:
        return
    assert all(isinstance(p, str) and isinstance(m, Made) and type(m.uid) is int for p, m in files.items())
    assert all(isinstance(d, str) and d.startswith("/") for d in dirs)
