"""``repeat_after``: a detection found again (a periodic pass, the next cron run) is sent again only once
that long has passed since it was last sent.

Detections are known by their record ``id`` (host, file, signature, rule version: docs/records.md), so
new rules, another file or another host are news at once. Only records with detections are held back,
and never an answer to a task (a record with a token). The times sent are kept per sink in its private
state directory (``repeats``, JSON, replaced atomically), at most ``MAX_ENTRIES`` of them (the oldest go
first); a damaged file is started afresh with a warning: the worst it costs is a repeat sent again.
"""

from __future__ import annotations

import json
import logging
import os
import time

from ..model import DETECTED, Record

log = logging.getLogger("elkscan.delivery")

FILE = "repeats"
MAX_ENTRIES = 100_000
_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW


class Repeats:
    """When each detection was last sent, by record id. Used from the sink's writer thread only."""

    def __init__(self, directory: str, after: float, name: str = "delivery") -> None:
        self.path = os.path.join(directory, FILE)
        self.after = after
        self.name = name
        self.held = 0  # records held back as repeats
        self._sent: dict[str, float] = self._load() if after > 0 else {}
        self._dirty = False

    def _load(self) -> dict[str, float]:
        try:
            fd = os.open(self.path, os.O_RDONLY | _OPEN)
        except FileNotFoundError:
            return {}
        try:
            with os.fdopen(fd, "rb") as stream:
                data = json.loads(stream.read(64 << 20))
            sent = data["sent"]
            if data.get("version") != 1 or not isinstance(sent, dict):
                raise ValueError("unknown layout")
            now = time.time()
            return {k: float(v) for k, v in sent.items()
                    if isinstance(k, str) and isinstance(v, (int, float)) and 0 <= now - v < self.after}
        except (ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
            log.warning("%s: %s is damaged (%s); detections may be sent again once", self.name, self.path, exc)
            return {}

    def held_back(self, record: Record) -> bool:
        """True when ``record`` repeats a detection sent less than ``after`` ago; otherwise it counts as
        sent now. A clock set back never holds a record back."""
        if self.after <= 0 or record.status != DETECTED or record.token or not record.id:
            return False
        now = time.time()
        last = self._sent.get(record.id)
        if last is not None and 0 <= now - last < self.after:
            self.held += 1
            return True
        self._sent.pop(record.id, None)
        self._sent[record.id] = now  # last in order: the oldest entries are the first ones
        if len(self._sent) > MAX_ENTRIES:
            del self._sent[next(iter(self._sent))]
        self._dirty = True
        return False

    def save(self) -> None:
        """Write the times sent, when any changed."""
        if not self._dirty:
            return
        now = time.time()
        sent = {k: v for k, v in self._sent.items() if 0 <= now - v < self.after}
        temporary = self.path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _OPEN, 0o600)
        with os.fdopen(fd, "w") as stream:
            json.dump({"version": 1, "sent": sent}, stream)
        os.replace(temporary, self.path)
        self._sent, self._dirty = sent, False
