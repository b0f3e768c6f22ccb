"""The ``kafka`` sink against librdkafka's mock cluster (conftest.py), read back by a real consumer: a
scan's records on the topic keyed by record id; an outage in the middle of a scan (the brokers taken down
and brought back) loses nothing and spools nothing twice; refusals for good are dropped and counted; a
dead broker at start holds the scan no longer than the spool's bound; secrets and TLS files."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from attrs import frozen
from confluent_kafka import KafkaError

from elkscan_core import ComponentError, ConfigError, Record, Source, hookimpl
from elkscan_core.delivery.spool import parse_frames
from elkscan_core.testing import eicar, run
from elkscan_kafka_sink.kafka import KafkaConfig
from elkscan_kafka_sink.logs import RateLimitedLog

from .conftest import MockCluster

FAST = {"flush_interval": "50ms", "timeout": "2s", "batch": 20, "retry": {"initial": "50ms", "max": "200ms"}}


def kafka(cluster_or_brokers, topic="elkscan", **options):
    brokers = getattr(cluster_or_brokers, "brokers", cluster_or_brokers)
    return {"use": "kafka", "with": {"brokers": brokers, "topic": topic, **FAST, **options}}


def scan(tmp_path, tree, sink, **top):
    return run({"plugins": ["kafka_sink", "yara_backend"], "engines": ["yara"], "state_dir": str(tmp_path / "state"),
                "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}],
                "sinks": [sink], **top}, report_clean=True)


def tree_with(tmp_path, infected=2, clean=3, name="tree"):
    tree = tmp_path / name
    tree.mkdir()
    for n in range(infected):
        (tree / f"eicar{n}.com").write_bytes(eicar())
    for n in range(clean):
        (tree / f"clean{n}.txt").write_text(f"nothing to see {n}\n")
    return tree


def test_a_scans_records_arrive_on_the_topic_keyed_by_record_id(tmp_path, cluster):
    result = scan(tmp_path, tree_with(tmp_path), kafka(cluster))
    sink = result.session.find("sink", "kafka")
    assert sink.stats()["delivered"] == 5 and sink.stats()["depth"] == 0 and result.summary.errors == 0
    messages = cluster.consume("elkscan", expect=5)
    by_key = {m.key().decode(): json.loads(m.value()) for m in messages}
    assert len(messages) == 5 and sorted(by_key) == sorted(r.id for r in result.records)
    assert all(doc["id"] == key for key, doc in by_key.items())
    detected = [doc for doc in by_key.values() if doc["status"] == "detected"]
    assert len(detected) == 2 and detected[0]["signature"] == "Multios_TestFile_Eicar"
    assert detected[0]["host"] == result.session.host


def test_ecs_documents_and_an_idempotent_producer_that_waits_for_all_replicas(tmp_path, cluster):
    result = scan(tmp_path, tree_with(tmp_path, infected=1, clean=0), kafka(cluster, topic="ecs", format="ecs"))
    [message] = cluster.consume("ecs", expect=1)
    assert json.loads(message.value())["rule"]["name"] == "Multios_TestFile_Eicar"
    properties = result.session.find("sink", "kafka")._properties()
    assert properties["acks"] == "all" and properties["enable.idempotence"] is True
    assert properties["message.timeout.ms"] == 2000  # librdkafka gives up when the call does: the spool retries


@frozen
class TickerConfig:
    count: int = 300
    every: float = 0.003


class Ticker(Source):
    """``count`` records, one every ``every`` seconds, calling ``Ticker.at[n]`` (if any) before the n-th."""

    id = "ticker"
    Config = TickerConfig
    at: dict = {}

    def targets(self):
        for n in range(self.config.count):
            if n in Ticker.at:
                Ticker.at[n](self.session)
            time.sleep(self.config.every)
            yield Record(kind="log", facts={"n": n})


class TickerPlugin:
    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Ticker)


def wait_for(condition, within=60.0):
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def spooled_ids(directory):
    """The id of every record framed in the spool's segments, delivered or not."""
    ids = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".seg"):
            with open(os.path.join(directory, name), "rb") as f:
                ids.extend(item.id for item, _ in parse_frames(f.read()) if item is not None)
    return ids


def test_an_outage_in_the_middle_of_a_scan_loses_nothing_and_spools_nothing_twice(tmp_path, cluster, caplog):
    seen = {}

    def outage(session):  # the brokers go down; the scan goes on while delivery fails
        seen["sink"] = sink = session.find("sink", "kafka")
        wait_for(lambda: sink.stats()["delivered"] >= 60)
        cluster.down()
        wait_for(lambda: sink.stats()["failed_attempts"] >= 2)

    def back(session):  # the spool holds each waiting record once; the brokers come back
        sink = seen["sink"]
        ids = spooled_ids(sink.spool.directory)
        seen["spooled"], seen["waiting"] = ids, sink.stats()["depth"]
        cluster.up()
        wait_for(lambda: sink.stats()["delivered"] >= 250)

    Ticker.at = {100: outage, 250: back}
    caplog.set_level(logging.INFO, logger="elkscan")
    try:
        result = run({"plugins": ["kafka_sink"], "state_dir": str(tmp_path / "state"),
                      "sources": [{"use": "ticker"}], "sinks": [kafka(cluster, topic="outage")]},
                     extra_plugins=[TickerPlugin()])
    finally:
        Ticker.at = {}
    sink = result.session.find("sink", "kafka")
    ids = [r.id for r in result.records]
    assert len(set(ids)) == 300
    assert len(seen["spooled"]) == len(set(seen["spooled"])) and seen["waiting"] >= 100  # nothing spooled twice
    stats = sink.stats()
    assert stats["failed_attempts"] >= 2 and stats["depth"] == 0 and stats["rejected"] == 0
    assert stats["delivered"] == 300 and result.summary.errors == 0  # each record delivered once from the spool
    keys = {m.key().decode() for m in cluster.consume("outage", expect=300)}
    assert keys == set(ids)  # every record on the topic (at least once)
    # the outage is said, and its end, without a line per reconnect
    text = caplog.text
    assert "delivery failed" in text and "delivery resumed" in text
    librdkafka_lines = [r for r in caplog.records if "librdkafka" in r.getMessage()]
    assert 0 < len(librdkafka_lines) <= 12, [r.getMessage() for r in librdkafka_lines]


def test_a_topic_we_may_not_write_drops_the_records_and_counts_them(tmp_path, cluster, caplog):
    cluster.create_topic("denied")
    cluster.topic_error("denied", KafkaError.TOPIC_AUTHORIZATION_FAILED)
    result = scan(tmp_path, tree_with(tmp_path, infected=3, clean=0), kafka(cluster, topic="denied"))
    stats = result.session.find("sink", "kafka").stats()
    assert stats["rejected"] == 3 and stats["delivered"] == 0 and stats["depth"] == 0  # dropped, not retried
    assert result.summary.errors >= 1  # one per batch
    assert "record(s) refused by the endpoint, not retried: TOPIC_AUTHORIZATION_FAILED" in caplog.text


def test_a_record_larger_than_max_message_is_refused_alone(tmp_path, cluster):
    tree = tree_with(tmp_path, infected=2, clean=0)
    deep = tree / ("d" * 250) / ("e" * 250) / ("f" * 250)
    deep.mkdir(parents=True)
    (deep / "eicar.com").write_bytes(eicar())
    # the deep one's document is 3 KB, the others' 1 KB
    result = scan(tmp_path, tree, kafka(cluster, topic="sizes", max_message=2000))
    stats = result.session.find("sink", "kafka").stats()
    assert stats["rejected"] == 1 and stats["delivered"] == 2 and result.summary.errors == 1
    paths = {json.loads(m.value())["path"] for m in cluster.consume("sizes", expect=2)}
    assert paths == {str(tree / "eicar0.com"), str(tree / "eicar1.com")}


def test_a_producer_that_hit_a_fatal_error_is_started_afresh_and_loses_nothing(tmp_path, cluster, caplog):
    cluster.request_errors(MockCluster.INIT_PRODUCER_ID, KafkaError.CLUSTER_AUTHORIZATION_FAILED)  # once
    Ticker.at = {10: lambda session: wait_for(lambda: session.find("sink", "kafka").stats()["delivered"] >= 10)}
    try:  # the scan goes on until the first ten went through a new producer
        result = run({"plugins": ["kafka_sink"], "state_dir": str(tmp_path / "state"),
                      "sources": [{"use": "ticker", "with": {"count": 20}}],
                      "sinks": [kafka(cluster, topic="fatal")]}, extra_plugins=[TickerPlugin()])
    finally:
        Ticker.at = {}
    stats = result.session.find("sink", "kafka").stats()
    assert stats["failed_attempts"] >= 1 and stats["delivered"] == 20 and stats["depth"] == 0
    assert "Cluster authorization failed" in caplog.text
    assert {m.key().decode() for m in cluster.consume("fatal", expect=20)} == {r.id for r in result.records}


def test_a_dead_broker_at_start_holds_the_scan_no_longer_than_the_spools_bound(tmp_path, cluster, caplog):
    cluster.down()
    tree = tree_with(tmp_path, infected=2, clean=0)
    started = time.monotonic()
    first = scan(tmp_path, tree, kafka(cluster, topic="late", timeout="1s"))
    took = time.monotonic() - started
    sink = first.session.find("sink", "kafka")
    assert sink.stats()["depth"] == 2 and sink.stats()["delivered"] == 0
    assert took < 15, took  # the scan and close()'s one-second bound, not librdkafka's retries
    assert "2 record(s) not delivered yet stay in the spool" in caplog.text
    cluster.up()
    empty = tmp_path / "empty"
    empty.mkdir()
    second = scan(tmp_path, empty, kafka(cluster, topic="late", timeout="1s"))  # the next run sends them
    assert second.session.find("sink", "kafka").stats()["depth"] == 0
    keys = {m.key().decode() for m in cluster.consume("late", expect=2)}
    assert keys == {r.id for r in first.records}


def test_the_password_is_never_logged_nor_stored(tmp_path, cluster, caplog, monkeypatch):
    secret = "s3cret-Kafka-Passw0rd"
    monkeypatch.setenv("ELKSCAN_TEST_KAFKA_PASSWORD", secret)
    caplog.set_level(logging.DEBUG)
    security = {"protocol": "sasl_plaintext", "sasl_mechanism": "SCRAM-SHA-512", "username": "elkscan",
                "password": {"$env": "ELKSCAN_TEST_KAFKA_PASSWORD"}}
    # the mock cluster speaks no SASL: authentication fails, the records wait, librdkafka says why
    result = scan(tmp_path, tree_with(tmp_path, infected=1, clean=0), kafka(cluster, security=security, timeout="1s"))
    sink = result.session.find("sink", "kafka")
    assert sink.stats()["depth"] == 1 and "librdkafka" in caplog.text
    assert secret not in caplog.text and secret not in repr(sink.config)
    for directory, _, files in os.walk(tmp_path / "state"):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                assert secret.encode() not in f.read()


def test_tls_verifies_the_brokers_and_a_failed_handshake_keeps_the_records(tmp_path, cluster):
    # the mock cluster speaks no TLS: the handshake fails, the records wait in the spool
    result = scan(tmp_path, tree_with(tmp_path, infected=1, clean=0),
                  kafka(cluster, security={"protocol": "ssl"}, timeout="1s"))
    sink = result.session.find("sink", "kafka")
    assert sink.stats()["depth"] == 1 and sink.stats()["delivered"] == 0
    properties = sink._properties()
    assert properties["enable.ssl.certificate.verification"] is True
    assert properties["ssl.endpoint.identification.algorithm"] == "https"
    assert properties["ssl.ca.location"] == "probe"  # the system's CAs


def test_tls_files_must_be_trusted(tmp_path, cluster):
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    os.chmod(ca, 0o666)  # anyone could put their own CA here
    security = {"protocol": "ssl", "ca_file": str(ca)}
    with pytest.raises(ComponentError, match=r"security\.ca_file .*ca\.pem"):
        scan(tmp_path, tree_with(tmp_path), kafka(cluster, security=security))
    os.chmod(ca, 0o644)  # trusted, but not a certificate: librdkafka's refusal stops the start
    with pytest.raises(ComponentError, match="librdkafka refused the configuration: .*ssl.ca.location"):
        scan(tmp_path, tmp_path / "tree", kafka(cluster, security=security))


@pytest.mark.parametrize("options, problem", [
    ({"brokers": "kafka-1"}, "brokers: expected host:port"),
    ({"brokers": []}, "brokers: expected host:port or a list of them"),
    ({"topic": "a topic"}, "topic: a Kafka topic name"),
    ({"security": {"protocol": "sasl_ssl", "username": "u"}}, "security.username: protocol sasl_ssl takes"),
    ({"security": {"ca_file": "/etc/ssl/ca.pem"}}, "security.protocol: ca_file, cert_file and key_file are for"),
    ({"security": {"protocol": "ssl", "cert_file": "c.pem"}}, "security.cert_file: a client certificate takes"),
    ({"max_message": 10}, "max_message: 1000 to 1000000000 bytes"),
])
def test_options_are_checked(options, problem):
    from elkscan_core.pipeline import structure

    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        structure({"brokers": "k:9092", "topic": "t", **options}, KafkaConfig, "sinks[0].with")
    config = structure({"brokers": ["k1:9092", "[::1]:9093"], "topic": "t"}, KafkaConfig, "w")
    assert config.brokers == ("k1:9092", "[::1]:9093")


def test_librdkafka_lines_are_said_once_a_minute_with_a_count(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("elkscan.test"), "sink 'kafka'", clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="elkscan.test")
    for _ in range(500):  # a broker down: a line every 100 ms
        limited.log(logging.ERROR, "%s [%s] %s", "FAIL", "elkscan#producer-1", "Connect failed: refused")
        limited.error(KafkaError(KafkaError._TRANSPORT, "Connect failed: refused"))  # the same, as an event
        now[0] += 0.1
    lines = [r for r in caplog.records if r.name == "elkscan.test"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING  # what it costs is the spool's to say
    now[0] += 10
    limited.log(logging.ERROR, "%s [%s] %s", "FAIL", "elkscan#producer-1", "[thrd:main]: Connect failed: refused")
    limited.log(logging.INFO, "%s [%s] %s", "PARTCNT", "elkscan#producer-1", "partition count changed")
    limited.error(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    assert [(r.levelname, r.getMessage()) for r in caplog.records[1:]] == [
        ("WARNING", "sink 'kafka': librdkafka FAIL: Connect failed: refused (999 more like it in the last 60s)"),
        ("INFO", "sink 'kafka': librdkafka PARTCNT: partition count changed"),
        ("ERROR", "sink 'kafka': librdkafka fatal error _FATAL: fenced; the producer is started afresh")]
