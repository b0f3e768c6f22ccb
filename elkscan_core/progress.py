"""A one-line progress display on stderr for interactive scans (only when stderr is a terminal).

Output meant to stay (records on stdout, log lines) goes through ``above(stream)``: when that stream
shows on the progress line's terminal, the line is cleared first and redrawn below it on the next tick,
so the two never run into each other.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from .runner import Session

CLEAR = "\r\x1b[K"
#: The progress line being drawn, if any (one per process: it owns the terminal's last line).
_active: Progress | None = None


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} GB"


def status_line(session: Session) -> str:
    s = session.summary
    elapsed = session.elapsed() or 1e-9
    return (f"{s.files:,} files · {human_bytes(s.bytes)} · {human_bytes(s.bytes / elapsed)}/s · "
            f"{s.detections} detection{'s' * (s.detections != 1)} · {s.errors} error{'s' * (s.errors != 1)}")


def _terminal(stream: TextIO) -> int | None:
    """The terminal device ``stream`` writes to, or None when it is not a terminal."""
    try:
        fd = stream.fileno()
        return os.fstat(fd).st_rdev if os.isatty(fd) else None
    except (AttributeError, OSError, ValueError):
        return None


@contextmanager
def above(stream: TextIO) -> Iterator[None]:
    """Write to ``stream`` inside this block without running into the progress line."""
    progress = _active
    if progress is None or not progress.shares_terminal(stream):
        yield
        return
    with progress.lock:
        progress.clear()
        yield
        stream.flush()


class _Above:
    """A stream whose writes go above the progress line (for the log handlers on stderr)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        with above(self.stream):
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """Redraws the status line every ``interval`` seconds until stopped, then clears it."""

    def __init__(self, session: Session, stream: TextIO = sys.stderr, interval: float = 0.25) -> None:
        self.session, self.stream, self.interval = session, stream, interval
        self.lock = threading.Lock()
        self._drawn = False
        self._device = _terminal(stream)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._handlers: list[logging.StreamHandler] = []

    def shares_terminal(self, stream: TextIO) -> bool:
        return stream is self.stream or (self._device is not None and _terminal(stream) == self._device)

    def clear(self) -> None:
        """Erase the line if it is drawn (the caller holds ``lock``)."""
        if self._drawn:
            self.stream.write(CLEAR)
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        global _active
        _active = self
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and self.shares_terminal(handler.stream):
                handler.setStream(_Above(handler.stream))
                self._handlers.append(handler)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        self._done.set()
        self._thread.join()
        with self.lock:
            self._drawn = True  # clear even if a write that bypassed above() left text on the line
            self.clear()
        for handler in self._handlers:
            handler.setStream(handler.stream.stream)
        _active = None

    def _width(self) -> int:
        """The terminal's width now: a longer line would wrap and no longer be erased by ``CLEAR``."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return max(columns, 20) if columns else 200  # 0: the terminal does not say

    def _loop(self) -> None:
        while True:
            with self.lock:
                self.stream.write(CLEAR + status_line(self.session)[:self._width() - 1])
                self.stream.flush()
                self._drawn = True
            if self._done.wait(self.interval):
                return
