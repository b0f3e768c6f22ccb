"""Registers the ``file`` and ``syslog`` sinks."""

from __future__ import annotations

from elkscan_core import hookimpl

from .file import FileSink
from .syslog import SyslogSink


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(FileSink)
    registry.add(SyslogSink)
