"""clamd dying mid-scan, an external clamd going away, and rule reloads (the Elkeid 6050 path)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from elkscan_clamav_backend.protocol import ClamdUnavailable


def _in_flight(engine, scan, path):
    """Start a scan on a thread; returns (thread, result dict)."""
    result: dict = {}

    def work():
        try:
            result["found"] = scan(engine, path)
        except Exception as exc:  # the test asserts on it
            result["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    return thread, result


def test_clamd_killed_mid_scan_is_restarted_and_the_file_retried(engine_factory, test_database,
                                                                  sample_files, scan, signatures):
    engine = engine_factory({"managed": True, "database": str(test_database)})
    daemon = engine.daemon
    first_pid = daemon.pid
    os.kill(first_pid, signal.SIGSTOP)  # the scan connects and waits for an answer that never comes
    thread, result = _in_flight(engine, scan, sample_files["eicar"])
    time.sleep(0.2)  # let it reach clamd's queue; killed earlier, it is refused, and retried all the same
    os.kill(first_pid, signal.SIGKILL)
    thread.join(60)
    assert result == {"found": [signatures["eicar"] + ".UNOFFICIAL"]}
    assert daemon.restarts == 1 and daemon.pid != first_pid
    assert "clamd exited with status -9" in daemon.last_error
    assert scan(engine, sample_files["logical"]) == [signatures["logical"] + ".UNOFFICIAL"]


def test_file_is_reported_as_an_error_when_clamd_cannot_come_back(engine_factory, test_database, tmp_path,
                                                                   sample_files, scan):
    engine = engine_factory({"managed": True, "database": str(test_database), "restart_timeout": "3s"})
    daemon = engine.daemon
    with open(os.path.join(daemon.database_dir, "zz-broken.ndb"), "w") as handle:
        handle.write("Unix.Test.Broken-1:0:*:zz\n")  # the next start fails to load
    pid = daemon.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ClamdUnavailable) as excinfo:
        scan(engine, sample_files["eicar"])
    message = str(excinfo.value)
    assert "has not come back within 3s" in message and "Malformed database" in message


def test_external_clamd_through_socket(engine_factory, test_database, sample_files, scan, signatures):
    owner = engine_factory({"managed": True, "database": str(test_database)})
    for mode in ("fildes", "instream", "path"):
        client = engine_factory({"socket": owner.daemon.socket_path, "mode": mode})
        assert scan(client, sample_files["md5"]) == [signatures["md5"] + ".UNOFFICIAL"]
    assert client.version() == owner.version().split(" rules ")[0]
    with pytest.raises(RuntimeError, match="external clamd"):
        client.reload({"clamav": [str(test_database / "test.ndb")]})
    owner.close()  # the external clamd goes away: each file becomes an error, none is passed as clean
    with pytest.raises(ClamdUnavailable, match="failed twice"):
        scan(client, sample_files["eicar"])


def test_reload_switches_rules_and_keeps_old_ones_on_failure(engine_factory, test_database, tmp_path,
                                                             sample_files, scan, signatures):
    engine = engine_factory({"managed": True, "database": str(test_database)})
    before = engine.version()
    fresh = tmp_path / "fresh.ndb"
    fresh.write_text(f"Unix.Test.Fresh-1:0:*:{b'elkscan-logical-'.hex()}\n")
    engine.reload({"clamav": [str(fresh)], "yara": ["/ignored.yar"]})
    assert scan(engine, sample_files["logical-lookalike"]) == ["Unix.Test.Fresh-1.UNOFFICIAL"]
    assert scan(engine, sample_files["eicar"]) == []  # the old database is gone
    assert engine.version() != before

    broken = tmp_path / "broken.ndb"
    broken.write_text("Unix.Test.Broken-1:0:*:zz\n")
    with pytest.raises(RuntimeError, match="keeps the old one"):
        engine.reload({"clamav": [str(broken)]})
    assert scan(engine, sample_files["logical-lookalike"]) == ["Unix.Test.Fresh-1.UNOFFICIAL"]
    # A restart loads what clamd runs (and the canary a restarted clamd must detect).
    assert sorted(os.listdir(engine.daemon.database_dir)) == ["elkscan-canary.ndb", "fresh.ndb"]
    everything = tmp_path / "everything.ndb"  # flags plain text: the clean canary comes back FOUND
    everything.write_text(f"Unix.Test.PlainText-1:0:*:{b'plain text'.hex()}\n")
    with pytest.raises(RuntimeError, match="judges wrongly with the new database .*clean buffer came back "
                                           "Unix.Test.PlainText-1.UNOFFICIAL FOUND.*old one is loaded again"):
        engine.reload({"clamav": [str(everything)]})
    assert scan(engine, sample_files["logical-lookalike"]) == ["Unix.Test.Fresh-1.UNOFFICIAL"]
    assert sorted(os.listdir(engine.daemon.database_dir)) == ["elkscan-canary.ndb", "fresh.ndb"]
    # a bundle without ClamAV files puts the configured database back, as a restart with that bundle
    # would (and how an update another engine refused is undone)
    engine.reload({})
    assert scan(engine, sample_files["logical-lookalike"]) == []
    assert scan(engine, sample_files["eicar"]) != []
    assert engine.version() == before


def test_remote_clamd_over_tcp_gets_instream(clamd_binary, engine_factory, test_database, tmp_path,
                                             sample_files, scan, signatures):
    """A clamd reached by host:port (here on loopback) cannot open our files or take descriptors."""
    import shutil
    import socket

    from elkscan_core import ComponentError
    from elkscan_clamav_backend.daemon import ManagedClamd

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = tmp_path / "db"
    shutil.copytree(test_database, database)
    remote = ManagedClamd(clamd_binary, str(tmp_path), str(database),
                          {"TCPSocket": port, "TCPAddr": "127.0.0.1"}, startup_timeout=60, timeout=30)
    remote.start()
    try:
        engine = engine_factory({"socket": f"127.0.0.1:{port}", "trust_network": True})  # tests run as root
        assert engine.mode == "instream"
        assert scan(engine, sample_files["eicar"]) == [signatures["eicar"] + ".UNOFFICIAL"]
        with pytest.raises(ComponentError, match="mode: fildes passes descriptors over a Unix socket"):
            engine_factory({"socket": f"127.0.0.1:{port}", "mode": "fildes", "trust_network": True})
    finally:
        remote.stop()


def test_reload_from_an_opened_bundle(engine_factory, tmp_path, sample_files, scan):
    """What the Elkeid transport does on a 6050 update: open the new bundle, reload every engine."""
    from elkscan_core.bundle import build_bundle, open_bundle

    engine = engine_factory({"managed": True})  # the project's own signatures
    assert scan(engine, sample_files["logical"]) == []
    rules = tmp_path / "update.ldb"
    rules.write_text(f"Unix.Test.Update-2;Engine:51-255,Target:0;0;{b'elkscan-logical-'.hex()}\n")
    report = build_bundle(tmp_path / "archive_db_default_2.zip", version="2", clamav=[rules])
    bundle = open_bundle(report.path, password="clamav_default_passwd", version="2", sha256=report.sha256,
                         dest=tmp_path / "dat")
    engine.reload(bundle.rules)
    assert scan(engine, sample_files["logical"]) == ["Unix.Test.Update-2.UNOFFICIAL"]
