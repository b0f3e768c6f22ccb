"""The code in docs/writing-plugins.md runs as the page says: the options example, the detections, and
the SQLite sink (with check_same_thread=False it stores every record; without, every write fails on the
sink's writer thread, the failure the page explains)."""

from __future__ import annotations

import re
import sqlite3
import types
from pathlib import Path

import pytest

from elkscan_core import ConfigError, Detection, hookimpl
from elkscan_core.pipeline import parse_pipeline
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.runner import build_session
from elkscan_core.testing import run, write_samples

PAGE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"


def block(marker: str) -> str:
    """The page's Python code block that contains ``marker``."""
    return next(code for code in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S) if marker in code)


def module(code: str, name: str) -> types.ModuleType:
    namespace = types.ModuleType(name)
    exec(compile(code, f"{PAGE.name}:{name}", "exec", dont_inherit=True), namespace.__dict__)
    return namespace


def test_options_are_validated_into_self_config_and_paths_resolve_from_the_pipeline(tmp_path):
    example = module(block("class MyEngine(Engine)"), "options_example")
    example.elkscan_register_engines = hookimpl(lambda registry: registry.add(example.MyEngine))

    def session(options):
        pipeline = parse_pipeline({"version": 1, "engines": [{"use": "myengine", "with": options}]}, "p.yaml",
                                  str(tmp_path / "conf"))
        pm = make_plugin_manager(())
        pm.register(example, name="options-example")
        return build_session(pipeline, pm)

    engine = session({"rules": ["local.yar"], "timeout": "500ms", "max_file_size": "32MiB"}).engines[0]
    assert (engine.config.timeout, engine.config.max_file_size, engine.config.mode) == (0.5, 32 << 20, "fast")
    engine.start()
    assert engine.paths == [str(tmp_path / "conf" / "local.yar")]
    with pytest.raises(ConfigError, match=r"engines\[0\]\.with"):
        session({"mode": "slow"})
    with pytest.raises(ConfigError, match="colour"):
        session({"colour": "red"})


def test_the_detection_examples_split_as_the_page_says():
    module(block("Detection.from_signature(\"myengine\""), "detections")
    assert Detection.from_signature("myengine", "Unix.Trojan.Mirai-1").class_ == "Trojan"
    assert Detection.from_signature("myengine", "Php_Webshell_Eval", yara_rule=True).class_ == "Webshell"
    assert (Detection.from_signature("myengine", "Eicar").name, Detection("e", "Eicar").class_) == ("Eicar", "")


def sqlite_session(tmp_path, code):
    samples = tmp_path / "samples"
    write_samples(samples)
    conf = tmp_path / "conf"
    conf.mkdir()
    sink = module(code, "sqlite_sink")
    result = run({"plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"), "engines": ["yara"],
                  "sources": [{"use": "dirscan", "with": {"roots": {str(samples): -1}, "exclude": [],
                                                           "type_filter": False}}],
                  "sinks": [{"use": "sqlite", "with": {"path": "records.sqlite"}}]},
                 extra_plugins=[sink], report_clean=True, base_dir=str(conf))
    with sqlite3.connect(conf / "records.sqlite") as db:
        rows = db.execute("SELECT id, status FROM records").fetchall()
    return result, rows


def test_the_sqlite_sink_stores_every_record_beside_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path is the pipeline's, not the working directory's
    result, rows = sqlite_session(tmp_path, block("class SqliteSink(Sink)"))
    assert result.summary.errors == 0 and len(rows) == len(result.records) == 16
    assert sorted(rows) == sorted((r.id, r.status) for r in result.records)
    assert not (tmp_path / "records.sqlite").exists()


def test_a_connection_opened_in_start_fails_every_write_on_the_writer_thread(tmp_path, caplog):
    code = block("class SqliteSink(Sink)")
    assert "check_same_thread=False" in code
    result, rows = sqlite_session(tmp_path, code.replace(", check_same_thread=False", ""))
    assert rows == [] and result.summary.errors >= len(result.records) == 16
    assert "SQLite objects created in a thread can only be used in that same thread" in caplog.text
