"""The clamd protocol: one connection per command, NUL-terminated (``z``) commands and replies.

Every command is spoken here rather than through a client library, because each connection is checked
and bounded the same way: the peer of a Unix socket is checked (``SO_PEERCRED``) before anything is
sent, every wait is cut into short slices and, once the session stops, gives up after a silent one,
and every reply is parsed strictly (anything but clamd's own forms is an error, never a clean verdict).
FILDES passes an open descriptor with SCM_RIGHTS, so clamd reads exactly the file the scanner opened,
whatever its permissions; INSTREAM input is read from the descriptor in chunks, never held whole in
memory.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Callable, Optional

import attrs
from attrs import frozen

#: The prefix of clamd's heuristic "this file was not scanned whole" alerts (AlertExceedsMax).
LIMIT_ALERT = "Heuristics.Limits.Exceeded."
_CHUNK = 256 * 1024
_SLICE = 0.2  # the longest a wait goes without looking at the stop flag
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: How clamd names what it scanned: INSTREAM's ``stream``, FILDES's ``fd[N]`` (clamd's own number).
STREAM = re.compile(re.escape("stream"))
FILDES = re.compile(r"fd\[\d+\]")
#: A signature name: printable, no blanks (``Win.Test.EICAR_HDB-1``, ``YARA.rule_name.UNOFFICIAL``).
_SIGNATURE = re.compile(r"[\x21-\x7e]+")


class ClamdUnavailable(Exception):
    """clamd could not be reached, or the connection ended without an answer (it died)."""


class ClamdError(Exception):
    """clamd answered, and the answer is an error about this file (a limit, an unreadable file), or
    not an answer clamd gives."""


class UntrustedPeer(ClamdError):
    """The process answering on the socket is not the clamd elkscan may take verdicts from."""


class ClamdInterrupted(ClamdError):
    """The session is stopping: the call gave up instead of waiting for clamd."""


@frozen
class Address:
    """Where clamd listens: a Unix socket path, or a TCP host and port."""

    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """``/run/clamav/clamd.ctl`` (a path) or ``host:port``."""
        if text.startswith("/") or ":" not in text:
            return cls(path=text)
        host, _, port = text.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected a Unix socket path or host:port, got {text!r}")
        return cls(host=host.strip("[]"), port=int(port))


@frozen
class Reply:
    """clamd's answer about one file: the signatures it found, and whether it skipped a limit."""

    signatures: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    limits: tuple[str, ...] = attrs.field(default=(), converter=tuple)


def split_reply(data: bytes) -> list[str]:
    """The NUL-terminated lines of a z-command reply. A file name may hold a newline, so only NUL
    splits; a reply cut short (no final NUL: clamd died while answering) is no answer."""
    if not data.endswith(b"\0"):
        raise ClamdUnavailable("clamd closed the connection " + ("in the middle of its answer" if data else
                                                                 "without an answer"))
    text = data.decode("utf-8", "surrogateescape")
    return [line for line in text[:-1].split("\0")]


def parse_reply(lines: Sequence[str], name: re.Pattern) -> Reply:
    """Turn clamd's reply lines (``<name>: <sig> FOUND``, ``<name>: OK``, ``<why> ERROR``) into a Reply.

    ``name`` matches how clamd names what was sent (``STREAM``, ``FILDES``, or the escaped path). An
    ERROR raises ClamdError with clamd's reason; any other line, or no line, is not a clamd answer and
    raises ClamdError too, so garbage never becomes a verdict."""
    found, limits, ok = [], [], False
    for line in lines:
        if line.endswith(" ERROR"):
            reason = line[: -len(" ERROR")]
            head = name.match(reason)
            if head and reason[head.end():head.end() + 2] == ": ":
                reason = reason[head.end() + 2:]
            raise ClamdError(f"clamd: {reason.rstrip('.')}")
        head = name.match(line)
        rest = line[head.end() + 2:] if head and line[head.end():head.end() + 2] == ": " else None
        if rest == "OK":
            ok = True
        elif rest is not None and rest.endswith(" FOUND") and _SIGNATURE.fullmatch(rest[: -len(" FOUND")]):
            signature = rest[: -len(" FOUND")]
            (limits if signature.startswith(LIMIT_ALERT) else found).append(signature)
        else:
            raise ClamdError(f"clamd gave an answer elkscan does not understand: {line[:200]!r}")
    if not lines or (ok and (found or limits)):
        raise ClamdError(f"clamd gave an answer elkscan does not understand: {lines[:4]!r}")
    return Reply(found, limits)


class ClamdClient:
    """Speaks to one clamd. Safe to share between threads: every call has its own connection.

    ``timeout``: how long clamd may stay silent (None: forever). ``cancelled``: asked whenever clamd
    has been silent for a slice (0.2 s); once true the call raises ClamdInterrupted.
    ``check_peer(pid, uid)``: called on each Unix socket connection before anything is sent; it
    raises (UntrustedPeer) to refuse that peer."""

    def __init__(self, address: Address, timeout: Optional[float], *,
                 cancelled: Optional[Callable[[], bool]] = None,
                 check_peer: Optional[Callable[[int, int], None]] = None) -> None:
        self.address, self.timeout = address, timeout
        self.cancelled = cancelled or (lambda: False)
        self.check_peer = check_peer

    # -- bounded waits -----------------------------------------------------------------------

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout if self.timeout is not None else float("inf")

    def _slice(self, deadline: float, what: str) -> float:
        """The next wait: at most _SLICE, and none at all past the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClamdUnavailable(f"clamd at {self.address} {what} within {self.timeout:g}s")
        return min(_SLICE, left)

    def _idle(self) -> None:
        """A slice passed with nothing from clamd: give up if the session is stopping (a clamd that
        answers in time is heard out, so a stop does not turn a judged file into an error)."""
        if self.cancelled():
            raise ClamdInterrupted("the scan is stopping; clamd's answer was not awaited")

    def _connect(self) -> socket.socket:
        if self.address.is_unix:
            family, target = socket.AF_UNIX, self.address.path
        else:
            try:
                family, _, _, _, target = socket.getaddrinfo(self.address.host, self.address.port,
                                                             type=socket.SOCK_STREAM)[0]
            except OSError as exc:
                raise ClamdUnavailable(f"cannot reach clamd at {self.address}: {exc}") from None
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            code = sock.connect_ex(target)
            if code == errno.EINPROGRESS:  # TCP: wait until the handshake ends, a slice at a time
                deadline, poller = self._deadline(), select.poll()
                poller.register(sock, select.POLLOUT)
                while not poller.poll(self._slice(deadline, "did not accept the connection") * 1000):
                    self._idle()
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise ClamdUnavailable(f"cannot reach clamd at {self.address}: {os.strerror(code)}")
            if self.address.is_unix and self.check_peer is not None:
                pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               _PEERCRED.size))
                self.check_peer(pid, uid)
        except BaseException:
            sock.close()
            raise
        return sock

    def _send(self, sock: socket.socket, data: bytes, deadline: float) -> float:
        """Send all of ``data``; returns the deadline, moved on by each bit of progress."""
        view = memoryview(data)
        while view:
            sock.settimeout(self._slice(deadline, "did not read what was sent"))
            try:
                sent = sock.send(view)
            except socket.timeout:
                self._idle()
                continue
            view, deadline = view[sent:], self._deadline()
        return deadline

    def _send_fd(self, sock: socket.socket, fd: int, deadline: float) -> float:
        while True:
            sock.settimeout(self._slice(deadline, "did not read what was sent"))
            try:
                socket.send_fds(sock, [b"\0"], [fd])
                return self._deadline()
            except socket.timeout:
                self._idle()
                continue

    def _exchange(self, command: str, send_more=None) -> list[str]:
        """Send ``z<command>\\0`` (then whatever ``send_more(sock, deadline)`` sends), read the reply
        to EOF; its lines."""
        if "\0" in command:
            raise ClamdError("a NUL byte cannot be sent to clamd in a command")
        with self._connect() as sock:
            deadline = self._deadline()
            try:
                deadline = self._send(sock, b"z" + command.encode("utf-8", "surrogateescape") + b"\0",
                                      deadline)
                if send_more is not None:
                    deadline = send_more(sock, deadline)
            except (BrokenPipeError, ConnectionResetError):
                pass  # clamd hung up early (a size limit, or it died): its reply, if any, says which
            except OSError as exc:
                raise ClamdUnavailable(f"lost clamd at {self.address}: {exc.strerror or exc}") from None
            data = bytearray()
            while True:
                sock.settimeout(self._slice(deadline, "did not answer"))
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    self._idle()
                    continue
                except OSError as exc:
                    if data:
                        break
                    raise ClamdUnavailable(f"lost clamd at {self.address}: {exc.strerror or exc}") from None
                if not chunk:
                    break
                data += chunk
                deadline = self._deadline()
        try:
            return split_reply(bytes(data))
        except ClamdUnavailable as exc:
            raise ClamdUnavailable(f"{exc} (at {self.address})") from None

    # -- control -------------------------------------------------------------------------------

    def _control(self, command: str, expect: Callable[[str], bool]) -> str:
        lines = self._exchange(command)
        if len(lines) != 1 or not expect(lines[0]):
            raise ClamdError(f"{self.address} answered {command} with {lines[:4]!r}, not as clamd does")
        return lines[0]

    def ping(self) -> None:
        self._control("PING", lambda line: line == "PONG")

    def version(self) -> str:
        """``ClamAV <engine>[/<database version>/<date>]``."""
        return self._control("VERSION", lambda line: line.startswith("ClamAV ") and line.isprintable())

    def reload(self) -> None:
        self._control("RELOAD", lambda line: line == "RELOADING")

    # -- scanning ------------------------------------------------------------------------------

    def scan_path(self, path: str, allmatch: bool = False) -> Reply:
        """SCAN (or ALLMATCHSCAN) a path clamd can open itself."""
        lines = self._exchange(f"{'ALLMATCHSCAN' if allmatch else 'SCAN'} {path}")
        return parse_reply(lines, re.compile(re.escape(path)))

    def scan_fd(self, fd: int) -> Reply:
        """FILDES: pass the open descriptor over the Unix socket; clamd reads it from its start."""
        if not self.address.is_unix:
            raise ClamdError("FILDES needs clamd on a Unix socket; use mode: instream for a TCP clamd")
        return parse_reply(self._exchange("FILDES", lambda sock, deadline: self._send_fd(sock, fd, deadline)),
                           FILDES)

    def scan_stream(self, fd: int) -> Reply:
        """INSTREAM: send the file's bytes (read with pread, from offset 0) in length-prefixed chunks."""

        def send(sock: socket.socket, deadline: float) -> float:
            offset = 0
            while True:
                try:
                    chunk = os.pread(fd, _CHUNK, offset)
                except OSError as exc:
                    raise ClamdError(f"cannot read the file to send it: {exc.strerror or exc}") from None
                if not chunk:
                    break
                deadline = self._send(sock, struct.pack("!L", len(chunk)) + chunk, deadline)
                offset += len(chunk)
            return self._send(sock, struct.pack("!L", 0), deadline)

        return parse_reply(self._exchange("INSTREAM", send), STREAM)

    def scan_bytes(self, data: bytes) -> Reply:
        """INSTREAM of a buffer held in memory (the canaries), never written to a file."""

        def send(sock: socket.socket, deadline: float) -> float:
            return self._send(sock, struct.pack("!L", len(data)) + data + struct.pack("!L", 0), deadline)

        return parse_reply(self._exchange("INSTREAM", send), STREAM)
