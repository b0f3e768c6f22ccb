"""The clamav engine against a real clamd: detection by every mode, limits, failures and recovery."""

from __future__ import annotations

import os
import stat
from importlib.metadata import entry_points

import pytest

from elkscan_core import ComponentError, ConfigError, Target
from elkscan_core.components import Subject
from elkscan_core.model import NotScanned
from elkscan_core.registry import Registry
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.testing import eicar
from elkscan_clamav_backend.protocol import ClamdError


def test_entry_point_registers_the_clamav_engine():
    names = {ep.name: ep.value for ep in entry_points(group="elkscan")}
    assert names["clamav_backend"] == "elkscan_clamav_backend.plugin"
    registry = Registry.from_plugins(make_plugin_manager(["clamav_backend"]))
    assert registry.get("engine", "clamav").__name__ == "ClamavEngine"


@pytest.mark.parametrize("mode", ["fildes", "instream", "path"])
@pytest.mark.parametrize("kind", ["eicar", "logical", "md5", "yara"])
def test_detects_each_signature_type_in_each_mode(engine_factory, test_database, sample_files, scan,
                                                   signatures, mode, kind):
    engine = engine_factory({"managed": True, "database": str(test_database), "mode": mode})
    assert scan(engine, sample_files[kind]) == [signatures[kind] + ".UNOFFICIAL"]


@pytest.mark.parametrize("name", ["logical-lookalike", "md5-lookalike"])
def test_lookalikes_are_clean(managed_engine, sample_files, scan, name):
    assert scan(managed_engine, sample_files[name]) == []


def test_detection_names_split_the_elkeid_way(managed_engine, sample_files, scan):
    (found,) = scan(managed_engine, sample_files["logical"], detections=True)
    assert (found.engine, found.types, found.class_, found.name) == ("clamav", "Unix", "Test", "LogicalPair-1")
    (rule,) = scan(managed_engine, sample_files["yara"], detections=True)
    assert (rule.types, rule.class_, rule.name) == ("Unix", "Test", "YaraMarker")


def test_fildes_scans_a_file_clamd_could_not_open_by_name(managed_engine, tmp_path, scan, signatures):
    path = tmp_path / "eicar-unreadable"
    path.write_bytes(eicar())
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()  # gone from the filesystem; only the descriptor reaches it
        found = managed_engine.scan(Subject(Target(str(path)), fd, os.fstat(fd)))
    finally:
        os.close(fd)
    assert [d.signature for d in found] == [signatures["eicar"] + ".UNOFFICIAL"]


def test_allmatch_reports_every_signature(engine_factory, test_database, tmp_path, scan, signatures):
    both = tmp_path / "both"
    both.write_bytes(eicar() + b"\n" + b"elkscan-logical-" + b"alpha elkscan-logical-" + b"bravo\n")
    first = engine_factory({"managed": True, "database": str(test_database)})
    every = engine_factory({"managed": True, "database": str(test_database), "allmatch": True})
    assert len(scan(first, both)) == 1
    assert sorted(scan(every, both)) == sorted([signatures["eicar"] + ".UNOFFICIAL",
                                                signatures["logical"] + ".UNOFFICIAL"])


@pytest.mark.parametrize("name", ["plain", "we: ird FOUND", "new\nline: x ERROR", "sp ace"])
def test_path_mode_with_awkward_names_and_symlinks(engine_factory, test_database, tmp_path, scan,
                                                   signatures, name):
    engine = engine_factory({"managed": True, "database": str(test_database), "mode": "path"})
    target = tmp_path / name
    target.write_bytes(eicar())
    link = tmp_path / "link"
    link.symlink_to(target)  # clamd itself would skip a symlink and answer OK; elkscan sends the real path
    assert scan(engine, target) == scan(engine, link) == [signatures["eicar"] + ".UNOFFICIAL"]


def test_path_mode_refuses_a_file_replaced_after_opening(engine_factory, test_database, tmp_path):
    engine = engine_factory({"managed": True, "database": str(test_database), "mode": "path"})
    path = tmp_path / "swapped"
    path.write_bytes(eicar())
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        path.write_bytes(b"harmless")
        with pytest.raises(ClamdError, match="was replaced after it was opened"):
            engine.scan(Subject(Target(str(path)), fd, os.fstat(fd)))
    finally:
        os.close(fd)


def test_version_names_clamd_and_the_rules(managed_engine):
    assert managed_engine.version().startswith("ClamAV ")
    assert " rules " in managed_engine.version() and " options " not in managed_engine.version()


def test_limits_are_the_managed_clamds_scan_settings(managed_engine, engine_factory, test_database):
    assert "MaxScanSize 26214400" in managed_engine.limits() and "AlertExceedsMax yes" in managed_engine.limits()
    assert managed_engine.daemon.runtime_dir not in managed_engine.limits()  # the same from run to run
    elkeid = engine_factory({"managed": True, "database": str(test_database), "parse": ["elf"],
                             "heuristics": False})
    # parse: and heuristics: change what clamd finds: its clean verdicts are kept apart
    assert elkeid.version() != managed_engine.version() and " options " in elkeid.version()
    assert "ScanPE no" in elkeid.limits()


def test_private_runtime_directory_and_socket(managed_engine):
    daemon = managed_engine.daemon
    assert stat.S_IMODE(os.stat(daemon.runtime_dir).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(daemon.socket_path).st_mode)
    config = open(daemon.config_path).read()
    assert "TCPSocket" not in config and "User " not in config
    assert "LocalSocketMode 600" in config


# -- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fildes", "instream"])
def test_file_over_clamds_limit_is_not_scanned_never_clean(engine_factory, test_database, tmp_path, scan, mode):
    engine = engine_factory({"managed": True, "database": str(test_database), "mode": mode,
                             "max_file_size": "1MiB"})
    big = tmp_path / "big"
    big.write_bytes(eicar() + b"\0" * (2 * 1024 * 1024))
    if mode == "fildes":  # clamd's MaxFileSize alert: a limit, the same every time
        with pytest.raises(NotScanned) as excinfo:
            scan(engine, big)
        assert (excinfo.value.reason, excinfo.value.deterministic) == ("above clamav's max_file_size", True)
    else:  # clamd ends the stream (StreamMaxLength) with an error
        with pytest.raises(ClamdError, match="INSTREAM size limit exceeded"):
            scan(engine, big)
    small = tmp_path / "small"
    small.write_bytes(eicar())
    assert scan(engine, small)  # the engine goes on with the next file
    small = tmp_path / "small"
    small.write_bytes(eicar())
    assert scan(engine, small)  # the engine goes on with the next file


# -- start-up failures ---------------------------------------------------------------------------


def test_missing_clamd_binary_is_one_clear_line(engine_factory, test_database):
    engine = engine_factory({"managed": True, "database": str(test_database), "clamd": "/nonexistent/clamd"},
                            start=False)
    with pytest.raises(ComponentError) as excinfo:
        engine.start()
    message = str(excinfo.value)
    assert "\n" not in message
    assert "clamav-daemon" in message and "socket:" in message


def test_database_that_fails_to_load(engine_factory, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.ndb").write_text("Unix.Test.Broken-1:0:*:not-hex-at-all\n")
    engine = engine_factory({"managed": True, "database": str(bad)}, start=False)
    with pytest.raises(ComponentError) as excinfo:
        engine.start()
    message = str(excinfo.value)
    assert "clamd exited" in message and "Malformed database" in message and "broken.ndb" in message
    assert engine._runtime is None  # the private directory is cleaned up


def test_missing_socket_path(engine_factory, tmp_path):
    engine = engine_factory({"socket": str(tmp_path / "no" / "clamd.ctl")}, start=False)
    with pytest.raises(ComponentError) as excinfo:
        engine.start()
    assert "no clamd socket at" in str(excinfo.value) and "clamav-daemon" in str(excinfo.value)


@pytest.mark.parametrize("options, expected", [
    ({"socket": "/run/clamav/clamd.ctl", "managed": True}, "not both"),
    ({"socket": "/run/clamav/clamd.ctl", "database": "/x"}, "applies only to a managed clamd"),
    ({"managed": True, "mode": "fildes", "allmatch": True}, "allmatch needs mode: path"),
    ({"socket": "host:port"}, "expected a Unix socket path or host:port"),
    ({"managed": True, "mode": "telepathy"}, "mode"),
    ({"managed": True, "peer_user": "clamav"}, "peer_user: names the user of a clamd reached through socket"),
    ({"socket": "127.0.0.1:3310", "peer_user": "clamav"}, "a TCP peer cannot be checked"),
    ({"socket": "/run/clamav/clamd.ctl", "trust_network": True}, "applies only to socket: HOST:PORT"),
])
def test_config_errors_name_the_option(engine_factory, options, expected):
    with pytest.raises(ConfigError) as excinfo:
        engine_factory(options, start=False)
    assert expected in str(excinfo.value) and "engines[0].with" in str(excinfo.value)
