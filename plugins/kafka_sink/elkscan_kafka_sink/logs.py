"""librdkafka's log lines and error events through elkscan's logger, rate-limited.

librdkafka reconnects every few hundred milliseconds while a broker is down and says so each time (a log
line and an error event): unchecked, one outage writes thousands of lines. Here each kind of line (its
facility, or the error's code) is said at most once a minute, with the number left out since.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

#: Each kind of line is said at most once in this many seconds.
QUIET = 60.0
_THREAD = re.compile(r"^\[thrd:[^\]]*\]: ")  # librdkafka's thread name, before each log line's text
_KINDS = 256  # kinds remembered at most; librdkafka has a few dozen facilities and error codes


class RateLimitedLog:
    """What confluent-kafka's ``logger`` and ``error_cb`` options take (``log()``, ``error()``), said on
    ``logger`` with ``prefix``, each kind of line at most once per ``quiet`` seconds."""

    def __init__(self, logger: logging.Logger, prefix: str, quiet: float = QUIET,
                 clock: Callable[[], float] = time.monotonic, on_fatal: str = "the producer is started afresh") -> None:
        self.logger, self.prefix, self.quiet, self.clock = logger, prefix, quiet, clock
        self.on_fatal = on_fatal  # what follows a fatal error, said with it
        self._said: dict[str, list[float | int]] = {}  # kind -> [when last said, how many left out since]

    def log(self, level: int, fmt: str, *args: Any) -> None:
        """confluent-kafka's logger call: ``log(level, "%s [%s] %s", facility, client, text)``. A librdkafka
        error (a broker unreachable) is a warning here: what it costs the records is the spool's to say."""
        facility = str(args[0]) if args else "?"
        text = _THREAD.sub("", str(args[-1]) if args else fmt)
        self.say(min(level, logging.WARNING), f"log {facility}", f"librdkafka {facility}: {text}")

    def error(self, err: Any) -> None:
        """confluent-kafka's ``error_cb`` with a ``KafkaError``. A fatal one is an error."""
        if err.fatal():
            self.say(logging.ERROR, f"fatal {err.name()}",
                     f"librdkafka fatal error {err.name()}: {err.str()}; {self.on_fatal}")
            return
        # a connection that failed is also a FAIL log line, and every broker down follows it: one kind, said once
        kind = "log FAIL" if err.name() in ("_TRANSPORT", "_ALL_BROKERS_DOWN") else f"error {err.name()}"
        self.say(logging.WARNING, kind, f"librdkafka {err.name()}: {err.str()}")

    def say(self, level: int, kind: str, text: str) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self.clock()
        said = self._said.get(kind)
        if said is not None and now - said[0] < self.quiet:
            said[1] += 1
            return
        if said is None and len(self._said) >= _KINDS:
            self._said.pop(next(iter(self._said)))
        more = f" ({said[1]} more like it in the last {now - said[0]:.0f}s)" if said and said[1] else ""
        self._said[kind] = [now, 0]
        self.logger.log(level, "%s: %s%s", self.prefix, text, more)
