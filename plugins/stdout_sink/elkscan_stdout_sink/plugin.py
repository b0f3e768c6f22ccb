"""The ``stdout`` sink: ``format: jsonl`` (one JSON object per record) or ``format: table``."""

from __future__ import annotations

import codecs
import shutil
import sys

import attrs
from attrs import frozen

from elkscan_core import Record, Sink, hookimpl
from elkscan_core.ecs import ecs_document
from elkscan_core.progress import above

from elkscan_core.render import json_line, record_fields
from .table import Table

FORMATS = ("auto", "jsonl", "table", "ecs")


@frozen
class StdoutConfig:
    """``format``: ``jsonl``, ``table``, ``ecs`` (Elastic Common Schema documents, one per line), or
    ``auto`` (a table on a terminal, JSON lines otherwise)."""

    format: str = attrs.field(default="auto", validator=attrs.validators.in_(FORMATS))


class StdoutSink(Sink):
    """Writes each record to standard output as it arrives; a closed stdout stops the session."""

    id = "stdout"
    Config = StdoutConfig

    def start(self) -> None:
        self.stream = sys.stdout
        tty = self.stream.isatty()
        self.format = self.config.format
        if self.format == "auto":
            self.format = "table" if tty else "jsonl"
        # JSON lines are UTF-8; on a stdout that encodes otherwise they are written in ASCII (\u escapes),
        # and the table shows what that encoding lacks as escapes, never failing on a name.
        self._encoding = codecs.lookup(getattr(self.stream, "encoding", None) or "utf-8").name
        self._ascii = self._encoding != "utf-8"
        self._table = Table(shutil.get_terminal_size().columns if tty else None)
        self._header = False

    def write(self, record: Record) -> None:
        if self.format == "jsonl":
            text = json_line(record_fields(record, self.session.host), ascii_only=self._ascii)
        elif self.format == "ecs":
            text = json_line(ecs_document(record_fields(record, self.session.host), self.session.host),
                             ascii_only=self._ascii)
        else:
            text = "".join(self._table.rows(record))
            if not self._header:
                text, self._header = self._table.header() + text, True
            if self._ascii:
                text = text.encode(self._encoding, "backslashreplace").decode(self._encoding)
        with above(self.stream):
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(StdoutSink)
