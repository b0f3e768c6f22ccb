"""The clamd protocol: one connection per command, NUL-terminated (``z``) commands and replies.

Control commands (PING, VERSION, RELOAD) go through pyclamd. The scan commands are spoken here,
because pyclamd has no FILDES (passing an open descriptor with SCM_RIGHTS, so clamd reads exactly the
file the scanner opened, whatever its permissions), reads INSTREAM input into memory, shares one socket
per client object (so it is not safe across worker threads), and ends commands with a newline, which a
file name may contain.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Sequence

import attrs
from attrs import frozen

#: The prefix of clamd's heuristic "this file was not scanned whole" alerts (AlertExceedsMax).
LIMIT_ALERT = "Heuristics.Limits.Exceeded."
_CHUNK = 256 * 1024
_NAME = re.compile(r"^(fd\[\d+\]|stream): ")


class ClamdUnavailable(Exception):
    """clamd could not be reached, or the connection ended without an answer (it died)."""


class ClamdError(Exception):
    """clamd answered, and the answer is an error about this file (a limit, an unreadable file)."""


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


def parse_reply(lines: Sequence[str], name: str = "") -> Reply:
    """Turn clamd's reply lines (``<name>: <sig> FOUND``, ``<name>: OK``, ``<name>: <why> ERROR``)
    into a Reply; an ERROR raises ClamdError with clamd's reason. ``name``: the path sent, if any."""
    found, limits = [], []
    for line in lines:
        if line.endswith(" FOUND"):
            signature = line[: -len(" FOUND")].rpartition(": ")[2]
            (limits if signature.startswith(LIMIT_ALERT) else found).append(signature)
        elif line.endswith(" ERROR"):
            reason = _NAME.sub("", line[: -len(" ERROR")], count=1)
            if name and reason.startswith(f"{name}: "):
                reason = reason[len(name) + 2:]
            raise ClamdError(f"clamd: {reason.rstrip('.')}")
        elif not line.endswith(": OK"):
            raise ClamdError(f"clamd gave an answer elkscan does not understand: {line!r}")
    return Reply(found, limits)


class ClamdClient:
    """Speaks to one clamd. Safe to share between threads: every call has its own connection."""

    def __init__(self, address: Address, timeout: float | None) -> None:
        self.address, self.timeout = address, timeout

    # -- control, through pyclamd ------------------------------------------------------------

    def _pyclamd(self):
        import pyclamd

        try:
            if self.address.is_unix:
                return pyclamd.ClamdUnixSocket(self.address.path, self.timeout)
            return pyclamd.ClamdNetworkSocket(self.address.host, self.address.port, self.timeout)
        except (pyclamd.ConnectionError, OSError) as exc:
            raise ClamdUnavailable(f"cannot reach clamd at {self.address}: {exc}") from None

    def _control(self, name: str):
        import pyclamd

        try:
            return getattr(self._pyclamd(), name)()
        except (pyclamd.ConnectionError, OSError) as exc:
            raise ClamdUnavailable(f"clamd at {self.address} did not answer {name.upper()}: {exc}") from None

    def ping(self) -> bool:
        return bool(self._control("ping"))

    def version(self) -> str:
        return str(self._control("version")).strip("\0 \n")

    def reload(self) -> str:
        return str(self._control("reload")).strip("\0 \n")

    # -- scanning ------------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        family = socket.AF_UNIX if self.address.is_unix else socket.AF_INET
        try:
            if self.address.is_unix:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.address.path)
            else:
                sock = socket.create_connection((self.address.host, self.address.port), self.timeout)
        except OSError as exc:
            raise ClamdUnavailable(f"cannot reach clamd at {self.address}: {exc.strerror or exc}") from None
        return sock

    def _exchange(self, command: str, send_more=None) -> list[str]:
        """Send ``z<command>\\0`` (then whatever ``send_more(sock)`` sends), read the reply to EOF."""
        if "\0" in command:
            raise ClamdError("a NUL byte cannot be sent to clamd in a command")
        sock = self._connect()
        with sock:
            try:
                sock.sendall(b"z" + command.encode("utf-8", "surrogateescape") + b"\0")
                if send_more is not None:
                    send_more(sock)
            except (BrokenPipeError, ConnectionResetError):
                pass  # clamd hung up early (a size limit, or it died): its reply, if any, says which
            except socket.timeout:
                raise ClamdUnavailable(f"clamd at {self.address} stopped reading ({self.timeout}s)") from None
            except OSError as exc:
                raise ClamdUnavailable(f"lost clamd at {self.address}: {exc.strerror or exc}") from None
            data = bytearray()
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except socket.timeout:
                raise ClamdUnavailable(f"clamd at {self.address} did not answer within {self.timeout}s") from None
            except OSError as exc:
                if not data:
                    raise ClamdUnavailable(f"lost clamd at {self.address}: {exc.strerror or exc}") from None
        text = data.decode("utf-8", "surrogateescape")
        # z-commands end every reply line with NUL; a file name may hold a newline, so only NUL splits.
        lines = [line.rstrip("\n") for line in text.split("\0") if line.rstrip("\n")]
        if not lines:
            raise ClamdUnavailable(f"clamd at {self.address} closed the connection without an answer")
        return lines

    def scan_path(self, path: str, allmatch: bool = False) -> Reply:
        """SCAN (or ALLMATCHSCAN) a path clamd can open itself."""
        return parse_reply(self._exchange(f"{'ALLMATCHSCAN' if allmatch else 'SCAN'} {path}"), path)

    def scan_fd(self, fd: int) -> Reply:
        """FILDES: pass the open descriptor over the Unix socket; clamd reads it from its start."""
        if not self.address.is_unix:
            raise ClamdError("FILDES needs clamd on a Unix socket; use mode: instream for a TCP clamd")
        return parse_reply(self._exchange("FILDES", lambda sock: socket.send_fds(sock, [b"\0"], [fd])))

    def scan_stream(self, fd: int) -> Reply:
        """INSTREAM: send the file's bytes (read with pread, from offset 0) in length-prefixed chunks."""

        def send(sock: socket.socket) -> None:
            offset = 0
            while True:
                chunk = os.pread(fd, _CHUNK, offset)
                if not chunk:
                    break
                sock.sendall(struct.pack("!L", len(chunk)) + chunk)
                offset += len(chunk)
            sock.sendall(struct.pack("!L", 0))

        return parse_reply(self._exchange("INSTREAM", send))
