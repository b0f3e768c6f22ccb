"""The ``elkeid`` sink: records to the agent on fd 4, framed, buffered, flushed at least every 200 ms.

A failed write (the agent closed the pipe) raises BrokenPipeError, which the runner turns into the end
of the session, as Elkeid exits on EPIPE. Nothing else in the process writes to this descriptor.

Upstream log lines (1010) are those at ``log_level`` or above (ERROR, as Elkeid). A file whose scan
failed is logged locally and counted under its task; the task's 6000 is preceded by one 1010 line that
sums them up, where a line per file could flood the server during a disk scan.
"""

from __future__ import annotations

import logging
import os
import time

import attrs
from attrs import frozen

from elkscan_core import FINDING, LOG, TASK_DONE, ComponentError, Duration, Record, Sink, Size

from .mapping import LOG_TYPE, log_fields, text, to_elkeid
from .processes import per_process
from .wire import encode_record

log = logging.getLogger("elkscan.elkeid")


_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def upstream_level(name: str) -> int:
    """A log record's level as a number; a level not known counts as ERROR (it is sent)."""
    return _LEVELS.get(name.upper(), logging.ERROR)


@frozen
class ElkeidSinkConfig:
    """``fd``: the agent's record pipe; ``buffer``: bytes held before a write (Elkeid: 512 KiB);
    ``flush_every``: longest time a record waits in the buffer (Elkeid: 200 ms); ``log_level``: the
    lowest level of log records sent upstream as 1010 (Elkeid: ERROR)."""

    fd: int = 4
    buffer: Size = Size(512 * 1024)
    flush_every: Duration = Duration(0.2)
    log_level: str = attrs.field(default="ERROR", validator=attrs.validators.in_(tuple(_LEVELS)))


class ElkeidSink(Sink):
    """Encodes each record for the agent's fixed-order parser and writes it to ``fd``."""

    id = "elkeid"
    Config = ElkeidSinkConfig

    def start(self) -> None:
        self.fd = self.config.fd
        try:
            os.fstat(self.fd)
        except OSError:
            raise ComponentError(f"fd {self.fd} is not open: the Elkeid agent passes its record pipe "
                                 f"there (run elkscan under the agent, or set fd)") from None
        os.set_inheritable(self.fd, False)  # a child (clamd) must not hold the agent's pipe open
        self._buffer = bytearray()
        self._oldest = 0.0
        self._failures: dict[str, tuple[int, str]] = {}  # task token -> (failed scans, the first one)

    def write(self, record: Record) -> None:
        if record.kind == FINDING and record.errors and not record.detections:
            self._failed(record)
            return
        if record.kind == LOG and self._below_level(record):
            return
        if record.kind == TASK_DONE and record.token in self._failures:
            count, first = self._failures.pop(record.token)
            self._send(LOG_TYPE, record.timestamp, log_fields(
                f"task token {record.token!r}: {count} file(s) could not be scanned, so they are neither clean "
                f"nor reported (see scanner.log); the first: {first}", target="elkscan.scan"))
        for each in per_process(record):
            mapped = to_elkeid(each)
            if mapped is not None:
                data_type, fields = mapped
                self._send(data_type, record.timestamp, fields)

    def _below_level(self, record: Record) -> bool:
        return upstream_level(text(record.facts.get("level", "ERROR"))) < upstream_level(self.config.log_level)

    def _failed(self, record: Record) -> None:
        """A file no engine could judge: logged here, counted under its task for the summary line."""
        path = record.target.path if record.target is not None else ""
        log.warning("scan failed: %s: %s", path, record.error)
        if record.token:
            count, first = self._failures.get(record.token, (0, f"{path}: {record.error}"))
            self._failures[record.token] = (count + 1, first)

    def _send(self, data_type: int, timestamp: float, fields: dict[str, str]) -> None:
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer += encode_record(data_type, max(int(timestamp), 1), fields)
        if len(self._buffer) >= self.config.buffer or time.monotonic() - self._oldest >= self.config.flush_every:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self._buffer)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        finally:
            remaining = bytes(view)
            view.release()
            self._buffer = bytearray(remaining)

    def close(self) -> None:
        if getattr(self, "_buffer", None):
            try:
                self.flush()
            except OSError as exc:
                log.info("records not delivered at exit: %s", exc)
