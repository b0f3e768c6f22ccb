"""The ``syslog`` sink: each record as an RFC 5424 message to the local syslog (``/dev/log``, a Unix
datagram socket) or a remote one over UDP or TCP (RFC 6587 octet counting), through the delivery spool.

The message is built when the record is accepted (so it carries the time it was found) and spooled as
it is; delivery retries while the receiver is down. Its text is ASCII JSON (any other character
escaped), so no file name can break a receiver that is not UTF-8 safe, and no message is longer than
``max_message``: the largest fields of an oversize record are left out and named in ``truncated``.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from typing import Any, Optional

import attrs
from attrs import field, frozen

from elkscan_core import ConfigError, Record, Size
from elkscan_core.delivery import SpoolingConfig, SpoolingSink
from elkscan_core.model import DETECTED, ERROR, NOT_SCANNED, RANSOM_EVENT
from elkscan_core.render import json_line
from elkscan_core.trust import check_trusted

log = logging.getLogger("elkscan.syslog_sink")

FACILITIES = {name: code for code, name in enumerate(
    ["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp",
     "ntp", "audit", "alert", "clock", *(f"local{n}" for n in range(8))])}
#: Severity (RFC 5424): a ransom event 1 (alert), a detection 4 (warning), a failure 3 (error), a file
#: not scanned 5 (notice), anything else 6 (informational).
_SEVERITY = {DETECTED: 4, ERROR: 3, NOT_SCANNED: 5}
_ADDRESS = re.compile(r"(?:(udp|tcp)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
#: What an oversize message keeps longest (JSON lines and ECS names).
_KEEP = ("id", "kind", "time", "host", "status", "reason", "signature", "engine", "path", "@timestamp", "event",
         "message", "rule", "file", "truncated")
MIN_MESSAGE, MAX_MESSAGE = 480, 65000  # RFC 5426: every receiver takes 480 bytes; a UDP datagram, 65507
_CUT = 64  # characters of each string an oversize message keeps when leaving out fields is not enough


def parse_address(text: str) -> tuple[str, Any]:
    """``/path`` -> ("unix", path); ``[udp://]host:port`` -> ("udp", (host, port)); ``tcp://host:port``."""
    if text.startswith("/"):
        return "unix", text
    match = _ADDRESS.fullmatch(text)
    if match is None or not 0 < int(match[3]) < 65536:
        raise ValueError(f"expected /dev/log (a socket path), host:port, udp://host:port or tcp://host:port, "
                         f"got {text!r}")
    return match[1] or "udp", (match[2].strip("[]"), int(match[3]))


def _address(_instance, attribute, value: str) -> None:
    try:
        parse_address(value)
    except ValueError as exc:
        raise ConfigError(str(exc), attribute.name) from None


def _message_size(_instance, attribute, value: int) -> None:
    if not MIN_MESSAGE <= value <= MAX_MESSAGE:
        raise ConfigError(f"{MIN_MESSAGE} to {MAX_MESSAGE} bytes, got {value}", attribute.name)


@frozen(kw_only=True)
class SyslogConfig(SpoolingConfig):
    """``address`` (``/dev/log``, ``host:port`` or ``udp://host:port``, ``tcp://host:port``), ``facility``
    (a name: ``daemon``, ``local0``...), ``max_message`` (bytes, header included)."""

    address: str = field(default="/dev/log", validator=_address)
    facility: str = field(default="daemon", validator=attrs.validators.in_(tuple(FACILITIES)))
    max_message: Size = field(default=Size(8192), validator=_message_size)


def _header_field(text: str, limit: int) -> str:
    """An RFC 5424 header field: printable ASCII without spaces, at most ``limit`` characters, or '-'."""
    cleaned = "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit]
    return cleaned or "-"


class SyslogSink(SpoolingSink):
    """One RFC 5424 message per record: ``<PRI>1 TIME HOST elkscan PID KIND - {json}``."""

    id = "syslog"
    Config = SyslogConfig
    ascii_only = True
    _sock: Optional[socket.socket] = None

    def destination(self) -> str:
        return self.config.address

    def open(self) -> None:
        self.transport, self.peer = parse_address(self.config.address)
        self._facility = FACILITIES[self.config.facility]
        self._host = _header_field(self.session.host, 255)

    # -- building messages (the writer thread) -------------------------------------------------

    def document(self, record: Record) -> Optional[bytes]:
        fields = self.fields(record)
        if fields is None:
            return None
        if record.kind == RANSOM_EVENT:
            severity = 1
        else:
            severity = _SEVERITY.get(record.status, 6) if record.target is not None else 6
        moment = datetime.datetime.fromtimestamp(record.timestamp, datetime.timezone.utc)
        header = (f"<{self._facility * 8 + severity}>1 {moment.strftime('%Y-%m-%dT%H:%M:%S.%fZ')} "
                  f"{self._host} elkscan {os.getpid()} {_header_field(record.kind, 32)} - ").encode("ascii")
        return header + _bounded(fields, self.config.max_message - len(header))

    # -- delivery (the delivery thread) --------------------------------------------------------

    def send_batch(self, items) -> None:
        sock = self._connected()
        try:
            if self.transport == "tcp":
                sock.sendall(b"".join(b"%d %s" % (len(item.data), item.data) for item in items))
            else:
                for item in items:
                    sock.send(item.data)
        except OSError:
            self.release()  # a new connection for the next attempt
            raise

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        timeout = self.config.timeout
        if self.transport == "unix":
            if os.path.exists(self.peer):  # a syslog socket another user could have placed reads our records
                check_trusted(self.peer, f"{self.name}: syslog socket")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.peer)
            except OSError:
                sock.close()
                raise
        elif self.transport == "udp":
            host, port = self.peer
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            sock = socket.create_connection(self.peer, timeout=timeout)
        self._sock = sock
        return sock

    def release(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _encoded(doc: Any) -> bytes:
    return json_line(doc, ascii_only=True)[:-1].encode("ascii")


def _bounded(fields: dict[str, Any], limit: int) -> bytes:
    """The JSON text of ``fields`` in at most ``limit`` bytes: the largest fields are left out first
    (named in ``truncated``), then long strings are cut; never a document cut in the middle."""
    data = _encoded(fields)
    if len(data) <= limit:
        return data
    doc, dropped = dict(fields), []
    sizes = {k: len(_encoded(v)) for k, v in doc.items() if k not in _KEEP}
    while len(data) > limit and sizes:
        largest = max(sizes, key=sizes.__getitem__)
        del doc[largest], sizes[largest]
        dropped.append(largest)
        doc["truncated"] = dropped
        data = _encoded(doc)
    if len(data) > limit:
        doc = _cut(doc)
        doc["truncated"] = dropped + ["long strings"]
        data = _encoded(doc)
    if len(data) > limit:  # the kept fields alone do not fit: what is sure to (under 200 bytes)
        data = _encoded({**{k: _cut(doc[k]) for k in ("id", "kind", "status") if k in doc}, "truncated": True})
    return data


def _cut(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= _CUT else value[:_CUT] + "..."
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v) for v in value[:4]]
    return value

