"""6050: the rule database update from mirrors on a loopback HTTP server, and start-up loading."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import secrets
import socket
import threading
import time

import pytest

bundles = pytest.importorskip("elkscan_core.bundle")

VERSION = "20261124.1"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def make_bundle(tmp_path, marker: str):
    """A bundle whose YARA rule flags files holding ``marker`` (built with the project's own builder)."""
    rule = tmp_path / "update.yar"
    rule.write_text('rule Linux_Test_UpdateMarker { strings: $m = "%s" condition: $m }\n' % marker)
    out = tmp_path / "built" / "db.zip"
    out.parent.mkdir()
    bundles.build_bundle(out, version=VERSION, yara=[rule])
    return out.read_bytes()


def publish(root, name: str, archive: bytes | None, sign: str | None) -> None:
    (root / name).mkdir()
    if archive is not None:
        (root / name / "db.zip").write_bytes(archive)
    if sign is not None:
        (root / name / "db.sign").write_text(sign + "\n")


def test_6050_tries_mirrors_verifies_sign_reloads_and_keeps_the_new_name(start_agent, plugin_dir, mirror, tmp_path):
    root, base = mirror
    marker = "ELKSCAN-UPDATE-" + secrets.token_hex(8)
    archive = make_bundle(tmp_path, marker)
    good_sign = hashlib.sha256(archive).hexdigest()
    publish(root, "good", archive, good_sign)
    publish(root, "bad", archive, "0" * 64)
    publish(root, "nosign", archive, None)
    sample = tmp_path / "marked.txt"
    sample.write_text(f"some text with {marker} inside\n")

    agent = start_agent()
    agent.send(6053, {"exe": str(sample)}, token="before")
    agent.done("before")
    assert [r.fields["types"] for r in agent.records if r.data_type == 6003] == ["not_detected"]

    failing = {"version": VERSION, "url": [f"{base}/missing/db", f"{base}/bad/db", f"{base}/nosign/db"],
               "sha256": good_sign, "passwd": bundles.DEFAULT_PASSWORD}
    agent.send(6050, failing, token="u1")
    agent.send(6050, {**failing, "url": [f"{base}/good/db"], "sha256": "1" * 64}, token="u2")  # task hash wrong
    agent.send(6050, {**failing, "url": [f"{base}/bad/db", f"{base}/good/db"]}, token="u3")
    # As Elkeid, every 6050 that parses gets its 6010, success or not: the task's version and sha256.
    updates = agent.wait_for(lambda rs: sum(r.data_type == 6010 for r in rs) >= 3)
    assert sorted(r.fields["exe_hash"] for r in updates if r.data_type == 6010) == sorted(
        [good_sign, "1" * 64, good_sign])
    assert all(r.fields == {"version": VERSION, "exe_hash": r.fields["exe_hash"]} for r in updates
               if r.data_type == 6010)
    agent.wait_for(lambda rs: sum(r.data_type == 1010 and "task 6050" in r.fields["msg"] for r in rs) >= 2)
    logs = " | ".join(agent.logs())
    assert "missing/db.zip: HTTP 404" in logs
    assert f"bad/db.zip has SHA-256 {good_sign}, its .sign says {'0' * 64}" in logs
    assert "nosign/db.sign: HTTP 404" in logs
    assert f"the task expects {'1' * 64}" in logs

    agent.send(6053, {"exe": str(sample)}, token="after")
    agent.done("after")
    result = [r for r in agent.records if r.data_type == 6003 and r.fields["token"] == "after"][0]
    assert (result.fields["types"], result.fields["class"], result.fields["name"]) == ("Linux", "Test", "UpdateMarker")
    stored = plugin_dir.workdir / "tmp" / "db.zip"  # Elkeid's name: the first mirror URL's last segment
    assert stored.read_bytes() == archive
    state = json.loads((plugin_dir.workdir / "tmp" / "archive_db.json").read_text())
    assert (state["version"], state["archive"]) == (VERSION, "db.zip")
    assert agent.close() == 0

    again = start_agent()  # a restart loads the archive the update installed
    again.send(6053, {"exe": str(sample)}, token="restart")
    again.done("restart")
    assert [r.fields["types"] for r in again.records if r.data_type == 6003] == ["Linux"]
    assert again.close() == 0


def test_a_database_that_cannot_be_loaded_is_reported_and_the_one_in_use_is_loaded(start_agent, tmp_path):
    from elkscan_core.testing import SAMPLES
    sample = tmp_path / "eicar.com"
    sample.write_bytes(SAMPLES["eicar.com"][0])
    agent = start_agent(detail=json.dumps({"version": "19990101"}))
    agent.send(6053, {"exe": str(sample)}, token="t")
    agent.done("t")
    assert any("rule database 19990101 (from DETAIL) not loaded" in m
               and "archive_db_default_19990101.zip does not exist" in m for m in agent.logs())
    assert [r.fields["types"] for r in agent.records if r.data_type == 6003] == ["Multios"]
    assert agent.close() == 0


def test_a_detail_that_is_not_json_is_reported_and_the_shipped_database_still_loads(start_agent, plugin_dir):
    agent = start_agent(detail="version=1")
    agent.wait_for(lambda rs: any(r.data_type == 1010 for r in rs))
    assert any("DETAIL is not JSON" in m for m in agent.logs())
    assert agent.close() == 0
    shipped = json.loads((plugin_dir.workdir / "tmp" / "archive_db.json").read_text())["version"]
    assert f"rule database {shipped} loaded" in (plugin_dir.workdir / "scanner.log").read_text()


class Drip:
    """A loopback HTTP server that answers every request one byte a second: the headers, or (when
    ``headers_first``) a 200 with Content-Length 1,000,000 and then the body."""

    def __init__(self, headers_first: bool) -> None:
        self.headers_first = headers_first
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
            try:
                if self.headers_first:
                    conn.sendall(head)
                for byte in (b"x" * 1000000 if self.headers_first else head):
                    if self.stop.wait(1):
                        return
                    conn.sendall(bytes((byte,)))
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.mark.parametrize("headers_first", [True, False], ids=["dripping-body", "dripping-headers"])
def test_a_dripping_mirror_is_given_up_at_the_deadline_of_the_whole_download(headers_first):
    from elkscan_elkeid_transport.database import DatabaseError, download
    drip = Drip(headers_first)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseError, match=r"not complete after 1\.5 s \(\d+ bytes received\)"):
            download(f"{drip.url}/db.zip", timeout=1.5, limit=1 << 20)
    finally:
        drip.close()
    assert time.monotonic() - started < 10


def test_a_dripping_mirror_ends_its_6050_by_the_deadline_and_the_next_6050_is_not_blocked(
        start_agent, plugin_dir, mirror, tmp_path):
    """Audit F16: download_timeout bounded each read, so 1 byte/s held the update lock for 11 days."""
    root, base = mirror
    archive = make_bundle(tmp_path, "ELKSCAN-DRIP-" + secrets.token_hex(8))
    sign = hashlib.sha256(archive).hexdigest()
    publish(root, "good", archive, sign)
    drip = Drip(headers_first=True)
    plugin_dir.configure(download_timeout="2s")
    try:
        agent = start_agent()
        started = time.monotonic()
        agent.send(6050, {"version": VERSION, "url": [f"{drip.url}/db"], "sha256": sign}, token="drip")
        agent.send(6050, {"version": VERSION, "url": [f"{base}/good/db"], "sha256": sign}, token="good")
        records = agent.wait_for(lambda rs: sum(r.data_type == 6010 for r in rs) >= 2, timeout=30)
        assert [r.fields for r in records if r.data_type == 6010] == [{"version": VERSION, "exe_hash": sign}] * 2
        assert time.monotonic() - started < 20
        assert any("task 6050" in m and f"{drip.url}/db.zip: not complete after 2 s" in m for m in agent.logs())
        assert agent.close() == 0
    finally:
        drip.close()


def marker_bundle(tmp_path, name: str, version: str, marker: str, yara: str) -> bytes:
    """A bundle whose ClamAV signature Txt.Test.Marker-1 flags ``marker``, with ``yara`` as its YARA file
    (written directly: the builder refuses YARA that does not compile)."""
    out = tmp_path / name / "db.zip"
    bundles._write_zip(out, {"version": f"{version}\n".encode(),
                             "main.ndb": f"Txt.Test.Marker-1:0:*:{marker.encode().hex()}\n".encode(),
                             f"online_{version}.yar": yara.encode()}, bundles.DEFAULT_PASSWORD)
    return out.read_bytes()


@pytest.mark.parametrize("shipped", [True, False], ids=["over-the-shipped-database", "over-the-engines-own-rules"])
def test_a_6050_that_one_engine_refuses_is_installed_in_none(start_agent, plugin_dir, mirror, tmp_path, shipped):
    """Audit F14: clamd took the new signatures, YARA refused its file, the task said failed, and the
    new ClamAV signature went on detecting (until a restart silently reverted it)."""
    root, base = mirror
    marker = "ELKSCAN-MIXED-" + secrets.token_hex(8)
    broken = marker_bundle(tmp_path, "broken", "mixed_v2", marker, "rule broken { condition: nope }\n")
    good = marker_bundle(tmp_path, "good", "good_v3", marker, "rule Linux_Test_Fine { condition: false }\n")
    publish(root, "broken", broken, hashlib.sha256(broken).hexdigest())
    publish(root, "good", good, hashlib.sha256(good).hexdigest())
    sample = tmp_path / "marked.txt"
    sample.write_text(f"text with {marker} inside\n")
    plugin_dir.configure(clamav=True)
    state = plugin_dir.workdir / "tmp" / "archive_db.json"
    if not shipped:
        state.unlink()  # no database: the engines run their own rules
    before = state.read_text() if shipped else None

    def verdict(agent, token: str) -> str:
        agent.send(6053, {"exe": str(sample)}, token=token)
        agent.done(token, timeout=60)
        (result,) = [r for r in agent.records if r.data_type == 6003 and r.fields["token"] == token]
        return result.fields["types"]

    agent = start_agent()
    assert verdict(agent, "before") == "not_detected"
    agent.send(6050, {"version": "mixed_v2", "url": [f"{base}/broken/db"]}, token="mixed")
    agent.wait_for(lambda rs: any("task 6050" in m for m in agent.logs()), timeout=120)
    (failure,) = [m for m in agent.logs() if "task 6050" in m]
    assert "not every engine took the new rules (yara: " in failure and "every engine is back on" in failure
    assert verdict(agent, "after-mixed") == "not_detected"  # clamd is back on the old signatures
    assert [r.fields for r in agent.records if r.data_type == 6010] == [{"version": "mixed_v2", "exe_hash": ""}]
    assert (state.read_text() if shipped else None) == before  # names the version that runs
    assert not (plugin_dir.workdir / "tmp" / "db.zip").exists()
    # the same signature in a bundle every engine takes is detected: clamd really was switched back
    agent.send(6050, {"version": "good_v3", "url": [f"{base}/good/db"]}, token="good")
    agent.wait_for(lambda rs: any(r.data_type == 6010 and r.fields["version"] == "good_v3" for r in rs), timeout=120)
    assert verdict(agent, "after-good") == "Txt"
    assert json.loads(state.read_text())["version"] == "good_v3"
    assert agent.close() == 0


def test_a_database_detail_names_is_fetched_at_start_kept_encrypted_only_and_not_fetched_twice(
        start_agent, plugin_dir, mirror, tmp_path):
    """Audit #15/#16: DETAIL was only ever loaded, never fetched, under a name of elkscan's own; the
    extracted rules stayed on disk for the plugin's life; every 6050 downloaded again."""
    root, base = mirror
    marker = "ELKSCAN-DETAIL-" + secrets.token_hex(8)
    archive = make_bundle(tmp_path, marker)
    sign = hashlib.sha256(archive).hexdigest()
    stem = f"archive_db_default_{VERSION}"
    (root / "obj").mkdir()
    (root / "obj" / f"{stem}.zip").write_bytes(archive)
    (root / "obj" / f"{stem}.sign").write_text(sign + "\n")
    detail = json.dumps({"version": VERSION, "dbname": stem, "url": [f"{base}/obj/{stem}"], "sha256": sign,
                         "passwd": bundles.DEFAULT_PASSWORD})
    sample = tmp_path / "marked.txt"
    sample.write_text(f"text with {marker} inside\n")

    agent = start_agent(detail=detail)
    agent.send(6053, {"exe": str(sample)}, token="fetched")
    agent.done("fetched", timeout=60)
    assert [r.fields["types"] for r in agent.records if r.data_type == 6003] == ["Linux"]
    tmp = plugin_dir.workdir / "tmp"
    assert (tmp / f"{stem}.zip").read_bytes() == archive  # Elkeid's name: the URL's last segment + .zip
    assert json.loads((tmp / "archive_db.json").read_text())["archive"] == f"{stem}.zip"
    dat = plugin_dir.workdir / "dat"
    assert not dat.exists() or list(dat.iterdir()) == []  # nothing extracted stays on disk
    assert not list((plugin_dir.workdir / "state").rglob("*.yarc"))  # nor a compiled copy of its rules
    # the same version and SHA-256 again: not fetched (this mirror would fail), answered with its 6010
    agent.send(6050, {"version": VERSION, "url": [f"{base}/gone/{stem}"], "sha256": sign}, token="again")
    agent.wait_for(lambda rs: any(r.data_type == 6010 for r in rs))
    assert not [m for m in agent.logs() if "6050" in m]
    assert agent.close() == 0
    assert "already in use; not fetched again" in (plugin_dir.workdir / "scanner.log").read_text()

    (root / "obj" / f"{stem}.zip").unlink()  # the mirror is gone: a restart loads the stored archive
    again = start_agent(detail=detail)
    again.send(6053, {"exe": str(sample)}, token="stored")
    again.done("stored", timeout=60)
    assert [r.fields["types"] for r in again.records if r.data_type == 6003] == ["Linux"]
    assert again.close() == 0
