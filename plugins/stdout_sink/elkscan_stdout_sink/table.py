"""The table for people: one row per detection or outcome, every cell shown as text, never obeyed."""

from __future__ import annotations

from elkscan_core import Record
from elkscan_core.model import CLEAN, NOT_SCANNED

from elkscan_core.text import cells, pad, shorten, visible

#: Wide enough for ``NOT SCANNED`` and the longest record kind.
RESULT_WIDTH = 12
#: Wide enough for ClamAV names such as ``Unix.Trojan.ReverseShell-Elkscan-1.UNOFFICIAL``.
SIGNATURE_WIDTH = 48
MIN_SIGNATURE_WIDTH = 24
#: Wide enough for the engines that judged a clean file (``yara,clamav``).
ENGINE_WIDTH = 11
#: What the SIGNATURE column gives up on a narrow terminal before the PATH column goes below this.
MIN_PATH_WIDTH = 30
RESULTS = {CLEAN: "clean", NOT_SCANNED: "NOT SCANNED"}


class Table:
    """Formats records as rows. ``columns`` is the terminal's width: cells are then cut in the middle
    (``...``) to fit their column; without it (a file or a pipe) nothing is cut, the path being last."""

    def __init__(self, columns: int | None = None) -> None:
        self.columns = columns
        self.signature_width = SIGNATURE_WIDTH
        if columns is not None:  # on a narrow terminal the signature and the path share what is left
            room = columns - 1 - RESULT_WIDTH - ENGINE_WIDTH - 3
            self.signature_width = max(min(SIGNATURE_WIDTH, room - MIN_PATH_WIDTH),
                                       min(MIN_SIGNATURE_WIDTH, room // 2))

    def header(self) -> str:
        return self._row("RESULT", "SIGNATURE", "ENGINE", "PATH")

    def rows(self, record: Record) -> list[str]:
        """``detected`` per detection, ``ERROR`` per failure, else ``clean`` (with the engines that read
        the file, and ``(known good)`` when one vouched for it) or ``NOT SCANNED`` (with the reason in the
        signature column)."""
        if record.target is None:
            facts = " ".join(f"{k}={v}" for k, v in record.facts.items())
            return [self._row(record.kind, "", "", facts)]
        path = record.target.path
        if record.target.host:  # a file of another host, judged here by its digests
            path = f"{record.target.host}:{path}"
        if record.target.pid is not None:
            path += f" (pid {record.target.pid})"
        rows = [("detected", d.signature, d.engine, path) for d in record.detections]
        rows += [("ERROR", f"({o.status}: {o.message})" if o.message else f"({o.status})", o.component, path)
                 for o in record.errors]
        if not rows and record.status == NOT_SCANNED:
            rows.append((RESULTS[NOT_SCANNED], f"({record.skipped})", "", path))
        elif not rows:
            rows.append((RESULTS[CLEAN], "(known good)" if record.known_good else "", ",".join(record.judged_by),
                         path))
        return [self._row(*row) for row in rows]

    def _row(self, result: str, signature: str, engine: str, where: str) -> str:
        result, signature, engine, where = map(visible, (result, signature, engine, where))
        if self.columns is not None:
            result, engine = shorten(result, RESULT_WIDTH), shorten(engine, ENGINE_WIDTH)
            signature = shorten(signature, self.signature_width)
            room = self.columns - 1 - RESULT_WIDTH - self.signature_width - ENGINE_WIDTH - 3
            where = shorten(where, max(room, 3), cells(where) - cells(where.rsplit("/", 1)[0]))
        return (f"{pad(result, RESULT_WIDTH)} {pad(signature, self.signature_width)} "
                f"{pad(engine, ENGINE_WIDTH)} {where}\n")
