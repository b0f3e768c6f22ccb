"""The ``stdout`` sink: ``format: jsonl`` (one JSON object per record) or ``format: table``."""

from __future__ import annotations

import json
import shutil
import sys

import attrs
from attrs import frozen

from elkscan_core import Record, Sink, hookimpl

from .render import record_fields

FORMATS = ("auto", "jsonl", "table")


@frozen
class StdoutConfig:
    """``format``: ``jsonl``, ``table``, or ``auto`` (a table on a terminal, JSON lines otherwise)."""

    format: str = attrs.field(default="auto", validator=attrs.validators.in_(FORMATS))


class StdoutSink(Sink):
    """Writes each record to standard output as it arrives; a closed stdout stops the session."""

    id = "stdout"
    Config = StdoutConfig

    def start(self) -> None:
        self.stream = sys.stdout
        self.format = self.config.format
        if self.format == "auto":
            self.format = "table" if self.stream.isatty() else "jsonl"
        self._header = False

    def write(self, record: Record) -> None:
        if self.format == "jsonl":
            self.stream.write(json.dumps(record_fields(record), ensure_ascii=False, default=str) + "\n")
        else:
            self._row(record)

    def _row(self, record: Record) -> None:
        width = max(shutil.get_terminal_size((120, 24)).columns, 80)
        if not self._header:
            self.stream.write(f"{'RESULT':<40} {'ENGINE':<8} PATH\n")
            self._header = True
        if record.target is None:
            facts = " ".join(f"{k}={v}" for k, v in record.facts.items())
            self.stream.write(f"{record.kind:<40} {'':<8} {facts}"[:width] + "\n")
            return
        path = record.target.path
        if record.target.pid is not None:
            path += f" (pid {record.target.pid})"
        rows = [(d.signature, d.engine, path) for d in record.detections]
        if record.errors:
            rows.append(("ERROR", "", f"{path}: {record.error}"))
        for result, engine, where in rows or [("clean", "", path)]:
            self.stream.write(f"{result:<40} {engine:<8} {where}\n")

    def flush(self) -> None:
        self.stream.flush()


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(StdoutSink)
