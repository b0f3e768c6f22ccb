"""The ``nats`` sink against a real ``nats-server -js`` started by the test (conftest.py): records land
in the stream with their ids; a server killed and restarted in the middle of a scan loses nothing and
stores nothing twice; permanent refusals are dropped and counted; a dead server holds nothing up."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from attrs import frozen

from elkscan_core import Record, Source, hookimpl
from elkscan_core.testing import eicar, run
from elkscan_nats_sink.connection import parse_servers, shown_url, subject_problem

STREAM, SUBJECT = "ELKSCAN", "elkscan.records"


@frozen
class TickerConfig:
    count: int = 100
    every: float = 0.0


class Ticker(Source):
    """``count`` log records, one every ``every`` seconds; the last 10 only once ``gate`` is open."""
    id = "ticker"
    Config = TickerConfig
    gate: threading.Event | None = None

    def targets(self):
        for n in range(self.config.count):
            time.sleep(self.config.every)
            if n == self.config.count - 10 and Ticker.gate is not None:
                assert Ticker.gate.wait(60)
            yield Record(kind="log", facts={"n": n})


class Plugin:
    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Ticker)


def nats(server_url, **options):
    return {"use": "nats", "with": {"servers": server_url, "subject": SUBJECT, "stream": STREAM,
                                    "flush_interval": "50ms", "batch": 20, "timeout": "2s",
                                    "retry": {"initial": "50ms", "max": "200ms"}, **options}}


def scan(tmp_path, sources, sink, **top):
    return run({"plugins": ["nats_sink", "yara_backend"], "engines": ["yara"], "sources": sources,
                "sinks": [sink], "state_dir": str(tmp_path / "state"), **top}, extra_plugins=[Plugin()])


def walk(tree):
    return [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}]


def eicar_tree(tmp_path, count=3):
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    for n in range(count):
        (tree / f"eicar{n}.com").write_bytes(eicar())
    return tree


def test_records_arrive_in_the_stream_with_their_ids(tmp_path, nats_server):
    server = nats_server()
    server.add_stream(STREAM, ["elkscan.>"])
    result = scan(tmp_path, walk(eicar_tree(tmp_path)), nats(server.url))
    stored = server.messages(STREAM)
    assert sorted(msg_id for _, msg_id, _ in stored) == sorted(r.id for r in result.records) and len(stored) == 3
    for subject, msg_id, doc in stored:
        assert subject == SUBJECT and doc["id"] == msg_id and doc["signature"] == "Multios_TestFile_Eicar"
        assert doc["host"] == result.session.host
    sink = result.session.find("sink", "nats")
    assert sink.stats()["delivered"] == 3 and sink.stats()["depth"] == 0 and result.summary.errors == 0


def test_ecs_documents(tmp_path, nats_server):
    server = nats_server()
    server.add_stream(STREAM, [SUBJECT])
    result = scan(tmp_path, walk(eicar_tree(tmp_path, 1)), nats([server.url], format="ecs"))
    ((_, msg_id, doc),) = server.messages(STREAM)
    assert msg_id == result.records[0].id == doc["event"]["id"] and doc["rule"]["name"] == "Multios_TestFile_Eicar"


def test_a_server_killed_in_the_middle_of_a_scan_loses_nothing_and_stores_nothing_twice(tmp_path, nats_server):
    server = nats_server()
    server.add_stream(STREAM, [SUBJECT])
    back = threading.Event()

    def outage():  # once 100 records are stored, kill -9 the server; back on the same port and store 1 s later
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.count(STREAM) < 100:
            time.sleep(0.05)
        server.kill()
        time.sleep(1.0)
        server.start()
        back.set()

    killer = threading.Thread(target=outage)
    killer.start()
    Ticker.gate = back  # the scan is still running when the server comes back
    try:
        result = scan(tmp_path, [{"use": "ticker", "with": {"count": 500, "every": 0.004}}],
                      nats(server.url, timeout="1s"))
    finally:
        Ticker.gate = None
        killer.join()
    sink = result.session.find("sink", "nats")
    assert sink.counters["failed_attempts"] >= 1  # the outage was met
    sent = [r.id for r in result.records]
    stored = [msg_id for _, msg_id, _ in server.messages(STREAM)]
    assert len(set(sent)) == 500 and sorted(stored) == sorted(sent)  # every id once: none lost, none twice
    assert sink.stats()["depth"] == 0 and result.summary.errors == 0 and sink.counters["rejected"] == 0


def long_path_eicar(tree):
    """An EICAR file whose record is over 2 KiB: its path is."""
    deep = tree.joinpath(*[c * 200 for c in "abcdefghijkl"])
    deep.mkdir(parents=True)
    (deep / "eicar-deep.com").write_bytes(eicar())
    return deep / "eicar-deep.com"


@pytest.mark.parametrize("limit", ["server max_payload", "stream max_msg_size"])
def test_a_record_over_the_size_limit_is_refused_dropped_and_counted_and_the_rest_delivered(tmp_path, nats_server,
                                                                                            limit, caplog):
    if limit == "server max_payload":
        conf = tmp_path / "nats.conf"
        conf.write_text("max_payload: 2048\n")
        server = nats_server("-c", str(conf))
        server.add_stream(STREAM, [SUBJECT])
    else:
        server = nats_server()
        server.add_stream(STREAM, [SUBJECT], max_msg_size=2048)
    tree = eicar_tree(tmp_path, 3)
    deep = long_path_eicar(tree)
    result = scan(tmp_path, walk(tree), nats(server.url))
    stored = {doc["path"] for _, _, doc in server.messages(STREAM)}
    assert stored == {str(tree / f"eicar{n}.com") for n in range(3)} and str(deep) in result.detected
    sink = result.session.find("sink", "nats")
    assert sink.counters["rejected"] == 1 and sink.counters["delivered"] == 3 and sink.stats()["depth"] == 0
    assert result.summary.errors == 1  # a record lost for good is an error of the run
    assert "1 record(s) refused by the endpoint, not retried" in caplog.text
    reason = "max_payload (2048 bytes)" if limit == "server max_payload" else "message size exceeds maximum"
    assert reason in caplog.text


def test_records_for_a_subject_no_stream_takes_are_refused(tmp_path, nats_server, caplog):
    server = nats_server()
    server.add_stream("OTHER", ["other.>"])
    result = scan(tmp_path, walk(eicar_tree(tmp_path, 2)), nats(server.url))
    sink = result.session.find("sink", "nats")
    assert sink.counters["rejected"] == 2 and sink.stats()["depth"] == 0 and result.summary.errors == 1
    assert f"no stream takes subject {SUBJECT}" in caplog.text
    assert server.count("OTHER") == 0


def test_a_subject_of_another_stream_is_refused(tmp_path, nats_server, caplog):
    server = nats_server()
    server.add_stream("OTHER", [SUBJECT])
    result = scan(tmp_path, walk(eicar_tree(tmp_path, 1)), nats(server.url))  # expects stream ELKSCAN
    assert result.session.find("sink", "nats").counters["rejected"] == 1
    assert "expected stream does not match" in caplog.text and server.count("OTHER") == 0


def test_a_dead_server_at_start_does_not_hold_the_scan_and_the_next_run_delivers(tmp_path, nats_server):
    tree = eicar_tree(tmp_path, 3)
    # a port that accepts connections and never answers (a hung server), then one that refuses them
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        started = time.monotonic()
        first = scan(tmp_path, walk(tree), nats(f"127.0.0.1:{hung.getsockname()[1]}", timeout="1s"))
        assert time.monotonic() - started < 15  # bounded by timeout, not by the server
    sink = first.session.find("sink", "nats")
    assert sink.stats()["depth"] == 3 and sink.counters["failed_attempts"] >= 1 and first.summary.errors == 0
    server = nats_server()
    server.kill()  # its port, with nobody listening
    spool = {"dir": str(tmp_path / "spool")}
    started = time.monotonic()
    second = scan(tmp_path, walk(tree), nats(server.url, timeout="1s", spool=spool), repeat_after=0)
    assert time.monotonic() - started < 15 and second.session.find("sink", "nats").stats()["depth"] == 3
    server.start()
    server.add_stream(STREAM, [SUBJECT])
    empty = tmp_path / "empty"
    empty.mkdir()
    scan(tmp_path, walk(empty), nats(server.url, spool=spool))
    stored = [msg_id for _, msg_id, _ in server.messages(STREAM)]
    assert sorted(stored) == sorted(r.id for r in second.records)  # what waited, once


def certificates(directory):
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=elkscan test CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def test_token_from_the_environment_and_tls_with_a_ca_file(tmp_path, nats_server, monkeypatch, caplog):
    token = "s3cret-token-4f1d"
    ca, cert, key = certificates(tmp_path)
    server = nats_server("--auth", token, "--tls", "--tlscert", str(cert), "--tlskey", str(key))
    server.call(lambda nc: nc.jsm().add_stream(name=STREAM, subjects=[SUBJECT]), token=token,
                tls=ssl.create_default_context(cafile=str(ca)))
    monkeypatch.setenv("ELKSCAN_TEST_NATS_TOKEN", token)
    secret = {"$env": "ELKSCAN_TEST_NATS_TOKEN"}
    tree = eicar_tree(tmp_path, 2)
    result = scan(tmp_path, walk(tree), nats(server.url, token=secret, ca_file=str(ca)))  # nats:// becomes TLS
    assert result.session.find("sink", "nats").stats()["delivered"] == 2
    monkeypatch.setenv("ELKSCAN_TEST_NATS_TOKEN", "wrong-" + token)  # refused: the records wait
    wrong = scan(tmp_path, walk(tree), nats(server.url, token=secret, ca_file=str(ca), timeout="500ms"),
                 repeat_after=0)
    assert wrong.session.find("sink", "nats").stats()["depth"] == 2 and "Authorization" in caplog.text
    assert token not in caplog.text  # never a secret in the log


def test_tls_asked_for_is_never_spoken_in_clear(tmp_path, nats_server, caplog):
    ca, _, _ = certificates(tmp_path)
    server = nats_server()  # no TLS
    server.add_stream(STREAM, [SUBJECT])
    result = scan(tmp_path, walk(eicar_tree(tmp_path, 1)), nats(server.url, ca_file=str(ca), timeout="500ms"))
    assert result.session.find("sink", "nats").stats()["depth"] == 1 and server.count(STREAM) == 0
    assert "does not offer TLS; not connecting in clear" in caplog.text


@pytest.mark.parametrize("option", ["ca_file", "creds"])
def test_a_file_another_user_could_change_is_refused_at_start(tmp_path, option):
    path = tmp_path / "file"
    path.write_text("x")
    path.chmod(0o666)
    with pytest.raises(Exception, match=rf"sink 'nats': {option} {path} is world-writable"):
        scan(tmp_path, walk(eicar_tree(tmp_path, 1)), nats("127.0.0.1:4222", **{option: str(path)}))


def test_a_record_sent_again_is_stored_once(tmp_path, nats_server):
    """JetStream drops a message whose Nats-Msg-Id it stored within its duplicate window: what a retry
    after a lost PubAck (or repeat_after: 0) sends again."""
    server = nats_server()
    server.add_stream(STREAM, [SUBJECT])
    tree = eicar_tree(tmp_path, 3)
    scan(tmp_path, walk(tree), nats(server.url))
    again = scan(tmp_path, walk(tree), nats(server.url), repeat_after=0)
    assert again.session.find("sink", "nats").stats()["delivered"] == 3  # sent, acknowledged as duplicates
    assert len(server.messages(STREAM)) == 3


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(st.text(max_size=30), max_size=3),
                 st.builds(lambda user, password, host: f"nats://{user}:{password}@{host}:4222",
                           st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=12),
                           st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True))))
def test_fuzz_servers_are_parsed_or_refused_and_a_password_is_never_shown(value):
    try:
        urls = parse_servers(value)
    except ValueError as exc:
        message = str(exc)
    else:
        assert urls and all(url.startswith(("nats://", "tls://")) for url in urls)
        message = " ".join(shown_url(url) for url in urls)
    if isinstance(value, str) and "@" in value:
        password = value.split("://", 1)[-1].rsplit("@", 1)[0].partition(":")[2]
        # what the message shows of the value: without its fixed words and the schemes (a password
        # ':ts:/' is in 'nats://')
        shown = message.replace("expected nats://host:port or tls://host:port, got ", "")
        shown = shown.replace("nats://", " ").replace("tls://", " ")
        assert len(password) < 4 or password not in shown  # short ones may be part of the host


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_a_subject_is_accepted_only_as_plain_tokens(subject):
    if not subject_problem(subject):
        assert all(token and not set(token) & {" ", "*", ">", "\t", "\n", "\r"} for token in subject.split("."))


def test_a_user_not_allowed_to_publish_is_told_why_and_the_records_wait(tmp_path, nats_server, caplog):
    conf = tmp_path / "nats.conf"
    conf.write_text('authorization { users = [\n  {user: admin, password: admin-pw}\n'
                    '  {user: scanner, password: scanner-pw-7c1e, permissions: {publish: {deny: ["elkscan.>"]}}}\n] }\n')
    server = nats_server("-c", str(conf))
    server.call(lambda nc: nc.jsm().add_stream(name=STREAM, subjects=[SUBJECT]), user="admin", password="admin-pw")
    url = f"nats://scanner:scanner-pw-7c1e@127.0.0.1:{server.port}"
    result = scan(tmp_path, walk(eicar_tree(tmp_path, 1)), nats(url, timeout="500ms"))
    assert result.session.find("sink", "nats").stats()["depth"] == 1 and result.summary.errors == 0
    assert 'the server said: permissions violation for publish to "elkscan.records"' in caplog.text
    assert "scanner-pw-7c1e" not in caplog.text  # the URL's password is never shown


def test_the_spool_is_the_same_for_the_same_servers_written_otherwise(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    def spool(servers, **options):
        result = scan(tmp_path, walk(empty), nats(servers, timeout="300ms", **options))
        return result.session.find("sink", "nats").spool_directory()

    one = spool(["127.0.0.1:1", "nats://user:pw1@127.0.0.2:1"])
    assert spool(["nats://user:pw2@127.0.0.2:1", "nats://127.0.0.1:1"]) == one
    assert spool(["127.0.0.1:1"]) != one and spool(["127.0.0.1:1", "127.0.0.2:1"], stream="OTHER") != one
