"""The ``kafka`` source against librdkafka's mock cluster (conftest.py): its own mechanics driven directly
(the test settles the receipts the session would: a partition committed only past what was settled, in
order; the bound on messages in flight; a nak read again; a rebalance; an outage; a prompt stop), then
whole sessions (record documents judged by hashlist and written by the file sink, a failing sink, poison
messages, two verifiers in one group). Parsing is fuzzed with hypothesis."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_core import ConfigError, Sink, build_session, hookimpl, make_plugin_manager, parse_pipeline
from elkscan_core.pipeline import structure
from elkscan_kafka_sink.source import CLOSE_WAIT, MALFORMED, KafkaSource, KafkaSourceConfig, Watermark

from .conftest import MockCluster

FAST = {"retry": {"initial": "200ms", "max": "1s"}, "session_timeout": "6s"}


def document(n: int, host: str = "host-a", md5: str | None = None) -> bytes:
    """A record document as a scanning host's kafka sink writes it (`hashes` with `when: all`)."""
    return json.dumps({"id": f"{host}-{n:05d}", "host": host, "kind": "finding", "time": 1700000000,
                       "origin": "dirscan", "path": f"/srv/{host}/file{n}", "status": "clean",
                       "md5_hash": md5 or f"{n:032x}", "exe_size": 100 + n}).encode()


def wait_for(condition, within=30.0, step=0.05):
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


class _Session:
    """What the source uses of a session when it is driven directly: only ``resolve_path``."""

    def resolve_path(self, path: str) -> str:
        return path


class Driven:
    """A kafka source iterated on its own thread as the session does; the test settles its receipts."""

    def __init__(self, cluster: MockCluster, topic: str = "records", group: str = "verifiers", **options):
        config = structure({"brokers": cluster.brokers, "topic": topic, "group": group, **FAST, **options},
                           KafkaSourceConfig, "sources[0].with")
        self.source = KafkaSource(config, _Session())
        self.targets: list = []
        self.source.start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for target in self.source.targets():
            self.targets.append(target)

    def receipts(self) -> list:
        return [t for t in self.targets if t.receipt is not None]

    def ack_all(self) -> None:
        for target in self.receipts():
            target.receipt.ack()  # a receipt already settled stays as it was

    def stop(self) -> float:
        """Stop and close, as the session does; how long ``targets()`` took to return."""
        started = time.monotonic()
        self.source.stop()
        self._thread.join(10)
        took = time.monotonic() - started
        assert not self._thread.is_alive()
        self.source.close()
        return took


def paths(targets) -> list[str]:
    return [t.path for t in targets]


@pytest.fixture
def records(cluster):
    """A topic of 3 partitions holding 60 record documents."""
    cluster.create_topic("records", 3)
    cluster.produce("records", [document(n) for n in range(60)])
    return cluster


def test_every_message_becomes_a_digest_target_and_the_group_commits_past_the_acked_ones(records):
    driven = Driven(records)
    wait_for(lambda: len(driven.targets) == 60)
    target = next(t for t in driven.targets if t.path == "/srv/host-a/file7")
    assert target.digests == {"md5": f"{7:032x}"} and target.host == "host-a" and target.origin == "kafka"
    assert target.extra["host_record_id"] == "host-a-00007" and target.size == 107
    assert set(records.committed("verifiers", "records", 3).values()) <= {-1001, 0}  # nothing settled yet
    driven.ack_all()
    wait_for(lambda: records.committed("verifiers", "records", 3) == records.ends("records", 3), step=0.3)
    assert driven.stop() < 2.0


def test_an_offset_is_committed_only_once_every_earlier_one_is_settled(cluster):
    cluster.create_topic("records", 1)
    cluster.produce("records", [document(n) for n in range(10)])
    driven = Driven(cluster)
    wait_for(lambda: len(driven.targets) == 10)
    for target in driven.targets:
        if target.path != "/srv/host-a/file3":
            target.receipt.ack()  # all but offset 3, in any order
    wait_for(lambda: cluster.committed("verifiers", "records", 1) == {0: 3}, step=0.3)
    time.sleep(1.5)  # several of the source's commit rounds: it stays there
    assert cluster.committed("verifiers", "records", 1) == {0: 3}
    driven.targets[3].receipt.ack()
    wait_for(lambda: cluster.committed("verifiers", "records", 1) == {0: 10}, step=0.3)
    driven.stop()


def test_at_most_max_in_flight_messages_are_held_until_receipts_settle(records):
    driven = Driven(records, max_in_flight=7)
    wait_for(lambda: len(driven.targets) == 7)
    time.sleep(1.0)
    assert len(driven.targets) == 7  # paused: nothing more is read while 7 are unsettled
    while len(driven.targets) < 60:
        before = len(driven.targets)
        driven.ack_all()
        wait_for(lambda: len(driven.targets) > before or len(driven.targets) == 60)
    driven.ack_all()
    assert sorted(paths(driven.targets)) == sorted(f"/srv/host-a/file{n}" for n in range(60))  # each once
    wait_for(lambda: records.committed("verifiers", "records", 3) == records.ends("records", 3), step=0.3)
    driven.stop()


def test_partitions_assigned_while_the_bound_is_reached_stay_paused(cluster):
    cluster.create_topic("records", 4)
    cluster.produce("records", [document(n) for n in range(100)])
    first = Driven(cluster, max_in_flight=5)
    wait_for(lambda: len(first.targets) == 5)
    second = Driven(cluster, max_in_flight=5)  # a rebalance: the first is given partitions while paused
    wait_for(lambda: len(second.targets) == 5 and first.source._parts and second.source._parts)
    time.sleep(1.0)
    assert len(first.targets) == 5 and len(second.targets) == 5
    ends = cluster.ends("records", 4)
    wait_for(lambda: first.ack_all() or second.ack_all() or cluster.committed("verifiers", "records", 4) == ends,
             step=0.3)
    assert set(paths(first.targets + second.targets)) == {f"/srv/host-a/file{n}" for n in range(100)}
    first.stop()
    second.stop()


def test_a_nak_reads_the_partition_again_from_its_watermark_after_a_backoff(cluster, caplog):
    cluster.create_topic("records", 1)
    cluster.produce("records", [document(n) for n in range(5)])
    driven = Driven(cluster)
    wait_for(lambda: len(driven.targets) == 5)
    driven.targets[0].receipt.ack()
    driven.targets[2].receipt.nak()  # offset 1 still unsettled: read again from 1
    driven.targets[3].receipt.ack()  # stale now: it comes again
    wait_for(lambda: len(driven.targets) == 9)
    assert paths(driven.targets[5:]) == [f"/srv/host-a/file{n}" for n in range(1, 5)]
    assert "reading the partition again from offset 1 in 0.2s" in caplog.text
    wait_for(lambda: cluster.committed("verifiers", "records", 1) == {0: 1}, step=0.3)
    driven.targets[1].receipt.ack()  # the first reading's receipts are stale: nothing moves
    time.sleep(1.0)
    assert cluster.committed("verifiers", "records", 1) == {0: 1}
    for target in driven.targets[5:]:
        target.receipt.ack()
    wait_for(lambda: cluster.committed("verifiers", "records", 1) == {0: 5}, step=0.3)
    assert driven.source.counts["nak"] == 1
    driven.stop()


def test_a_rebalance_commits_what_is_settled_and_the_unsettled_come_again_to_the_group(records):
    first = Driven(records)
    wait_for(lambda: len(first.targets) == 60)
    settled = first.targets[:40]
    for target in settled:
        target.receipt.ack()
    time.sleep(1.0)  # committed by the first's rounds, or at the revoke at the latest
    second = Driven(records)
    # the revoke gave every partition up, committed what was settled and forgot the rest; both read on
    # from the committed offsets: each unsettled message comes again to one of them
    unsettled = set(paths(first.targets[40:]))
    again = lambda: paths(first.targets[60:]) + paths(second.targets)  # noqa: E731
    wait_for(lambda: unsettled <= set(again()))
    assert not set(again()) & set(paths(settled)) - unsettled  # nothing settled is read again
    for target in first.targets[40:60]:
        target.receipt.ack()  # stale: read before the rebalance
    first.ack_all()
    second.ack_all()
    wait_for(lambda: records.committed("verifiers", "records", 3) == records.ends("records", 3), step=0.3)
    assert len(second.source._parts) and len(first.source._parts)  # both hold partitions
    first.stop()
    second.stop()


def test_a_broker_outage_is_one_log_line_and_loses_nothing(records, caplog):
    caplog.set_level(logging.INFO, logger="elkscan")
    driven = Driven(records)
    wait_for(lambda: len(driven.targets) == 60)
    driven.ack_all()
    wait_for(lambda: records.committed("verifiers", "records", 3) == records.ends("records", 3), step=0.3)
    records.down()
    time.sleep(4)  # librdkafka reconnects every few hundred milliseconds meanwhile
    records.up()
    records.produce("records", [document(n) for n in range(60, 90)])
    wait_for(lambda: len(driven.targets) == 90)
    driven.ack_all()
    wait_for(lambda: records.committed("verifiers", "records", 3) == records.ends("records", 3), step=0.3)
    lines = [r.getMessage() for r in caplog.records if r.name == "elkscan.kafka_sink"]
    assert len(lines) == 1, lines
    driven.stop()


def test_stop_returns_promptly_and_close_commits_what_is_settled(records):
    driven = Driven(records)
    wait_for(lambda: len(driven.targets) == 60)
    for target in driven.targets:
        target.receipt.ack()
    assert driven.stop() < 1.0  # close() then applied the acks and committed them
    assert records.committed("verifiers", "records", 3) == records.ends("records", 3)


def test_a_close_while_the_brokers_are_down_is_bounded_and_commits_once_they_are_back(records, caplog):
    driven = Driven(records)
    wait_for(lambda: len(driven.targets) == 60)
    records.down()
    driven.ack_all()
    started = time.monotonic()
    driven.stop()
    assert time.monotonic() - started < CLOSE_WAIT + 2
    assert "the brokers did not answer within 5s" in caplog.text
    records.up()  # the last commit was still under way: it goes through
    wait_for(lambda: records.committed("verifiers", "records", 3) == records.ends("records", 3), step=0.5)


def test_a_malformed_message_is_skipped_counted_and_settled(cluster, caplog):
    cluster.create_topic("records", 1)
    cluster.produce("records", [b"\xff not json", document(1), b"[1, 2]", b"x" * 1_100_000])
    driven = Driven(cluster)
    wait_for(lambda: len(driven.targets) == 4)
    skipped = [t for t in driven.targets if t.skip]
    assert [t.skip for t in skipped] == [MALFORMED] * 3 and all(t.receipt is None for t in skipped)
    assert paths(skipped) == ["kafka:records/0/0", "kafka:records/0/2", "kafka:records/0/3"]
    assert "source 'kafka': records[0]@0: " in caplog.text
    driven.ack_all()
    wait_for(lambda: cluster.committed("verifiers", "records", 1) == {0: 4}, step=0.3)
    assert driven.source.counts["malformed"] == 3
    driven.stop()


@pytest.mark.parametrize("options, problem", [
    ({"group": "a group"}, "group: a consumer group"),
    ({"max_in_flight": 0}, "max_in_flight: 1 to 100000 messages"),
    ({"start": "middle"}, "start"),
    ({"session_timeout": "0s"}, "session_timeout: 1s to 1h"),
    ({"topic": "a/b"}, "topic: a Kafka topic name"),
    ({"security": {"protocol": "sasl_ssl"}}, "security.username: protocol sasl_ssl takes"),
])
def test_options_are_checked(options, problem):
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        structure({"brokers": "k:9092", "topic": "t", "group": "g", **options}, KafkaSourceConfig, "sources[0].with")
    config = structure({"brokers": "k:9092", "topic": "t", "group": "g"}, KafkaSourceConfig, "w")
    assert config.max_in_flight == 1000 and config.start == "earliest" and config.session_timeout == 45


# -- hypothesis -------------------------------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_the_watermark_is_the_first_offset_not_settled(gaps, random):
    """Offsets read with gaps (compaction), settled in any order: the commit point is the lowest offset
    not settled, or the one after the last read, and never goes back."""
    offsets, offset = [], 0
    for gap in gaps:
        offset += gap
        offsets.append(offset)
        offset += 1
    mark = Watermark(1)
    assert all(mark.read(o) for o in offsets) and not mark.read(offsets[-1])  # read once each
    order = offsets[:]
    random.shuffle(order)
    settled: set[int] = set()
    last = mark.commit_point()
    for o in order:
        mark.settle(o)
        settled.add(o)
        unsettled = [x for x in offsets if x not in settled]
        expect = unsettled[0] if unsettled else offsets[-1] + 1
        assert mark.commit_point() == expect and expect >= last
        last = expect


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
    st.sampled_from(["id", "host", "path", "md5_hash", "sha1", "sha256", "exe_size", "kind", "pid"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=40), st.lists(st.integers(), max_size=2))))))
def test_any_message_is_a_target_or_a_malformed_skip_and_settles_its_offset(value):
    """Whatever a message holds, the source makes it a target with a receipt, or a target skipped as
    malformed whose offset is settled at once; never an exception, never an offset left behind."""
    config = KafkaSourceConfig(brokers="k:9092", topic="t", group="g")
    source = KafkaSource(config, _Session())
    source._parts[0] = Watermark(1)
    target = source._target(0, 41, value)
    if target.skip == MALFORMED:
        assert target.receipt is None and source._parts[0].commit_point() == 42 and source._unsettled == 0
    else:
        assert target.receipt is not None and source._parts[0].commit_point() == 41 and source._unsettled == 1
        target.receipt.ack()
        source._apply_settled()
        assert source._parts[0].commit_point() == 42 and source._unsettled == 0


# -- whole sessions ---------------------------------------------------------------------------

class Refusing(Sink):
    """A sink whose disk is full: every write raises."""

    id = "refusing"

    def write(self, record) -> None:
        raise OSError(28, "No space left on device")


class RefusingPlugin:
    @hookimpl
    def elkscan_register_sinks(self, registry):
        registry.add(Refusing)


class Verifier:
    """A session as ``elkscan run`` makes it, on a thread: the kafka source, hashlist over ``listed``
    (md5 -> size) and the file sink into ``out``, or ``sinks``."""

    def __init__(self, tmp_path, cluster, name, listed, sinks=None, extra_plugins=(), **options):
        lists = tmp_path / f"{name}.hashes"
        lists.write_text("".join(f"md5:{md5}:{size}:Fleet.Test.Listed-{md5[:6]}\n" for md5, size in listed.items()))
        self.out = tmp_path / f"{name}.jsonl"
        source = {"brokers": cluster.brokers, "topic": "records", "group": "verifiers", **FAST, **options}
        pipeline = parse_pipeline({
            "version": 1, "canary_every": 0, "state_dir": str(tmp_path / f"{name}-state"),
            "plugins": ["kafka_sink", "hash_extractor", "file_sink"],
            "sources": [{"use": "kafka", "with": source}],
            "engines": [{"use": "hashlist", "with": {"files": [str(lists)]}}],
            "sinks": sinks or [{"use": "file", "with": {"path": str(self.out)}}]}, f"<{name}>", str(tmp_path))
        plugins = make_plugin_manager(pipeline.plugins)
        for index, plugin in enumerate(extra_plugins):
            plugins.register(plugin, name=f"test-plugin-{index}")
        self.session = build_session(pipeline, plugins)
        self.summary = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.summary = self.session.run()

    @property
    def source(self) -> KafkaSource:
        return self.session.sources[0]

    def records(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def stop(self):
        self.session.stop()
        self._thread.join(20)
        assert not self._thread.is_alive()
        return self.summary


def md5_of(n: int) -> str:
    return f"{n:032x}"


def test_records_are_judged_by_their_digests_written_by_the_file_sink_and_then_committed(tmp_path, records):
    listed = {md5_of(n): 100 + n for n in (3, 17, 42)}
    verifier = Verifier(tmp_path, records, "v1", listed)
    wait_for(lambda: len(verifier.records()) == 3)
    wait_for(lambda: records.committed("verifiers", "records", 3) == records.ends("records", 3), step=0.3)
    summary = verifier.stop()
    by_path = {r["path"]: r for r in verifier.records()}
    assert sorted(by_path) == ["/srv/host-a/file17", "/srv/host-a/file3", "/srv/host-a/file42"]
    assert by_path["/srv/host-a/file3"]["host"] == "host-a"
    assert by_path["/srv/host-a/file3"]["signature"] == "Fleet.Test.Listed-000000"
    assert summary.errors == 0 and verifier.source.counts["messages"] == 60


def test_a_sink_that_fails_holds_the_offsets_and_the_records_come_again_to_a_new_verifier(tmp_path, cluster):
    cluster.create_topic("records", 1)
    cluster.produce("records", [document(n) for n in range(10)])
    listed = {md5_of(n): 100 + n for n in (3, 6)}
    failing = Verifier(tmp_path, cluster, "v1", listed, sinks=[{"use": "refusing"}],
                       extra_plugins=[RefusingPlugin()])
    wait_for(lambda: failing.source.counts["nak"] >= 2)  # read again after the first nak, failed again
    assert cluster.committed("verifiers", "records", 1) == {0: 3}  # offsets 0-2 clean, 3 never delivered
    failing.stop()
    assert cluster.committed("verifiers", "records", 1) == {0: 3}
    verifier = Verifier(tmp_path, cluster, "v2", listed)
    wait_for(lambda: len(verifier.records()) == 2)
    wait_for(lambda: cluster.committed("verifiers", "records", 1) == {0: 10}, step=0.3)
    verifier.stop()
    assert sorted(r["path"] for r in verifier.records()) == ["/srv/host-a/file3", "/srv/host-a/file6"]


def test_malformed_messages_are_counted_not_scanned_and_committed(tmp_path, cluster):
    cluster.create_topic("records", 1)
    cluster.produce("records", [b"garbage", document(1), b'{"path": 5}', b"\x00" * 10,
                                json.dumps({"id": "e1", "host": "h", "kind": "file_event", "path": "/x"}).encode()])
    verifier = Verifier(tmp_path, cluster, "v1", {md5_of(1): 101})
    wait_for(lambda: cluster.committed("verifiers", "records", 1) == {0: 5}, step=0.3)
    summary = verifier.stop()
    assert summary.not_scanned[MALFORMED] == 3 and summary.not_scanned["no digests"] == 1
    assert [r["path"] for r in verifier.records()] == ["/srv/host-a/file1"]


def test_two_verifiers_in_one_group_share_the_partitions_and_judge_each_record_once(tmp_path, cluster):
    cluster.create_topic("records", 4)
    listed = {md5_of(n): 100 + n for n in range(0, 200, 2)}
    first = Verifier(tmp_path, cluster, "v1", listed)
    second = Verifier(tmp_path, cluster, "v2", listed)
    both = lambda: len(first.source._parts) + len(second.source._parts) == 4  # noqa: E731
    wait_for(lambda: both() and first.source._parts and second.source._parts)
    time.sleep(1.0)  # the group settled
    assert both()
    cluster.produce("records", [document(n) for n in range(200)])
    done = lambda: len(first.records()) + len(second.records()) >= 100  # noqa: E731
    wait_for(done)
    wait_for(lambda: cluster.committed("verifiers", "records", 4) == cluster.ends("records", 4), step=0.3)
    first.stop()
    second.stop()
    paths_out = [r["path"] for r in first.records() + second.records()]
    assert sorted(paths_out) == sorted(f"/srv/host-a/file{n}" for n in range(0, 200, 2))  # each once
    assert first.records() and second.records()
    assert first.source.counts["messages"] + second.source.counts["messages"] == 200
