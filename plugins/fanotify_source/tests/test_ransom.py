"""Anti-ransomware: decoys for a temporary passwd-style user list, ransom events, on/off/reset."""

from __future__ import annotations

import os
import threading

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
