"""The ``kafka`` sink: each record as one message on a Kafka topic, keyed by the record's ``id``, through
the delivery spool (at least once, across outages and restarts).

The producer is librdkafka's (confluent-kafka), idempotent with ``acks=all``: a batch of the spool is
delivered once every one of its messages has a delivery report without error, within the call's
``timeout``. A message that fails for a reason that can pass (a broker down, a leader election, a
timeout) is produced again on the next attempt, the others of its batch are not; one that Kafka refuses
for good (too large, the topic not ours to write) is dropped and counted as refused.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Optional

import attrs
from attrs import field, frozen
from confluent_kafka import KafkaError, KafkaException, Producer

from elkscan_core import ComponentError, ConfigError, Size
from elkscan_core.delivery import DeliveryRejected, Item, SpoolingConfig, SpoolingSink
from elkscan_core.trust import UntrustedError, check_trusted
from elkscan_core.units import shown

from .logs import RateLimitedLog

log = logging.getLogger("elkscan.kafka_sink")

PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: Kafka's refusals of the records themselves: sending them again cannot succeed.
PERMANENT = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
                       KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.TOPIC_EXCEPTION,
                       KafkaError.POLICY_VIOLATION})
_BROKER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")  # Kafka's legal topic names
MIN_MESSAGE, MAX_MESSAGE = 1000, 1_000_000_000  # librdkafka's bounds of message.max.bytes


def _brokers(value: Any) -> tuple[str, ...]:
    """``host:port``, several joined by commas, or a list of them."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"expected host:port or a list of them, got {shown(value)}", "brokers")
    brokers = tuple(v.strip() for v in value)
    for broker in brokers:
        match = _BROKER.fullmatch(broker)
        if match is None or not 0 < int(match[2]) < 65536:
            raise ConfigError(f"expected host:port (e.g. kafka-1.example.net:9092), got {shown(broker)}", "brokers")
    return brokers


def _topic(_instance, attribute, value: str) -> None:
    if not _TOPIC.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"a Kafka topic name: 1 to 249 of A-Z a-z 0-9 . _ -, got {shown(value)}", attribute.name)


def _message_size(_instance, attribute, value: int) -> None:
    if not MIN_MESSAGE <= value <= MAX_MESSAGE:
        raise ConfigError(f"{MIN_MESSAGE} to {MAX_MESSAGE} bytes, got {value}", attribute.name)


@frozen(kw_only=True)
class SecurityOptions:
    """``security:``: TLS (``ca_file``, and ``cert_file`` with ``key_file`` for a client certificate) and
    SASL (``sasl_mechanism``, ``username``, ``password``: write ``{$env: NAME}``, never the password)."""

    protocol: str = field(default="plaintext", validator=attrs.validators.in_(PROTOCOLS))
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    sasl_mechanism: str = field(default="PLAIN", validator=attrs.validators.in_(MECHANISMS))
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.protocol in ("ssl", "sasl_ssl")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("sasl_")

    def __attrs_post_init__(self) -> None:
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ConfigError("ca_file, cert_file and key_file are for protocol ssl or sasl_ssl", "protocol")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("a client certificate takes both cert_file and key_file", "cert_file")
        if self.sasl and (self.username is None or self.password is None):
            raise ConfigError(f"protocol {self.protocol} takes username and password ({{$env: NAME}})",
                              "username")
        if not self.sasl and (self.username is not None or self.password is not None):
            raise ConfigError("username and password are for protocol sasl_plaintext or sasl_ssl", "protocol")

    def files(self) -> list[tuple[str, str]]:
        """The configured files and their option names."""
        return [(path, name) for name, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file),
                                                ("key_file", self.key_file)) if path]


@frozen(kw_only=True)
class KafkaConfig(SpoolingConfig):
    """``brokers`` (bootstrap ``host:port``\\ s), ``topic``, ``security`` (TLS, SASL) and ``max_message``
    (the largest message in bytes: the topic's ``max.message.bytes`` when it is lower than Kafka's 1 MB)."""

    brokers: Any = field(converter=_brokers)
    topic: str = field(validator=_topic)
    security: SecurityOptions = SecurityOptions()
    max_message: Size = field(default=Size(1_000_000), validator=_message_size)


def trusted_files(security: SecurityOptions, session: Any, name: str) -> dict[str, str]:
    """The TLS files, resolved and trusted as every file that steers elkscan (docs/hardening.md)."""
    files = {}
    for path, option in security.files():
        resolved = session.resolve_path(path)
        try:
            check_trusted(resolved, f"{name}: security.{option}")
        except UntrustedError as exc:
            raise ComponentError(str(exc)) from None
        files[option] = resolved
    return files


def security_properties(security: SecurityOptions, files: dict[str, str]) -> dict[str, Any]:
    """librdkafka's properties for ``security:`` (``files``: the trusted TLS files)."""
    properties: dict[str, Any] = {"security.protocol": security.protocol}
    if security.tls:  # verified as librdkafka 2 does by default, whatever an older one would do
        properties.update({"enable.ssl.certificate.verification": True,
                           "ssl.endpoint.identification.algorithm": "https",
                           "ssl.ca.location": files.get("ca_file", "probe")})  # probe: the system's CAs
        if "cert_file" in files:
            properties["ssl.certificate.location"] = files["cert_file"]
            properties["ssl.key.location"] = files["key_file"]
    if security.sasl:
        properties.update({"sasl.mechanism": security.sasl_mechanism, "sasl.username": security.username,
                           "sasl.password": security.password})
    return properties


#: What became of a message of the batch: not produced (yet, or again), awaiting its report, delivered.
_NEW, _SENT, _OK = "new", "sent", "ok"


class _Batch:
    """One batch of the spool across the attempts to deliver it: each message's state, or the
    ``KafkaError`` of a refusal for good, and the last error that can pass."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.state: list[Any] = [_NEW] * len(items)
        self.error: Optional[KafkaError] = None

    def delivered(self, index: int, err: Optional[KafkaError], _message: Any = None) -> None:
        """A delivery report (librdkafka calls it from ``flush``/``poll``, on the delivery thread)."""
        if err is None:
            self.state[index] = _OK
        elif err.code() in PERMANENT:
            self.state[index] = err
        else:
            self.state[index] = _NEW
            self.error = err

    def count(self, state: str) -> int:
        return sum(s is state for s in self.state)  # by identity: a KafkaError compares only to codes

    def refused(self) -> list[KafkaError]:
        return [s for s in self.state if isinstance(s, KafkaError)]


class NotDelivered(Exception):
    """A batch not wholly acknowledged within the call: retried through the spool."""


class KafkaSink(SpoolingSink):
    """Records to a Kafka topic, keyed by record id, through the spool."""

    id = "kafka"
    Config = KafkaConfig
    _producer: Optional[Producer] = None

    def destination(self) -> str:
        return f"{','.join(self.config.brokers)}/{self.config.topic}"

    def check(self) -> None:
        super().check()
        self._trusted_files()

    def open(self) -> None:
        self._log = RateLimitedLog(log, self.name)
        self._files = self._trusted_files()
        self._fatal = False
        self._batch: Optional[_Batch] = None
        security = self.config.security
        if security.protocol == "sasl_plaintext" and security.sasl_mechanism == "PLAIN":
            log.warning("%s: SASL PLAIN over sasl_plaintext sends the password unencrypted; use sasl_ssl",
                        self.name)
        self._client()  # a property librdkafka refuses stops the start, not the first delivery

    def _trusted_files(self) -> dict[str, str]:
        return trusted_files(self.config.security, self.session, self.name)

    def _properties(self) -> dict[str, Any]:
        config, security = self.config, self.config.security
        properties: dict[str, Any] = {
            "bootstrap.servers": ",".join(config.brokers), "client.id": "elkscan",
            "acks": "all", "enable.idempotence": True,
            # librdkafka gives up on a message when the call's time is up; the spool then retries it
            "message.timeout.ms": max(1, int(config.timeout * 1000)),
            "message.max.bytes": int(config.max_message),
            "partitioner": "murmur2_random",  # as Java clients: one key, one partition, whoever produced
            "logger": self._log, "error_cb": self._on_error}
        properties.update(security_properties(security, self._files))
        return properties

    def _client(self) -> Producer:
        if self._fatal:  # an idempotent producer that hit a fatal error sends nothing more: a new one
            self.release()
            self._fatal = False
            if self._batch is not None:  # what the old one held never gets its report: send it again
                self._batch.state = [_NEW if s is _SENT else s for s in self._batch.state]
        if self._producer is None:
            try:
                self._producer = Producer(self._properties())
            except (KafkaException, ValueError, TypeError) as exc:
                raise ComponentError(f"{self.name}: librdkafka refused the configuration: "
                                     f"{self._redacted(exc)}") from None
        return self._producer

    def _redacted(self, exc: Exception) -> str:
        text = str(exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else exc)
        password = self.config.security.password
        return text.replace(password, "***") if password else text

    def _on_error(self, err: KafkaError) -> None:
        self._noticed(err)
        self._log.error(err)

    def _noticed(self, err: KafkaError) -> None:
        if err.fatal() or err.code() == KafkaError._FATAL:
            self._fatal = True

    # -- delivery (the delivery thread) --------------------------------------------------------

    def send_batch(self, items: list[Item]) -> None:
        deadline = time.monotonic() + self.config.timeout
        batch = self._batch if self._batch is not None and self._batch.items is items else _Batch(items)
        self._batch = batch
        producer = self._client()
        for index, item in enumerate(items):
            if batch.state[index] is _NEW:
                self._produce(producer, batch, index, item, deadline)
        try:
            producer.flush(max(0.0, deadline - time.monotonic()))
        except (KafkaException, SystemError) as exc:  # a fatal error, or one met inside a delivery report
            for cause in (exc, exc.__cause__, exc.__context__):
                if isinstance(cause, KafkaException):
                    self._noticed(cause.args[0])
            raise
        waiting, again = batch.count(_SENT), batch.count(_NEW)
        if waiting or again:
            cause = f"; {batch.error.name()}: {batch.error.str()}" if batch.error is not None else ""
            raise NotDelivered(f"{waiting + again} of {len(items)} message(s) not acknowledged within "
                               f"{self.config.timeout:g}s{cause}")
        self._batch = None
        refused = batch.refused()
        if refused:
            raise DeliveryRejected(f"{refused[0].name()}: {refused[0].str()}", count=len(refused))

    def _produce(self, producer: Producer, batch: _Batch, index: int, item: Item, deadline: float) -> None:
        report = functools.partial(batch.delivered, index)
        while True:
            try:
                producer.produce(self.config.topic, value=item.data, key=item.id.encode("ascii"), on_delivery=report)
            except BufferError:  # librdkafka's queue is full: let it drain
                if time.monotonic() >= deadline:
                    raise NotDelivered("librdkafka's queue stayed full for the whole call") from None
                producer.poll(0.05)
                continue
            except KafkaException as exc:  # refused before it left (larger than max_message), or fatal
                err = exc.args[0]
                if err.code() not in PERMANENT:
                    self._noticed(err)
                    raise
                batch.state[index] = err
                return
            batch.state[index] = _SENT
            return

    def release(self) -> None:
        """Drop what librdkafka still holds (it waits in the spool) and let the producer go."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.purge()
                producer.flush(0)  # serves the purged messages' reports: they are sent again next time
            except (KafkaException, SystemError):  # a producer that hit a fatal error refuses; it goes all the same
                pass
