"""A one-line progress display on stderr for interactive scans (only when stderr is a terminal)."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from .runner import Session


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


class Progress:
    """Redraws the status line every ``interval`` seconds until stopped, then clears it."""

    def __init__(self, session: Session, stream: TextIO = sys.stderr, interval: float = 0.25) -> None:
        self.session, self.stream, self.interval = session, stream, interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def _loop(self) -> None:
        while True:
            self.stream.write("\r\x1b[K" + status_line(self.session)[:200])
            self.stream.flush()
            if self._done.wait(self.interval):
                return
