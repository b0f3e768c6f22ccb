"""The ``nats`` source against a real ``nats-server -js`` (conftest.py): records other hosts sent are
consumed, judged by ``hashlist`` from their digests, written by the file sink and only then acked; a
sink that fails makes the message come again; a malformed message is counted and acked; two verifiers
of one group share the stream; a server killed and restarted loses nothing; start-up tells a missing
stream or a denied consumer apart from an outage."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nats.js.errors import NotFoundError

from elkscan_core import ComponentError, Record, Sink, hookimpl
from elkscan_core.pipeline import parse_pipeline
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.runner import build_session
from elkscan_core.testing import scrape
from elkscan_nats_sink.connection import filter_problem
from elkscan_nats_sink.source import NatsSource, NatsSourceConfig

STREAM, SUBJECTS, GROUP = "ELKSCAN", "elkscan.records.>", "verifiers"
LISTED = b"a file only the full hash set knows\n"
SIGNATURE = "Fleet.Test.OnlyInTheFullSet"


def document(n: int, content: bytes | None = None, host: str = "web-1") -> dict:
    """A record as a host's delivery sink sends it, with ``hashes`` digests."""
    data = content if content is not None else f"file {n}\n".encode()
    return {"id": f"{n:032x}", "host": host, "kind": "finding", "path": f"/srv/{host}/f{n}",
            "status": "clean", "md5_hash": hashlib.md5(data).hexdigest(), "exe_size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "pid": 4242}


def publish(server, documents, subject="elkscan.records.web-1") -> None:
    async def send(nc):
        js = nc.jetstream()
        for doc in documents:
            await js.publish(subject, doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    server.call(send)


def consumer(server):
    """(messages not yet delivered, delivered and not acked) of the group's consumer."""
    return server.consumer(STREAM, GROUP)


def wait_until(check, seconds=30.0, what="the condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {seconds} s")


class GateSink(Sink):
    """Holds every write until ``opened``; ``fail`` ids raise on their first write."""
    id = "gate"
    opened = threading.Event()
    fail: set = set()
    seen: list = []

    def write(self, record: Record) -> None:
        assert GateSink.opened.wait(60)
        record_id = record.target.extra.get("host_record_id")
        GateSink.seen.append(record_id)
        if record_id in GateSink.fail:
            GateSink.fail.discard(record_id)
            raise OSError("the disk is full (a test)")


class Plugin:
    @hookimpl
    def elkscan_register_sinks(self, registry):
        registry.add(GateSink)


@pytest.fixture(autouse=True)
def _gate():
    GateSink.opened.set()
    GateSink.fail, GateSink.seen = set(), []
    yield
    GateSink.opened.set()


class Verifier:
    """A verifier session (nats source, hashlist, file sink) running in a thread until ``stop()``."""

    def __init__(self, tmp_path, server_url, name="v1", report_clean=True, gate=False, top=None, **source):
        listed = tmp_path / "full.hdb"
        listed.write_text(f"{hashlib.md5(LISTED).hexdigest()}:{len(LISTED)}:{SIGNATURE}\n")
        self.out = tmp_path / f"{name}.jsonl"
        options = {"servers": server_url, "subject": SUBJECTS, "stream": STREAM, "group": GROUP,
                   "timeout": "2s", **source}
        sinks = [{"use": "file", "with": {"path": str(self.out)}}] + ([{"use": "gate"}] if gate else [])
        pipeline = parse_pipeline({
            "version": 1, "canary_every": 0, "plugins": ["nats_sink", "hash_extractor", "file_sink"],
            "host": f"verifier-{name}", "state_dir": str(tmp_path / f"state-{name}"),
            "sources": [{"use": "nats", "with": options}],
            "engines": [{"use": "hashlist", "with": {"files": [str(listed)]}}], "sinks": sinks, **(top or {})},
            "<test pipeline>", str(tmp_path))
        pm = make_plugin_manager(pipeline.plugins)
        pm.register(Plugin(), name="test-gate")
        self.session = build_session(pipeline, pm, report_clean=report_clean)
        self.summary = None
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        self.summary = self.session.run()

    def __enter__(self) -> "Verifier":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> float:
        """Stop the session; how long it took to end."""
        started = time.monotonic()
        self.session.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the verifier did not stop"
        return time.monotonic() - started

    def records(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    @property
    def source(self) -> NatsSource:
        return self.session.find("source", "nats")


@pytest.fixture
def stream(nats_server):
    server = nats_server()
    server.add_stream(STREAM, [SUBJECTS])
    return server


def test_a_record_is_judged_written_and_only_then_acked(tmp_path, stream):
    publish(stream, [document(1, LISTED), document(2)])
    GateSink.opened.clear()  # the gate sink holds the records: nothing may be acked yet
    with Verifier(tmp_path, stream.url, gate=True) as verifier:
        wait_until(lambda: verifier.source.counters["received"] == 2, what="both messages fetched")
        time.sleep(0.5)
        assert consumer(stream) == (0, 2) and verifier.source.counters["acked"] == 0
        GateSink.opened.set()
        wait_until(lambda: consumer(stream) == (0, 0), what="both messages acked")
        records = {r["host_record_id"]: r for r in verifier.records()}
    detected, clean = records[f"{1:032x}"], records[f"{2:032x}"]
    assert detected["status"] == "detected" and detected["signature"] == SIGNATURE
    assert detected["host"] == "web-1" and detected["path"] == "/srv/web-1/f1" and detected["pid"] == 4242
    assert detected["verifier"] == "verifier-v1" and clean["status"] == "clean"
    assert verifier.source.counters["acked"] == 2 and verifier.source.counters["naked"] == 0


def test_a_sink_that_fails_makes_the_message_come_again(tmp_path, stream):
    GateSink.fail = {f"{1:032x}"}
    publish(stream, [document(1, LISTED)])
    with Verifier(tmp_path, stream.url, gate=True) as verifier:
        wait_until(lambda: verifier.source.counters["acked"] == 1, what="the message acked")
        assert consumer(stream) == (0, 0)
    assert verifier.source.counters["naked"] == 1 and GateSink.seen == [f"{1:032x}"] * 2
    # the file sink wrote it once: the record of the second delivery has the same id, a repeat held back
    assert [r["host_record_id"] for r in verifier.records()] == [f"{1:032x}"]


def test_a_malformed_message_is_counted_logged_and_acked(tmp_path, stream, caplog):
    caplog.set_level(logging.WARNING)
    publish(stream, [b"\xff not a record", b"[1, 2]", document(1, LISTED)])
    with Verifier(tmp_path, stream.url, report_clean=False) as verifier:
        wait_until(lambda: verifier.records() and consumer(stream) == (0, 0), what="everything settled")
    assert verifier.summary.not_scanned == {"malformed record": 2}
    assert [r["host_record_id"] for r in verifier.records()] == [f"{1:032x}"]
    lines = [r.getMessage() for r in caplog.records if "malformed record" in r.getMessage()]
    assert len(lines) == 2 and "message 1 of stream ELKSCAN (elkscan.records.web-1)" in lines[0]
    assert "not UTF-8" in lines[0] and "\n" not in lines[0]


def test_two_verifiers_of_a_group_share_the_stream_and_judge_each_record_once(tmp_path, stream):
    publish(stream, [document(n) for n in range(400)])
    with Verifier(tmp_path, stream.url, "v1", max_in_flight=16) as one, \
            Verifier(tmp_path, stream.url, "v2", max_in_flight=16) as two:
        wait_until(lambda: len(one.records()) + len(two.records()) >= 400 and consumer(stream) == (0, 0),
                   what="every record judged")
    ids = [r["host_record_id"] for r in one.records() + two.records()]
    assert sorted(ids) == sorted(f"{n:032x}" for n in range(400))  # each once: nobody died
    assert one.records() and two.records()  # both took part


def test_in_flight_messages_are_bounded(tmp_path, stream):
    publish(stream, [document(n) for n in range(50)])
    GateSink.opened.clear()
    with Verifier(tmp_path, stream.url, gate=True, max_in_flight=8,
                  top={"metrics": {"listen": "127.0.0.1:0"}}) as verifier:
        wait_until(lambda: verifier.source.counters["received"] == 8, what="8 messages fetched")
        time.sleep(1.5)  # several fetch rounds: still 8
        assert verifier.source.counters["received"] == 8 and consumer(stream) == (42, 8)
        scraped = scrape(verifier.session)
        assert scraped.value("elkscan_nats_messages_in_flight", source="nats") == 8
        assert scraped.value("elkscan_nats_messages_received_total", source="nats") == 8
        GateSink.opened.set()
        wait_until(lambda: consumer(stream) == (0, 0), what="every message acked")


def test_a_server_killed_and_restarted_loses_nothing(tmp_path, stream, caplog):
    caplog.set_level(logging.WARNING)
    publish(stream, [document(n) for n in range(100)])
    with Verifier(tmp_path, stream.url, max_in_flight=20) as verifier:
        wait_until(lambda: verifier.source.counters["acked"] >= 20, what="a first part acked")
        stream.kill()
        time.sleep(1.0)
        stream.start()
        publish(stream, [document(n) for n in range(100, 150)])
        wait_until(lambda: {r["host_record_id"] for r in verifier.records()} >= {f"{n:032x}" for n in range(150)}
                   and consumer(stream) == (0, 0), seconds=60, what="every record written after the outage")
    warnings = [r.getMessage() for r in caplog.records if "trying again with backoff" in r.getMessage()]
    assert len(warnings) == 1 and verifier.source.counters["reconnects"] == 1


def test_stop_returns_promptly_and_leaves_the_unsettled_messages_to_come_again(tmp_path, stream):
    publish(stream, [document(n) for n in range(20)])
    GateSink.opened.clear()
    verifier = Verifier(tmp_path, stream.url, gate=True, ack_wait="2s").__enter__()
    wait_until(lambda: verifier.source.counters["received"] == 20, what="the messages fetched")
    GateSink.opened.set()  # let the session end what it holds
    assert verifier.stop() < 10
    with Verifier(tmp_path, stream.url, "v2") as again:
        wait_until(lambda: consumer(stream) == (0, 0), what="everything settled")
    written = {r["host_record_id"] for r in verifier.records() + again.records()}
    assert written == {f"{n:032x}" for n in range(20)}


def test_a_missing_stream_stops_start_up_and_nothing_is_made(tmp_path, nats_server):
    server = nats_server()
    with pytest.raises(ComponentError, match="stream ELKSCAN does not exist; the operator makes it"):
        Verifier(tmp_path, server.url).session.run()

    async def streams(nc):
        return await nc.jsm().streams_info()
    assert server.call(streams) == []


def test_a_user_not_allowed_to_make_the_consumer_is_told_why_at_start(tmp_path, nats_server):
    conf = tmp_path / "nats.conf"
    conf.write_text('authorization { users = [\n  {user: admin, password: admin-pw}\n'
                    '  {user: verifier, password: verifier-pw-31a9, permissions: {publish: {deny: '
                    '["$JS.API.CONSUMER.CREATE.>", "$JS.API.CONSUMER.DURABLE.CREATE.>"]}}}\n] }\n')
    server = nats_server("-c", str(conf))
    server.call(lambda nc: nc.jsm().add_stream(name=STREAM, subjects=[SUBJECTS]), user="admin", password="admin-pw")
    url = f"nats://verifier:verifier-pw-31a9@127.0.0.1:{server.port}"
    with pytest.raises(ComponentError, match='making consumer verifiers on stream ELKSCAN: no answer within 1s; '
                       'the server said: permissions violation for publish to "\\$js.api.consumer.create') as info:
        Verifier(tmp_path, url, timeout="1s").session.run()
    assert "verifier-pw-31a9" not in str(info.value)


def test_a_consumer_made_otherwise_stops_start_up(tmp_path, stream):
    async def add(nc):
        await nc.jsm().add_consumer(STREAM, durable_name=GROUP, filter_subject="elkscan.records.web-1")
    stream.call(add)
    with pytest.raises(ComponentError, match="consumer verifiers of stream ELKSCAN filters elkscan.records.web-1"):
        Verifier(tmp_path, stream.url).session.run()


def test_no_server_at_start_is_an_outage_not_an_error(tmp_path, nats_server, caplog):
    caplog.set_level(logging.WARNING)
    server = nats_server()
    server.add_stream(STREAM, [SUBJECTS])
    port = server.port
    server.kill()
    with Verifier(tmp_path, f"nats://127.0.0.1:{port}") as verifier:
        wait_until(lambda: "trying again" in caplog.text, what="the warning")
        server.start()
        publish(server, [document(1, LISTED)])
        wait_until(lambda: verifier.records() and consumer(server) == (0, 0), what="the record written")
    assert caplog.text.count("trying again with backoff") == 1 and caplog.text.count("consuming again") == 1


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab.*> \t\x00é"), max_size=30))
def test_fuzz_a_filter_is_accepted_only_as_tokens_with_whole_wildcards(subject):
    if not filter_problem(subject):
        tokens = subject.split(".")
        assert all(token and (token in ("*", ">") or not set(token) & set("*> \t")) for token in tokens)
        assert ">" not in tokens[:-1]


class _Msg:
    """What the source reads of a message: its bytes, subject and reply subject (JetStream's metadata)."""

    def __init__(self, data: bytes, reply: str) -> None:
        self.data, self.subject, self.reply, self._metadata = data, "elkscan.records.x", reply, None

    @property
    def metadata(self):
        from nats.aio.msg import Msg
        return Msg.Metadata._from_reply(self.reply)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
    st.sampled_from(["id", "host", "path", "md5_hash", "sha1", "sha256", "exe_size", "kind", "x_bytes", "x"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=70), st.lists(st.integers(), max_size=3))))),
    reply=st.one_of(st.text(max_size=60), st.just("$JS.ACK.ELKSCAN.verifiers.1.7.7.1700000000000000000.0")))
def test_fuzz_any_message_becomes_a_target_or_a_counted_malformed_one(tmp_path, data, reply):
    source = NatsSource(NatsSourceConfig(servers="127.0.0.1:1", subject=SUBJECTS, stream=STREAM, group=GROUP),
                        session=None)
    source.client = type("NoClient", (), {"soon": staticmethod(lambda callback: False)})()
    target = source._target(_Msg(data, reply))
    assert target.receipt is not None and target.origin == "nats"
    if target.skip == "malformed record":
        assert source.counters["malformed"] == 1 and "\n" not in target.path
        target.receipt.ack()
        target.receipt.nak()  # a second settlement is ignored
        assert source.counters["acked"] == 1 and source.counters["naked"] == 0


def test_a_user_with_only_the_permissions_the_readme_lists_consumes(tmp_path, nats_server):
    conf = tmp_path / "nats.conf"
    allowed = ", ".join(f'"{subject}"' for subject in (
        f"$JS.API.STREAM.INFO.{STREAM}", f"$JS.API.CONSUMER.INFO.{STREAM}.{GROUP}",
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{GROUP}.>", f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{GROUP}",
        f"$JS.ACK.{STREAM}.{GROUP}.>"))
    conf.write_text('authorization { users = [\n  {user: admin, password: admin-pw}\n'
                    f'  {{user: verifier, password: verifier-pw, permissions: {{publish: {{allow: [{allowed}]}}, '
                    'subscribe: {allow: ["_INBOX.>"]}}}\n] }\n')
    server = nats_server("-c", str(conf))
    server.call(lambda nc: nc.jsm().add_stream(name=STREAM, subjects=[SUBJECTS]), user="admin", password="admin-pw")

    async def send(nc):
        await nc.jetstream().publish("elkscan.records.web-1", json.dumps(document(1, LISTED)).encode())
    server.call(send, user="admin", password="admin-pw")
    with Verifier(tmp_path, f"nats://verifier:verifier-pw@127.0.0.1:{server.port}") as verifier:
        async def settled(nc):
            try:
                found = await nc.jsm().consumer_info(STREAM, GROUP)
            except NotFoundError:  # the verifier has not made it yet
                return False
            return (found.num_pending, found.num_ack_pending) == (0, 0)
        wait_until(lambda: server.call(settled, user="admin", password="admin-pw"), what="the record acked")
    assert [r["host_record_id"] for r in verifier.records()] == [f"{1:032x}"]


def test_a_work_queue_stream_forgets_each_record_once_acked(tmp_path, nats_server):
    server = nats_server()
    server.add_stream(STREAM, [SUBJECTS], retention="workqueue")
    publish(server, [document(n) for n in range(30)])
    with Verifier(tmp_path, server.url) as verifier:
        wait_until(lambda: server.count(STREAM) == 0, what="the stream emptied by the acks")
    assert len(verifier.records()) == 30
