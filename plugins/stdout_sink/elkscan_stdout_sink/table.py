"""The table for people: one row per detection, every cell shown as text, never obeyed."""

from __future__ import annotations

from elkscan_core import Record

from .text import cells, pad, shorten, visible

ENGINE_WIDTH = 8
#: Wide enough for ClamAV names such as ``Unix.Trojan.ReverseShell-Elkscan-1.UNOFFICIAL``.
RESULT_WIDTH = 48
#: What the RESULT column gives up on a narrow terminal before the PATH column goes below this.
MIN_PATH_WIDTH = 30
MIN_RESULT_WIDTH = 24


class Table:
    """Formats records as rows. ``columns`` is the terminal's width: cells are then cut in the middle
    (``...``) to fit their column; without it (a file or a pipe) nothing is cut, the path being last."""

    def __init__(self, columns: int | None = None) -> None:
        self.columns = columns
        self.result_width = RESULT_WIDTH
        if columns is not None:
            spare = columns - 1 - ENGINE_WIDTH - 2 - MIN_PATH_WIDTH
            self.result_width = max(MIN_RESULT_WIDTH, min(RESULT_WIDTH, spare))

    def header(self) -> str:
        return self._row("RESULT", "ENGINE", "PATH")

    def rows(self, record: Record) -> list[str]:
        if record.target is None:
            facts = " ".join(f"{k}={v}" for k, v in record.facts.items())
            return [self._row(record.kind, "", facts)]
        path = record.target.path
        if record.target.pid is not None:
            path += f" (pid {record.target.pid})"
        rows = [(d.signature, d.engine, path) for d in record.detections]
        if record.errors:
            rows.append(("ERROR", "", f"{path}: {record.error}"))
        return [self._row(*row) for row in rows or [("clean", "", path)]]

    def _row(self, result: str, engine: str, where: str) -> str:
        result, engine, where = visible(result), visible(engine), visible(where)
        if self.columns is not None:
            result, engine = shorten(result, self.result_width), shorten(engine, ENGINE_WIDTH)
            name = cells(where) - cells(where.rsplit("/", 1)[0])
            where = shorten(where, max(self.columns - 1 - self.result_width - ENGINE_WIDTH - 2, 3), name)
        return f"{pad(result, self.result_width)} {pad(engine, ENGINE_WIDTH)} {where}\n"
