"""Start-up imports only what the command uses (docs/performance.md#start-up-and-shut-down): each test
runs a fresh interpreter and reads its ``sys.modules``. No timing: what is imported is what costs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _modules_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _tops(modules: set[str]) -> set[str]:
    return {name.partition(".")[0] for name in modules}


def test_importing_the_package_imports_no_module_of_its_api():
    modules = _modules_after("import elkscan_core")
    assert not _tops(modules) & {"attrs", "attr", "cattrs", "yaml", "pluggy", "hashlib"}
    assert {name for name in modules if name.startswith("elkscan_core.")} == {"elkscan_core.version"}


def test_the_api_is_there_when_used():
    modules = _modules_after("from elkscan_core import Engine, Size, __version__")
    assert {"elkscan_core.components", "elkscan_core.units"} <= modules
    assert "elkscan_core.runner" not in modules


def test_a_scan_imports_the_plugins_it_allows_and_nothing_it_does_not_use(tmp_path):
    (tmp_path / "empty").mkdir()
    pipeline = {"version": 1, "plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
                "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path / "empty"): -1}}}],
                "engines": [{"use": "yara"}]}
    (tmp_path / "p.yaml").write_text(json.dumps(pipeline))
    modules = _modules_after(f"""
        from elkscan_core import build_session, load_pipeline, make_plugin_manager
        pipeline = load_pipeline({str(tmp_path / "p.yaml")!r})
        summary = build_session(pipeline, make_plugin_manager(pipeline.plugins)).run()
        assert summary.errors == 0, summary
    """)
    plugins = {name for name in _tops(modules) if name.startswith("elkscan_") and name != "elkscan_core"}
    assert plugins == {"elkscan_yara_backend"}
    # metrics, the verdict cache, plugin discovery through importlib.metadata, OpenSSL's hashes: not here
    assert not modules & {"elkscan_core.metrics", "elkscan_core.cache", "importlib.metadata", "hashlib"}


def test_elkscan_help_imports_no_plugin():
    modules = _modules_after("""
        from elkscan_core import cli
        try:
            cli.main(["--help"])
        except SystemExit:
            pass
    """)
    assert {name for name in _tops(modules) if name.startswith("elkscan_")} == {"elkscan_core"}
