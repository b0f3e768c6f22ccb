"""One HTTP(S) connection, kept alive between batches, whose every POST ends within a deadline and whose
answer is read up to a size bound. Redirects are not followed: the caller sees the 3xx.

``http.client`` (the standard library) rather than urllib3 or requests: the sink sends one POST at a time
on one connection, which needs no pool, no redirects, no proxy discovery and no retries of its own (the
spool retries); what it does need, a deadline for the whole call and a bound on what is read, is simplest
to hold exactly over ``http.client``, and the plugin then has no dependency to vendor or freeze.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from typing import NamedTuple, Optional
from urllib.parse import SplitResult

USER_AGENT = "elkscan-http-sink/0.1"


class Answer(NamedTuple):
    status: int
    retry_after: Optional[str]  # the raw header
    location: Optional[str]  # the raw header
    body: bytes  # at most the bound (whole when ``complete``)
    complete: bool


class Client:
    """POSTs to one URL. ``post`` raises OSError (``TimeoutError`` past the deadline) or
    ``http.client.HTTPException`` for a failure of the connection; any answer is returned."""

    def __init__(self, url: SplitResult, context: Optional[ssl.SSLContext], timeout: float,
                 headers: dict[str, str]) -> None:
        self.url, self.context, self.timeout = url, context, timeout
        self.headers = {"User-Agent": USER_AGENT, **headers}
        self.target = url.path or "/"
        if url.query:
            self.target += "?" + url.query
        self._conn: Optional[http.client.HTTPConnection] = None

    def post(self, body: bytes, limit: int) -> Answer:
        """Send ``body``; read at most ``limit`` bytes of the answer. The whole call (connecting,
        sending, waiting, reading) ends within ``timeout``: at the deadline the socket is shut down."""
        expired = threading.Event()
        timer = threading.Timer(self.timeout, self._expire, (expired,))
        timer.daemon = True
        timer.start()
        reused = self._conn is not None
        try:
            try:
                return self._exchange(body, limit)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused or expired.is_set():
                    raise
                self.close()  # a kept-alive connection the server had closed meanwhile: once more, anew
                return self._exchange(body, limit)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            if expired.is_set() or isinstance(exc, TimeoutError):  # the deadline, or silence as long
                raise TimeoutError(f"no whole answer within {self.timeout:g}s") from None
            raise _plain(exc) from None
        finally:
            timer.cancel()

    def _exchange(self, body: bytes, limit: int) -> Answer:
        conn = self._connection()
        conn.request("POST", self.target, body=body, headers=self.headers)
        response = conn.getresponse()
        data = response.read(limit + 1)
        complete = len(data) <= limit and response.isclosed()
        if not complete or response.will_close:  # unread bytes would be the next answer's start
            self.close()
        return Answer(response.status, response.getheader("Retry-After"), response.getheader("Location"),
                      data[:limit], complete)

    def _expire(self, expired: threading.Event) -> None:
        """The deadline: wake whatever the call waits for (connect, send, receive)."""
        expired.set()
        conn = self._conn
        if conn is not None:
            _shutdown(conn)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            host, port = self.url.hostname or "", self.url.port
            if self.url.scheme == "https":
                self._conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self.context)
            else:
                self._conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        """Shut the connection down (which also wakes a call stuck on it in another thread) and close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            _shutdown(conn)
            conn.close()


def _shutdown(conn: http.client.HTTPConnection) -> None:
    """Shut the socket down with the plain socket's call: an SSL socket's own would unwrap TLS under a
    thread that may be reading."""
    sock = conn.sock
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _plain(exc: Exception) -> Exception:
    """A connection failure as one short line (``http.client`` names some only by their class)."""
    if isinstance(exc, http.client.IncompleteRead):
        return ConnectionError(f"the answer ended early ({len(exc.partial)} bytes)")
    if isinstance(exc, http.client.HTTPException) and not str(exc):
        return ConnectionError(type(exc).__name__)
    return exc
