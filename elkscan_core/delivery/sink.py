"""The base classes of the delivery sinks: ``DeliverySink`` (format, record ids, ``repeat_after``) and
``SpoolingSink`` (at-least-once delivery through a spool, for every sink that sends over a network)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from typing import Any, Optional

import attrs
from attrs import field, frozen

from ..components import Measure, Sink
from ..ecs import ecs_document
from ..errors import ComponentError, ConfigError
from ..model import Outcome, Record
from ..render import json_line, record_fields
from ..trust import UntrustedError, check_trusted
from ..units import MiB, Duration, Size
from .repeats import Repeats
from .spool import Item, Spool, private_dir

log = logging.getLogger("elkscan.delivery")

FORMATS = ("jsonl", "ecs")
#: How often an idle writer saves the repeats and puts the spool on disk (and at close, always).
_SAVE_EVERY = 5.0
_SYNC_EVERY = 1.0


def _positive(_instance, attribute, value) -> None:
    if value <= 0:
        raise ConfigError(f"must be above 0, got {value}", attribute.name)


def _batch(_instance, attribute, value: int) -> None:
    if not 1 <= value <= 100_000:
        raise ConfigError(f"1 to 100000 records, got {value}", attribute.name)


@frozen
class SpoolOptions:
    """``spool:``: where undelivered records wait (``dir``, default under the state directory) and how
    much room they may take (``max_size``; when full, the oldest are dropped and counted)."""

    dir: Optional[str] = None
    max_size: Size = field(default=Size(64 * MiB), validator=_positive)


@frozen
class RetryOptions:
    """``retry:``: the first wait after a failed delivery (``initial``), doubled on each failure up to
    ``max``, with jitter (a random half of each wait)."""

    initial: Duration = field(default=Duration(1.0), validator=_positive)
    max: Duration = field(default=Duration(300.0), validator=_positive)


@frozen(kw_only=True)
class DeliveryConfig:
    """What every delivery sink takes: ``format`` (``jsonl`` or ``ecs``). Subclass it with
    ``@frozen(kw_only=True)`` to add a sink's own options."""

    format: str = field(default="jsonl", validator=attrs.validators.in_(FORMATS))


@frozen(kw_only=True)
class SpoolingConfig(DeliveryConfig):
    """What every network sink takes besides ``format``: ``spool``, ``retry``, ``timeout`` (each
    delivery call, and how long ``close()`` goes on delivering), ``batch`` and ``flush_interval``."""

    spool: SpoolOptions = SpoolOptions()
    retry: RetryOptions = RetryOptions()
    timeout: Duration = field(default=Duration(10.0), validator=_positive)
    batch: int = field(default=100, validator=_batch)
    flush_interval: Duration = field(default=Duration(1.0), validator=_positive)


class DeliveryRejected(Exception):
    """Raised by ``send_batch`` when the endpoint refused the records themselves (a malformed document,
    too large): they are dropped and reported, not retried. ``count``: how many it refused when it took
    the rest of the batch (an endpoint that judges each record: Elasticsearch ``_bulk``, JetStream);
    default: the whole batch."""

    def __init__(self, message: str, count: Optional[int] = None) -> None:
        super().__init__(message)
        self.count = count


class RetryLater(Exception):
    """Raised by ``send_batch`` for a failure the endpoint gave a wait for (HTTP ``Retry-After``): the
    next attempt waits ``retry_after`` seconds, or the backoff if that is longer, never past ``retry.max``."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeliverySink(Sink):
    """A sink that delivers records as documents (JSON lines or ECS) to somewhere else than a person:
    each carries the host name, and a detection already sent is held back for ``repeat_after``.

    A subclass writes ``self.document(record)`` (bytes, or None when held back) from ``write()``, and
    names where it delivers in ``destination()``: its state directory is named after it. One that
    wraps documents in a format of its own overrides ``document()`` and starts from ``self.fields()``.
    """

    Config = DeliveryConfig
    #: Documents in ASCII (other characters as JSON escapes), for receivers that are not UTF-8 safe.
    ascii_only: bool = False

    def destination(self) -> str:
        """Where records go (a file path, an address, a URL): two sinks of one kind that deliver to
        different places keep different state."""
        return ""

    def state_directory(self) -> str:
        """``<state_dir>/delivery/<id>-<12 hex digits of the destination's SHA-256>``."""
        digest = hashlib.sha256(self.destination().encode("utf-8", "surrogateescape")).hexdigest()[:12]
        return os.path.join(self.session.state_dir, "delivery", f"{self.id}-{digest}")

    @property
    def name(self) -> str:
        return f"sink {self.id!r}"

    def check(self) -> None:
        _check_state_dir(self.state_directory(), self.name)

    def start(self) -> None:
        directory = self._private(self.state_directory(), "state directory")
        self.repeats = Repeats(directory, self.session.pipeline.repeat_after, self.name)
        self._saved = time.monotonic()

    def _private(self, path: str, what: str) -> str:
        try:
            return private_dir(path, f"{self.name}: {what}")
        except UntrustedError as exc:
            raise ComponentError(str(exc)) from None
        except OSError as exc:
            raise ComponentError(f"{what} {path}: {exc.strerror or exc}") from None

    def metrics(self) -> list[Measure]:
        """Detections held back as repeats, for the metrics endpoint (docs/metrics.md)."""
        return [Measure("sink_held_back", self.repeats.held, "counter",
                        "Detections not sent again: sent less than repeat_after ago")]

    def fields(self, record: Record) -> dict[str, Any] | None:
        """The record's document in the configured format (JSON lines' fields with ``host``, or ECS), or
        None when it repeats a detection sent less than ``repeat_after`` ago. ``host`` is this host, or
        for a file of another host that host (and this one is the ``verifier``)."""
        if self.repeats.held_back(record):
            return None
        fields = record_fields(record, self.session.host)
        if self.config.format == "ecs":
            return ecs_document(fields, self.session.host)
        fields.setdefault("host", self.session.host)
        return fields

    def document(self, record: Record) -> bytes | None:
        """``fields(record)`` as one line of JSON (UTF-8, no newline), or None when held back."""
        fields = self.fields(record)
        if fields is None:
            return None
        return json_line(fields, ascii_only=self.ascii_only)[:-1].encode("utf-8")

    def flush(self) -> None:
        if time.monotonic() - self._saved > _SAVE_EVERY:
            self._save()

    def close(self) -> None:
        if hasattr(self, "repeats"):
            self._save()

    def _save(self) -> None:
        self._saved = time.monotonic()
        try:
            self.repeats.save()
        except OSError as exc:
            log.warning("%s: cannot save %s (%s); repeats may be sent again", self.name, self.repeats.path,
                        exc.strerror)


class SpoolingSink(DeliverySink):
    """At-least-once delivery for a network sink: ``write()`` appends the record to the spool (never
    waiting for the network); a delivery thread sends batches with ``send_batch`` and, when it raises,
    retries with exponential backoff and jitter. A record leaves the spool only once delivered, so an
    outage or a restart of elkscan loses none (the spool's size cap aside: the oldest are dropped and
    reported). ``close()`` delivers what it can within ``timeout`` and leaves the rest for the next run.

    A subclass implements ``send_batch(items)`` (bounded by ``self.config.timeout``) and may override
    ``open()`` (start a client; called before delivery begins) and ``release()`` (stop it; called at
    close, also when a call is still stuck).
    """

    Config = SpoolingConfig

    def send_batch(self, items: list[Item]) -> None:
        """Deliver these documents (each ``item.id`` and ``item.data``), in order; raise to retry them
        later (``RetryLater`` with the wait the endpoint asked for), or raise ``DeliveryRejected`` when the
        endpoint refuses them for good. A batch that failed comes back as it was, the same items, until it
        is delivered or rejected: a sink may remember which of them already went."""
        raise NotImplementedError

    def open(self) -> None:
        """Get ready to send (a client, a connection); raise ComponentError to refuse to start."""

    def release(self) -> None:
        """Let go of what ``open()`` and ``send_batch`` acquired."""

    def spool_directory(self) -> str:
        configured = self.config.spool.dir
        return self.session.resolve_path(configured) if configured else self.state_directory()

    def check(self) -> None:
        _check_state_dir(self.spool_directory(), self.name)

    def start(self) -> None:
        directory = self._private(self.spool_directory(), "spool")
        self.repeats = Repeats(directory, self.session.pipeline.repeat_after, self.name)
        self._saved = self._synced = time.monotonic()
        try:
            self.spool = Spool(directory, self.config.spool.max_size, self.name)
        except BlockingIOError:
            raise ComponentError(f"spool {directory} is in use by another elkscan session; give this sink "
                                 "its own spool.dir") from None
        except OSError as exc:
            raise ComponentError(f"spool {directory}: {exc.strerror or exc}") from None
        self.counters = {"delivered": 0, "failed_attempts": 0, "dropped": 0, "rejected": 0}
        self._dropped = self.spool.dropped
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._failing = 0  # failed attempts in a row
        self._said_overran = False
        if self.spool.depth:
            log.info("%s: %d record(s) wait in the spool from an earlier run", self.name, self.spool.depth)
        self.open()
        self._thread = threading.Thread(target=self._deliver, name=f"deliver-{self.id}", daemon=True)
        self._thread.start()

    # -- the writer thread ---------------------------------------------------------------------

    def write(self, record: Record) -> None:
        data = self.document(record)
        if data is None:
            return
        if not self.spool.append(record.id, data):
            log.warning("%s: a record of %d bytes is larger than the whole spool; dropped", self.name,
                        len(data))
        self._report_drops()
        if self.spool.depth >= self.config.batch:
            self._wake.set()

    def flush(self) -> None:
        super().flush()
        if time.monotonic() - self._synced > _SYNC_EVERY:
            self._synced = time.monotonic()
            self.spool.sync()

    def _report_drops(self) -> None:
        dropped = self.spool.dropped - self._dropped
        if dropped:
            self._dropped = self.spool.dropped
            self.counters["dropped"] += dropped
            self.session.report(Outcome(self.id, "dropped", message=f"the spool is full "
                                        f"({self.config.spool.max_size} bytes): {dropped} record(s) were "
                                        "dropped, never delivered"))

    # -- the delivery thread -------------------------------------------------------------------

    def _deliver(self) -> None:
        config = self.config
        while True:
            if not self._closing.is_set() and self.spool.depth < config.batch:
                self._wake.wait(config.flush_interval)
                self._wake.clear()
            try:
                items, end = self.spool.read(config.batch)
                if items and not self._send(items):
                    self.spool.rewind()  # closing: they stay in the spool for the next run
                    return
                self.spool.ack(end)
            except OSError:  # the spool's disk: the records stay where they are
                log.exception("%s: the spool failed; trying again", self.name)
                if self._closing.wait(config.flush_interval):
                    return
                continue
            if not items and self._closing.is_set():
                return

    def _send(self, items: list[Item]) -> bool:
        """Deliver one batch, retrying until it goes, it is rejected, or the sink closes (False)."""
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                self.send_batch(items)
            except DeliveryRejected as exc:
                refused = len(items) if exc.count is None else max(0, min(exc.count, len(items)))
                self.counters["rejected"] += refused
                self.counters["delivered"] += len(items) - refused
                self.session.report(Outcome(self.id, "rejected", message=f"{refused} record(s) refused "
                                            f"by the endpoint, not retried: {exc}"))
                return True
            except Exception as exc:
                self._overran(started)
                self.counters["failed_attempts"] += 1
                self._failing += 1
                if self._failing == 1:
                    log.warning("%s: delivery failed (%s: %s); retrying, the records wait in the spool",
                                self.name, type(exc).__name__, exc)
                else:
                    log.debug("%s: delivery failed again (%s: %s)", self.name, type(exc).__name__, exc)
                if self._closing.is_set() or self._closing.wait(self._backoff(attempt, exc)):
                    return False
                attempt += 1
                continue
            self._overran(started)
            if self._failing:
                log.warning("%s: delivery resumed after %d failed attempt(s)", self.name, self._failing)
                self._failing = 0
            self.counters["delivered"] += len(items)
            return True

    def _overran(self, started: float) -> None:
        """Say once when a call took well past ``timeout``: the sink does not bound its calls, and
        ``close()`` will leave such a call behind."""
        took = time.monotonic() - started
        if took > 1.5 * self.config.timeout and not self._said_overran:
            self._said_overran = True
            log.warning("%s: a delivery call took %.1fs, past its timeout of %gs; the sink does not bound its "
                        "calls", self.name, took, self.config.timeout)

    def _backoff(self, attempt: int, exc: Optional[Exception] = None) -> float:
        """``retry.initial`` doubled per failure up to ``retry.max``; a random half of it is left out, so
        a fleet that lost its endpoint together does not come back together. A wait the endpoint asked
        for (``RetryLater``) is kept when longer, within ``retry.max``."""
        retry = self.config.retry
        delay = min(retry.max, retry.initial * 2 ** min(attempt, 60))
        delay = delay / 2 + random.random() * delay / 2
        asked = getattr(exc, "retry_after", None) if isinstance(exc, RetryLater) else None
        return min(retry.max, max(delay, asked)) if asked else delay

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Deliver what the spool holds for at most ``timeout`` (stopping at the first failure), then
        leave the rest in the spool for the next run."""
        thread = getattr(self, "_thread", None)
        if thread is not None:
            self._closing.set()
            self._wake.set()
            thread.join(self.config.timeout)
            if thread.is_alive():
                log.warning("%s: a delivery call did not end within %gs; leaving it", self.name,
                            self.config.timeout)
        if thread is not None or hasattr(self, "spool"):
            try:
                self.release()
            finally:
                self._report_drops()
                left = self.spool.depth
                if left:
                    log.warning("%s: %d record(s) not delivered yet stay in the spool %s for the next run",
                                self.name, left, self.spool.directory)
                self.spool.close()
        super().close()

    def metrics(self) -> list[Measure]:
        """The spool and delivery counters, for the metrics endpoint (docs/metrics.md)."""
        counters = self.counters
        return [*super().metrics(),
                Measure("sink_spool_records", self.spool.depth, help="Records in the spool not delivered yet"),
                Measure("sink_spool_bytes", self.spool.size, help="Bytes the spool holds on disk"),
                Measure("sink_delivered", counters["delivered"], "counter", "Records delivered"),
                Measure("sink_delivery_failures", counters["failed_attempts"], "counter",
                        "Delivery attempts that failed (each is retried)"),
                Measure("sink_dropped", counters["dropped"], "counter",
                        "Records dropped undelivered because the spool was full"),
                Measure("sink_rejected", counters["rejected"], "counter",
                        "Records the endpoint refused for good")]

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: delivered, failed_attempts, dropped, rejected, held_back, and the
        spool's depth (records) and size (bytes)."""
        return {**self.counters, "held_back": self.repeats.held, "depth": self.spool.depth,
                "spool_bytes": self.spool.size}


def _check_state_dir(path: str, name: str) -> None:
    """For ``elkscan validate``: the directory, or the nearest one above it that exists, is trusted."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        check_trusted(existing, f"{name}: state directory")
    except UntrustedError as exc:
        raise ComponentError(str(exc)) from None
