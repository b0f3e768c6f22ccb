"""The ``nats`` source: record documents from a JetStream stream, read through a durable pull consumer
that every verifier process of a group shares, each one judged as a digest target
(``elkscan_core.fleet.digest_target``) and acknowledged once every sink has its record.

A consumer thread owns the connection and its event loop: it fetches as many messages as there are
free places among ``max_in_flight`` and hands them to ``targets()`` through a queue. A message's
``Receipt`` is settled from any thread: it frees the place at once and has the ack (or nak) sent on the
consumer thread's loop. Nothing is acknowledged before the session settles it, so a verifier that dies
loses nothing: JetStream delivers what it held again once ``ack_wait`` has passed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Iterator, Optional

import nats.errors
import nats.js.errors
from attrs import field, frozen
from nats.js import api

from elkscan_core import ComponentError, ConfigError, Measure, Source
from elkscan_core.fleet import digest_target
from elkscan_core.model import Receipt, Target
from elkscan_core.text import visible
from elkscan_core.units import Duration

from .connection import Client, ConnectionConfig, ServerSaid, consumer_option, filter_option, stream_option

log = logging.getLogger("elkscan.nats")

#: The longest a fetch waits for messages, so the consumer thread sees a stop (and a freed place) soon.
FETCH_WAIT = 1.0
#: How long a message that was nak'ed waits before JetStream delivers it again (no busy loop of
#: redeliveries while a sink fails).
NAK_DELAY = 1.0
#: Waits between attempts to reach the servers again after a failure: doubled from the first to the last.
BACKOFF = (0.1, 5.0)


def _positive(_instance, attribute, value) -> None:
    if value <= 0:
        raise ConfigError(f"must be above 0, got {value}", attribute.name)


def _in_flight(_instance, attribute, value: int) -> None:
    if not 1 <= value <= 100_000:
        raise ConfigError(f"1 to 100000 messages, got {value}", attribute.name)


@frozen(kw_only=True)
class NatsSourceConfig(ConnectionConfig):
    """``servers``, ``subject`` (the consumer's filter: records of every host with ``elkscan.records.>``),
    ``stream``, ``group`` (the durable consumer's name, one per verifier group), ``ack_wait``,
    ``max_in_flight``, ``timeout`` (each call to the servers), auth and TLS (``ConnectionConfig``)."""

    subject: str = filter_option()
    stream: str = stream_option()
    group: str = consumer_option()
    ack_wait: Duration = field(default=Duration(60.0), validator=_positive)
    max_in_flight: int = field(default=256, validator=_in_flight)
    timeout: Duration = field(default=Duration(10.0), validator=_positive)


class _Fatal(Exception):
    """JetStream answered that this consumer cannot be used as configured: no stream, a consumer of
    that name made otherwise, not permitted."""


class NatsSource(Source):
    """Digest targets from a JetStream stream, through the durable pull consumer ``group``."""

    id = "nats"
    Config = NatsSourceConfig

    def __init__(self, config: Any, session: Any) -> None:
        super().__init__(config, session)
        self.counters = {"received": 0, "acked": 0, "naked": 0, "malformed": 0, "reconnects": 0}
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # messages fetched, for targets()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._room: Optional[asyncio.Event] = None  # set on the loop when a place frees up
        self._thread: Optional[threading.Thread] = None
        self._sub: Any = None  # the pull subscription on the current connection
        self._nc: Any = None
        self._doing = "connecting"  # what _bind was doing, for an error at start

    def describe(self) -> str:
        config = self.config
        return (f"nats: {config.subject} from stream {config.stream} as consumer {config.group} "
                f"at {self.client.shown()}")

    def check(self) -> None:
        Client(self.config, self.session.resolve_path, self.name).check()

    @property
    def name(self) -> str:
        return f"source {self.id!r}"

    # -- start: the stream must be there, the consumer is made once for the group -------------

    def start(self) -> None:
        client = Client(self.config, self.session.resolve_path, self.name)
        client.prepare()
        self.client = client
        try:
            client.run(self._bind, self.config.timeout)
        except _Fatal as exc:
            client.close()
            raise ComponentError(str(exc)) from None
        except (ServerSaid, nats.errors.AuthorizationError) as exc:  # not permitted: no outage, a mistake
            client.close()
            raise ComponentError(f"{self._doing}: {exc}") from None
        except Exception as exc:  # no server answers now: the consumer thread keeps trying
            log.warning("%s: %s; trying again with backoff", self.name, self._why(exc))
            self._sub = None
        self._thread = threading.Thread(target=self._consume, args=(self._sub is None,),
                                        name=f"{self.name}-consumer", daemon=True)
        self._thread.start()

    async def _bind(self, nc: Any) -> None:
        """Check the stream, make the consumer when the group has none yet (the same for every process of
        the group: JetStream takes it once), check one already there, and subscribe to it."""
        config = self.config
        jsm = nc.jsm(timeout=config.timeout)
        self._doing = f"reading stream {config.stream}"
        try:
            await jsm.stream_info(config.stream)
        except nats.js.errors.NotFoundError:
            raise _Fatal(f"stream {config.stream} does not exist; the operator makes it (e.g. nats stream add "
                         f"{config.stream} --subjects '{config.subject}'), elkscan never does") from None
        self._doing = f"reading consumer {config.group} of stream {config.stream}"
        try:
            info = await jsm.consumer_info(config.stream, config.group)
        except nats.js.errors.NotFoundError:
            info = None
        if info is None:
            self._doing = f"making consumer {config.group} on stream {config.stream}"
            try:
                await jsm.add_consumer(config.stream, api.ConsumerConfig(
                    name=config.group, durable_name=config.group, filter_subject=config.subject,
                    ack_policy=api.AckPolicy.EXPLICIT, ack_wait=float(config.ack_wait),
                    deliver_policy=api.DeliverPolicy.ALL, max_ack_pending=-1,
                    description="elkscan verifiers (nats source)"))
            except nats.js.errors.APIError as exc:
                raise _Fatal(f"making consumer {config.group} on stream {config.stream}: "
                             f"{exc.description} (error {exc.err_code})") from None
        else:
            self._check_consumer(info.config)
        if self._room is None:
            self._room = asyncio.Event()
        self._doing = f"subscribing to consumer {config.group} of stream {config.stream}"
        self._sub = await nc.jetstream(timeout=config.timeout).pull_subscribe_bind(
            durable=config.group, stream=config.stream, pending_msgs_limit=4 * config.max_in_flight)
        self._nc = nc

    def _check_consumer(self, found: api.ConsumerConfig) -> None:
        config = self.config
        if found.deliver_subject:
            raise _Fatal(f"consumer {config.group} of stream {config.stream} is a push consumer; the group "
                         "needs a pull consumer of its own (another group name)")
        if (found.filter_subject or ">") != config.subject or found.filter_subjects:
            raise _Fatal(f"consumer {config.group} of stream {config.stream} filters "
                         f"{found.filter_subjects or found.filter_subject or 'nothing'}, not {config.subject}")
        if found.ack_policy != api.AckPolicy.EXPLICIT:
            raise _Fatal(f"consumer {config.group} of stream {config.stream} does not ask for explicit acks")
        if found.ack_wait is not None and abs(found.ack_wait - config.ack_wait) > 0.001:
            log.warning("%s: consumer %s keeps the ack_wait it was made with, %gs (not %gs)",
                        self.name, config.group, found.ack_wait, config.ack_wait)

    # -- the consumer thread -------------------------------------------------------------------

    def _consume(self, outage: bool) -> None:
        """Fetch while the session runs; on a failure, connect and bind again with backoff (one warning
        per outage, ``outage`` when start-up met one). Messages that were in flight on a lost connection
        come again after ack_wait."""
        wait = BACKOFF[0]
        while not self.stopping.is_set():
            try:
                if self._sub is None:
                    self.client.run(self._bind, self.config.timeout)
                    if outage:
                        log.warning("%s: consuming again from %s", self.name, self.client.shown())
                        self.counters["reconnects"] += 1
                    wait, outage = BACKOFF[0], False
                self.client.run(self._fetch, self.config.timeout + FETCH_WAIT)
            except Exception as exc:
                self._sub = self._nc = None
                if not outage:
                    log.warning("%s: %s; trying again with backoff", self.name, self._why(exc))
                outage = True
                if self.stopping.wait(wait):
                    break
                wait = min(wait * 2, BACKOFF[1])
        self._sub = self._nc = None

    async def _fetch(self, nc: Any) -> None:
        """Wait (within FETCH_WAIT) for free places, then fetch that many messages at most."""
        if nc is not self._nc:  # the client connected anew (the last one was lost): bind again first
            raise ConnectionError("lost the connection")
        room = self._room
        free = self._free()
        if free <= 0:
            room.clear()
            free = self._free()  # a place freed between the two looks set room before the clear
            if free <= 0:
                try:
                    await asyncio.wait_for(room.wait(), FETCH_WAIT)
                except asyncio.TimeoutError:
                    return
                free = self._free()
                if free <= 0:
                    return
        try:
            messages = await self._sub.fetch(free, timeout=FETCH_WAIT)
        except asyncio.TimeoutError:  # nothing came (nats-py raises its own and asyncio's)
            return
        with self._lock:
            self._in_flight += len(messages)
            self.counters["received"] += len(messages)
        for msg in messages:
            self._ready.put(msg)

    def _free(self) -> int:
        with self._lock:
            return self.config.max_in_flight - self._in_flight

    # -- settling, from any thread --------------------------------------------------------------

    def _receipt(self, msg: Any) -> Receipt:
        def settle(ack: bool) -> None:  # once per message: Receipt calls only the first settlement
            with self._lock:
                self._in_flight -= 1
                self.counters["acked" if ack else "naked"] += 1
            self.client.soon(lambda: self._send(msg, ack))

        return Receipt(ack=lambda: settle(True), nak=lambda: settle(False))

    def _send(self, msg: Any, ack: bool) -> None:
        """On the loop: the ack or nak goes out on the connection the message came by (a message of a lost
        connection cannot be settled: it comes again after ack_wait)."""
        room = self._room
        if room is not None:
            room.set()
        future = asyncio.ensure_future(msg.ack() if ack else msg.nak(delay=NAK_DELAY))
        future.add_done_callback(self._sent)

    def _sent(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.debug("%s: settling a message: %s", self.name, future.exception())

    # -- the source thread ---------------------------------------------------------------------

    def targets(self) -> Iterator[Target]:
        while not self.stopping.is_set():
            try:
                msg = self._ready.get(timeout=0.2)
            except queue.Empty:
                continue
            yield self._target(msg)

    def _target(self, msg: Any) -> Target:
        receipt = self._receipt(msg)
        try:
            return digest_target(msg.data, self.id, receipt)
        except ValueError as exc:
            self.counters["malformed"] += 1
            place = self._place(msg)
            log.warning("%s: %s: malformed record: %s", self.name, place, visible(str(exc)))
            return Target(path=place, origin=self.id, skip="malformed record", receipt=receipt)

    def _place(self, msg: Any) -> str:
        """Where a message is: its stream, sequence and subject."""
        try:
            sequence = msg.metadata.sequence.stream
        except Exception:  # a reply subject that is not JetStream's
            sequence = "?"
        return f"message {sequence} of stream {self.config.stream} ({visible(msg.subject)})"

    # -- close (stop() is Source's: targets() and the consumer thread watch ``stopping``) ---------

    def close(self) -> None:
        """End the consumer thread (within a fetch's wait), nak what was fetched and not handed over (sent
        as the connection closes), and close the connection."""
        self.stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(self.config.timeout + FETCH_WAIT + 1)
            if thread.is_alive():
                log.warning("%s: the consumer thread did not end; leaving it", self.name)
                return
        if not hasattr(self, "client"):
            return
        while True:
            try:
                msg = self._ready.get_nowait()
            except queue.Empty:
                break
            self._receipt(msg).nak()
        self.client.close()

    @staticmethod
    def _why(exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        return visible(text.splitlines()[0] if text.strip() else type(exc).__name__)

    def metrics(self) -> Iterator[Measure]:
        for name, value in self.counters.items():
            yield Measure(f"nats_messages_{name}", value, kind="counter",
                          help=f"messages {name} by the nats source")
        yield Measure("nats_messages_in_flight", self._in_flight, help="messages fetched and not settled yet")
