"""scanner.log as Elkeid keeps its log (audit #29): rotated at a size, ten gzip-compressed backups."""

from __future__ import annotations

import gzip
import logging

from elkscan_elkeid_transport import agent


def test_scanner_log_rotates_into_ten_gzip_backups(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(agent, "LOG_SIZE", 2000)
    root = logging.getLogger()
    before = list(root.handlers)
    agent.setup_logging()
    (handler,) = [h for h in root.handlers if h not in before]
    try:
        for i in range(2000):
            logging.getLogger("elkscan.test").info("line %05d of a log that grows", i)
    finally:
        root.removeHandler(handler)
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["scanner.log"] + [f"scanner.log.{n}.gz" for n in range(1, 11)])
    newest = gzip.decompress((tmp_path / "scanner.log.1.gz").read_bytes()).decode()
    assert newest.count("\n") > 10 and "\tINFO\telkscan.test\ttest_logging.py:" in newest
    assert "line 01999 of a log" in (tmp_path / "scanner.log").read_text()
    assert (tmp_path / "scanner.log").stat().st_size <= 2000
