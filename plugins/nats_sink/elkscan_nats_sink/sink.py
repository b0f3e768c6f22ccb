"""The ``nats`` sink: each record published to a JetStream stream, with the record's ``id`` as its
``Nats-Msg-Id`` (the server drops a message it already stored under that id, within the stream's
duplicate window), through the delivery spool.

A batch counts as delivered only once every message got its PubAck. A message the server refuses for
good (larger than its ``max_payload`` or the stream's ``max_msg_size``, a subject no stream takes) is
dropped and counted; anything else (no server, a lost connection, a timeout, a stream that is full)
leaves the batch in the spool, sent again later.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import nats.errors
import nats.js.errors
from attrs import frozen

from elkscan_core.delivery import DeliveryRejected, Item, SpoolingConfig, SpoolingSink

from .connection import (CLOSE_TIMEOUT, Client, ConnectionConfig, parse_servers, shown_url, stream_option,
                         subject_option)

#: The header JetStream de-duplicates on.
MSG_ID = "Nats-Msg-Id"


@frozen(kw_only=True)
class NatsSinkConfig(SpoolingConfig, ConnectionConfig):
    """``servers``, ``subject`` (what each record is published to), ``stream`` (the stream expected to
    store it: a subject another stream holds is refused), auth and TLS (``ConnectionConfig``)."""

    subject: str = subject_option()
    stream: str = stream_option()


class Refusals:
    """The messages of one batch the server refused for good, and why (the first reason)."""

    def __init__(self) -> None:
        self.count = 0
        self.reason = ""

    def add(self, reason: str) -> None:
        self.count += 1
        self.reason = self.reason or reason


class NatsSink(SpoolingSink):
    """Publishes each spooled record to ``subject`` in JetStream, waiting for every PubAck."""

    id = "nats"
    Config = NatsSinkConfig

    def destination(self) -> str:
        """The servers (as written out in full, in any order, without credentials), stream and subject."""
        servers = ",".join(sorted(shown_url(url) for url in parse_servers(self.config.servers)))
        return f"{servers} {self.config.stream} {self.config.subject}"

    def describe(self) -> str:
        return f"nats: subject {self.config.subject} into stream {self.config.stream} at {self.client.shown()}"

    def check(self) -> None:
        super().check()
        Client(self.config, self.session.resolve_path, self.name).check()

    def open(self) -> None:
        self._calls = threading.Lock()  # the delivery thread's call, and release() after it
        self._released = False
        client = Client(self.config, self.session.resolve_path, self.name)
        client.prepare()
        self.client = client

    # -- the delivery thread -------------------------------------------------------------------

    def send_batch(self, items: list[Item]) -> None:
        with self._calls:
            if self._released:  # a call close() left behind: nothing more
                raise ConnectionError("the sink is closed")
            refusals = self.client.run(lambda nc: self._publish(nc, items), self.config.timeout)
        if refusals.count:
            raise DeliveryRejected(refusals.reason, count=refusals.count)

    async def _publish(self, nc: Any, items: list[Item]) -> Refusals:
        """Publish every item at once and wait for all their PubAcks; raise when any must be retried."""
        config = self.config
        js = nc.jetstream(timeout=config.timeout)
        results = await asyncio.gather(*(js.publish(config.subject, item.data, timeout=config.timeout,
                                                    stream=config.stream, headers={MSG_ID: item.id})
                                         for item in items), return_exceptions=True)
        refusals, no_stream = Refusals(), False
        for result in results:
            if isinstance(result, nats.errors.MaxPayloadError):
                refusals.add(f"a record is larger than the server's max_payload ({nc.max_payload} bytes)")
            elif isinstance(result, nats.js.errors.APIError) and result.code == 400:  # about the message
                refusals.add(f"JetStream: {result.description} (error {result.err_code})")
            elif isinstance(result, nats.js.errors.NoStreamResponseError):
                refusals.add(f"no stream takes subject {config.subject}")
                no_stream = True
            elif isinstance(result, BaseException):
                raise result
        if no_stream and not await self._no_stream(nc):
            raise ConnectionError(f"no stream answered on subject {config.subject}")
        return refusals

    async def _no_stream(self, nc: Any) -> bool:
        """Whether JetStream says no stream takes the subject (not just that none answered this time)."""
        try:
            await nc.jsm(timeout=self.config.timeout).find_stream_name_by_subject(self.config.subject)
        except nats.js.errors.NotFoundError:
            return True
        except Exception:  # JetStream itself does not answer (not enabled, electing a leader): retry
            return False
        return False

    # -- closing -------------------------------------------------------------------------------

    def release(self) -> None:
        """Close the connection and its loop once the delivery thread's call is over: close() waited
        ``timeout`` for it, and every call is bounded by ``timeout``, so it is ending; one still going
        after that is left to end on its own."""
        if not hasattr(self, "client"):
            return
        self._released = True
        if self._calls.acquire(timeout=2 * CLOSE_TIMEOUT):
            try:
                self.client.close()
            finally:
                self._calls.release()
