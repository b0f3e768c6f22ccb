"""One 6002 per process, as Elkeid sends them, from one verdict per executable.

``procscan`` judges each distinct executable once and lists in ``extra["pids"]`` every process running
it; the record it gives describes the first of them. Here it becomes one record per process, each with
that process's own facts (read now, from ``/proc``, by the proc_enricher plugin's ``process_facts``; a
process that has exited meanwhile gets ``-3``, as Elkeid sends for what it cannot read).
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from elkscan_core import Record

from .mapping import PROCESS_FACTS


def _facts_of(pid: int) -> dict:
    try:
        from elkscan_proc_enricher import process_facts
    except ImportError:  # no process enricher installed: the pid alone, the rest "-3"
        return {"pid": pid}
    return process_facts(pid).as_fields()


def per_process(record: Record) -> Iterator[Record]:
    """``record``, then a copy for each other process running its executable (detections only)."""
    yield record
    target = record.target
    if target is None or not record.detections or target.origin != "procscan":
        return
    for pid in target.extra.get("pids", ()):
        if pid == target.pid:
            continue
        facts = {k: v for k, v in record.facts.items() if k not in PROCESS_FACTS}
        yield attrs.evolve(record, target=attrs.evolve(target, pid=pid, fd=None), facts={**facts, **_facts_of(pid)})
