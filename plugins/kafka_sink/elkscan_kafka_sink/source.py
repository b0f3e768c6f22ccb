"""The ``kafka`` source: record documents from a Kafka topic, read in a consumer group, each judged as a
digest target (a fleet verifier, docs/fleet.md).

Offsets are committed by hand, never automatically: a partition's offset moves past a message only once
its ``Receipt`` was acked and every earlier message of the partition was settled too (a watermark per
partition). A nak holds the watermark and, after a backoff, reads the partition again from it, so the
message comes again promptly (and the ones after it with it: at least once). confluent-kafka's Consumer
is not safe to use from several threads, so receipts only queue their outcome; the source's thread,
which polls, applies them and commits.
"""

from __future__ import annotations

import collections
import logging
import queue
import re
import threading
import time
from typing import Any, Iterator, Optional

import attrs
from attrs import field, frozen
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from elkscan_core import ComponentError, ConfigError, Source
from elkscan_core.delivery import RetryOptions
from elkscan_core.fleet import digest_target
from elkscan_core.model import Receipt, Target
from elkscan_core.text import visible
from elkscan_core.units import Duration, shown

from .kafka import SecurityOptions, _brokers, _topic, security_properties, trusted_files
from .logs import RateLimitedLog

log = logging.getLogger("elkscan.kafka_sink")

_GROUP = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: How long one poll waits for a message: ``stop()`` is seen within about this.
POLL = 0.1
#: Settled offsets are committed at most this often (and at once on a rebalance and at the end).
COMMIT_EVERY = 0.5
#: Messages not committed past (settled ones waiting behind one that is not) are held up to this many
#: times ``max_in_flight``: a record that waits for a sink's flush does not stall its partition.
WINDOW = 10
#: How long ``close()`` waits for the source's thread to let go of the consumer, and for the last commit.
CLOSE_WAIT = 5.0
MALFORMED = "malformed record"


def _group(_instance, attribute, value: str) -> None:
    if not _GROUP.fullmatch(value):
        raise ConfigError(f"a consumer group: 1 to 249 of A-Z a-z 0-9 . _ -, got {shown(value)}", attribute.name)


def _session_timeout(_instance, attribute, value: float) -> None:
    if not 1.0 <= value <= 3600.0:
        raise ConfigError(f"1s to 1h, got {value:g}s", attribute.name)


def _in_flight(_instance, attribute, value: int) -> None:
    if not 1 <= value <= 100_000:
        raise ConfigError(f"1 to 100000 messages, got {value}", attribute.name)


@frozen(kw_only=True)
class KafkaSourceConfig:
    """``brokers``, ``topic``, ``group`` (the consumer group that shares the topic's partitions),
    ``security`` (as the sink's), ``max_in_flight`` (messages being judged and delivered), ``start``
    (where a group without a committed offset begins), ``retry`` (the wait before a nak'd message is
    read again: ``initial``, doubled up to ``max``) and ``session_timeout`` (how long the group waits for
    a silent member before its partitions go to the others)."""

    brokers: Any = field(converter=_brokers)
    topic: str = field(validator=_topic)
    group: str = field(validator=_group)
    security: SecurityOptions = SecurityOptions()
    max_in_flight: int = field(default=1000, validator=_in_flight)
    start: str = field(default="earliest", validator=attrs.validators.in_(("earliest", "latest")))
    retry: RetryOptions = RetryOptions(initial=Duration(1.0), max=Duration(60.0))
    session_timeout: Duration = field(default=Duration(45.0), validator=_session_timeout)


class Watermark:
    """One assigned partition's messages from its commit point on, in the order they were read:
    ``commit_point()`` is the offset of the first one not settled, or the one after the last read."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # receipts of another epoch (before a rebalance or a seek) are stale
        self.pending: collections.deque[int] = collections.deque()
        self.settled: set[int] = set()
        self.next: Optional[int] = None

    def read(self, offset: int) -> bool:
        """Take a message just read; False for one already taken (read again after a seek's race)."""
        if self.next is not None and offset < self.next:
            return False
        self.pending.append(offset)
        self.next = offset + 1
        return True

    def settle(self, offset: int) -> None:
        self.settled.add(offset)
        while self.pending and self.pending[0] in self.settled:
            self.settled.discard(self.pending.popleft())

    def commit_point(self) -> Optional[int]:
        return self.pending[0] if self.pending else self.next


class KafkaSource(Source):
    """Record documents from a Kafka topic in a consumer group, each a digest target with a receipt."""

    id = "kafka"
    Config = KafkaSourceConfig

    def __init__(self, config: KafkaSourceConfig, session: Any) -> None:
        super().__init__(config, session)
        self._consumer: Optional[Consumer] = None
        self._using = threading.Lock()  # held while a thread calls the consumer
        self._closed = False
        self._settled: queue.SimpleQueue[tuple[int, int, int, bool]] = queue.SimpleQueue()
        self._wake = threading.Event()  # a receipt was settled
        self._parts: dict[int, Watermark] = {}  # partition -> its watermark, while assigned
        self._committed: dict[int, int] = {}  # partition -> the offset last committed
        self._retry: dict[int, tuple[float, int]] = {}  # nak'd partition -> (when, offset) to read it again from
        self._failures: dict[int, tuple[int, int]] = {}  # nak'd partition -> (naks in a row, at which offset)
        self._epochs = 0
        self._unsettled = 0  # receipts handed out and not settled yet (stale ones included)
        self._paused = False  # every partition paused: max_in_flight reached
        self._last_commit = 0.0
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def name(self) -> str:
        return f"source {self.id!r}"

    def check(self) -> None:
        trusted_files(self.config.security, self.session, self.name)

    def start(self) -> None:
        config = self.config
        self._log = RateLimitedLog(log, self.name, on_fatal="the source stops")
        if config.security.protocol == "sasl_plaintext" and config.security.sasl_mechanism == "PLAIN":
            log.warning("%s: SASL PLAIN over sasl_plaintext sends the password unencrypted; use sasl_ssl",
                        self.name)
        properties = {
            "bootstrap.servers": ",".join(config.brokers), "client.id": "elkscan", "group.id": config.group,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": config.start, "enable.partition.eof": False,
            "partition.assignment.strategy": "roundrobin",  # eager: a rebalance revokes all, committed at once
            "session.timeout.ms": int(config.session_timeout * 1000),
            "heartbeat.interval.ms": int(min(3.0, config.session_timeout / 3) * 1000),
            "queued.max.messages.kbytes": 4096,  # what librdkafka fetches ahead: about 4 MiB, not 64
            "logger": self._log, "error_cb": self._log.error, "on_commit": self._on_commit,
            **security_properties(config.security, trusted_files(config.security, self.session, self.name))}
        try:
            self._consumer = Consumer(properties)
            self._consumer.subscribe([config.topic], on_assign=self._assigned, on_revoke=self._revoked,
                                     on_lost=self._lost)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ComponentError(f"{self.name}: librdkafka refused the configuration: {self._redacted(exc)}") from None

    def describe(self) -> str:
        return f"{self.id} {','.join(self.config.brokers)}/{self.config.topic} group {self.config.group}"

    def _redacted(self, exc: Exception) -> str:
        text = str(exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else exc)
        password = self.config.security.password
        return text.replace(password, "***") if password else text

    # -- the source's thread -------------------------------------------------------------------

    def targets(self) -> Iterator[Target]:
        while not self.stopping.is_set():
            with self._using:
                if self._closed:
                    return
                target = self._step()
            if target is not None:
                yield target

    def _step(self) -> Optional[Target]:
        """Apply settled receipts, commit, retry nak'd partitions, keep within ``max_in_flight``, and
        read one message: its target, or None."""
        consumer = self._consumer
        self._apply_settled()
        if time.monotonic() - self._last_commit >= COMMIT_EVERY:
            self._commit(list(self._parts))
        self._read_again()
        self._bound()
        message = consumer.poll(0 if self._paused else POLL)  # paused: only rebalances and errors are served
        if message is None:
            if self._paused:  # wake on a receipt
                self._wake.wait(POLL)
                self._wake.clear()
            return None
        if message.error() is not None:
            self._log.error(message.error())
            return None
        return self._target(message.partition(), message.offset(), message.value())

    def _target(self, partition: int, offset: int, value: Optional[bytes]) -> Optional[Target]:
        """The message's digest target; a malformed one is counted as not scanned and settled at once."""
        part = self._parts.get(partition)
        if part is None or partition in self._retry or not part.read(offset):
            return None  # no longer ours, waiting to be read again, or already read
        self.counts["messages"] += 1
        epoch = part.epoch
        receipt = Receipt(lambda: self._settle(epoch, partition, offset, True),
                          lambda: self._settle(epoch, partition, offset, False))
        try:
            target = digest_target(value or b"", self.id, receipt)
        except ValueError as exc:
            log.warning("%s: %s[%d]@%d: %s; skipped", self.name, self.config.topic, partition, offset,
                        visible(str(exc)))
            self.counts["malformed"] += 1
            part.settle(offset)  # a poison message never comes back
            return Target(f"kafka:{self.config.topic}/{partition}/{offset}", origin=self.id, skip=MALFORMED)
        self._unsettled += 1
        return target

    def _settle(self, epoch: int, partition: int, offset: int, ok: bool) -> None:
        """A receipt's ``ack``/``nak``, from any thread: queued for the source's thread."""
        self._settled.put((epoch, partition, offset, ok))
        self._wake.set()

    def _apply_settled(self) -> None:
        while True:
            try:
                epoch, partition, offset, ok = self._settled.get_nowait()
            except queue.Empty:
                return
            self._unsettled -= 1
            part = self._parts.get(partition)
            if part is None or part.epoch != epoch:
                continue  # read before a rebalance or a seek: it comes again, or was committed already
            if ok:
                part.settle(offset)
            else:
                self._nak(partition, part)

    def _nak(self, partition: int, part: Watermark) -> None:
        """Hold the partition at its watermark and read it again from there after a backoff."""
        self.counts["nak"] += 1
        self._commit([partition])
        point = part.commit_point()
        naks = self._failures.get(partition, (0, 0))[0] + 1
        self._failures[partition] = (naks, point)
        retry = self.config.retry
        wait = min(retry.max, retry.initial * 2 ** min(naks - 1, 30))
        self._retry[partition] = (time.monotonic() + wait, point)
        self._parts[partition] = Watermark(self._next_epoch())  # what is in flight of it is stale now
        self._pause([partition])
        log.warning("%s: a record from %s[%d] was not delivered to every sink; reading the partition again "
                    "from offset %d in %.3gs", self.name, self.config.topic, partition,
                    self._retry[partition][1], wait)

    def _read_again(self) -> None:
        now = time.monotonic()
        for partition, (when, offset) in list(self._retry.items()):
            if now < when:
                continue
            del self._retry[partition]
            tp = TopicPartition(self.config.topic, partition, offset)
            try:
                self._consumer.seek(tp)
            except KafkaException as exc:
                self._log.error(exc.args[0])
            if not self._paused:
                self._consumer.resume([tp])

    def _bound(self) -> None:
        """Pause every partition while ``max_in_flight`` receipts are unsettled, or ``WINDOW`` times as
        many messages are not committed past (settled ones behind one that is not), until half of that
        is left (a pause drops what librdkafka fetched ahead: a resume fetches again)."""
        limit = self.config.max_in_flight
        held = max(self._unsettled, sum(len(part.pending) for part in self._parts.values()) // WINDOW)
        if not self._paused and held >= limit:
            self._paused = True
            self._pause(list(self._parts))
        elif self._paused and held <= limit // 2:
            self._paused = False
            self._consumer.resume([TopicPartition(self.config.topic, p) for p in self._parts if p not in self._retry])

    def _pause(self, partitions: list[int]) -> None:
        if partitions:
            self._consumer.pause([TopicPartition(self.config.topic, p) for p in partitions])

    def _commit(self, partitions: list[int], wait: bool = False, consumer: Optional[Consumer] = None) -> None:
        """Commit each partition's watermark that moved (asynchronously, unless ``wait``)."""
        consumer = consumer or self._consumer
        self._last_commit = time.monotonic()
        offsets = []
        for partition in partitions:
            part = self._parts.get(partition)
            point = part.commit_point() if part is not None else None
            if point is not None and point != self._committed.get(partition):
                offsets.append(TopicPartition(self.config.topic, partition, point))
                if point > self._failures.get(partition, (0, point))[1]:
                    del self._failures[partition]  # past what was nak'd: the backoff starts afresh
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=not wait)
        except KafkaException as exc:  # the coordinator unreachable: committed on a later round, else read again
            self._log.error(exc.args[0])
            return
        for tp in offsets:
            self._committed[tp.partition] = tp.offset

    def _on_commit(self, err: Optional[KafkaError], offsets: list[TopicPartition]) -> None:
        """An asynchronous commit's outcome (served by poll): one that failed is made again next round."""
        failed = [tp for tp in offsets if err is not None or tp.error is not None]
        for tp in failed:
            if self._committed.get(tp.partition) == tp.offset:
                del self._committed[tp.partition]
        if failed:
            self._log.error(err if err is not None else failed[0].error)

    # -- rebalances (called inside poll or close, on the thread that holds the consumer) --------

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._parts[tp.partition] = Watermark(self._next_epoch())
            self._committed.pop(tp.partition, None)
        if self._paused:  # taken whole now so that it can be paused before anything is read
            consumer.assign(partitions)
            consumer.pause(partitions)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is settled of the partitions given up, and forget their messages in flight."""
        self._apply_settled()
        numbers = [tp.partition for tp in partitions]
        self._commit(numbers, wait=True, consumer=consumer)
        self._forget(numbers)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a rebalance (this member was dropped): nothing can be committed."""
        self._forget([tp.partition for tp in partitions])

    def _forget(self, partitions: list[int]) -> None:
        for partition in partitions:
            self._parts.pop(partition, None)
            self._retry.pop(partition, None)
            self._failures.pop(partition, None)

    def _next_epoch(self) -> int:
        self._epochs += 1
        return self._epochs

    # -- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what the sinks have (the session settled every receipt before it closes sources) and
        leave the group, so that its partitions go to the others at once; within ``CLOSE_WAIT`` seconds
        each (librdkafka waits out the session timeout for a coordinator it cannot reach)."""
        consumer = self._consumer
        if consumer is None:
            return
        if not self._using.acquire(timeout=CLOSE_WAIT):
            log.warning("%s: the source's thread still holds the consumer; leaving without a last commit", self.name)
            return
        self._closed = True
        self._consumer = None
        self._using.release()
        ended = threading.Event()

        def last_commit_and_leave() -> None:
            try:
                self._apply_settled()
                self._commit(list(self._parts), wait=True, consumer=consumer)
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s: %s", self.name, exc)
            finally:
                ended.set()

        threading.Thread(target=last_commit_and_leave, name="kafka-close", daemon=True).start()
        if not ended.wait(CLOSE_WAIT):
            log.warning("%s: the brokers did not answer within %gs; the group gives this verifier's partitions "
                        "to the others after session_timeout", self.name, CLOSE_WAIT)
