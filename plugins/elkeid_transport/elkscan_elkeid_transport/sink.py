"""The ``elkeid`` sink: records to the agent on fd 4, framed, buffered, flushed at least every 200 ms.

A failed write (the agent closed the pipe) raises BrokenPipeError, which the runner turns into the end
of the session, as Elkeid exits on EPIPE. Nothing else in the process writes to this descriptor.
"""

from __future__ import annotations

import logging
import os
import time

from attrs import frozen

from elkscan_core import ComponentError, Duration, Record, Sink, Size

from .mapping import to_elkeid
from .wire import encode_record

log = logging.getLogger("elkscan.elkeid")


@frozen
class ElkeidSinkConfig:
    """``fd``: the agent's record pipe; ``buffer``: bytes held before a write (Elkeid: 512 KiB);
    ``flush_every``: longest time a record waits in the buffer (Elkeid: 200 ms)."""

    fd: int = 4
    buffer: Size = Size(512 * 1024)
    flush_every: Duration = Duration(0.2)


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

    def write(self, record: Record) -> None:
        mapped = to_elkeid(record)
        if mapped is None:
            return
        data_type, fields = mapped
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer += encode_record(data_type, max(int(record.timestamp), 1), fields)
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
