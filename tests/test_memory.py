"""What a scan keeps resident (docs/performance.md, "Memory: what a scan holds"): modules a scan does not
use are not imported, so their memory is never taken. Each case runs a real scan in a fresh interpreter,
since the test process has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCAN = textwrap.dedent("""
    import json, sys
    from elkscan_core.pipeline import load_pipeline
    from elkscan_core.plugins import make_plugin_manager
    from elkscan_core.runner import build_session
    pipeline = load_pipeline(sys.argv[1])  # what `elkscan scan -p PIPELINE` does
    summary = build_session(pipeline, make_plugin_manager(pipeline.plugins), report_clean=True).run()  # --all
    assert summary.files == 2 and summary.clean == 2 and not summary.errors, summary
    print(json.dumps(sorted(sys.modules)))
""")


def _modules_after_scan(pipeline: dict, tmp_path) -> set[str]:
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({"version": 1, "canary_every": 0, **pipeline}))  # JSON is YAML
    done = subprocess.run([sys.executable, "-c", SCAN, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.txt").write_text("nothing to see\n")
    (root / "b.bin").write_bytes(bytes(range(256)) * 64)
    return root


def _pipeline(root, tmp_path, hashes_when: str) -> dict:
    return {"plugins": ["yara_backend", "hash_extractor"], "state_dir": str(tmp_path / "state"),
            "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False,
                                                     "min_size": 0}}],
            "engines": [{"use": "yara"}],
            "enrichers": [{"use": "hashes", "with": {"when": hashes_when}}],
            "limits": {"workers": 2, "cache": True}}


def test_a_scan_that_hashes_no_file_does_not_load_openssl(tree, tmp_path):
    """Record ids, the verdict cache's keys and the rules' identity are hashed by CPython's own code:
    OpenSSL's libcrypto (about 3.5 MB resident) is loaded only when a file is hashed."""
    modules = _modules_after_scan(_pipeline(tree, tmp_path, "hits"), tmp_path)
    assert "elkscan_hash_extractor.enricher" in modules and "yara" in modules
    assert not {"_hashlib", "hashlib"} & modules


def test_hashing_every_file_loads_hashlib_when_needed(tree, tmp_path):
    modules = _modules_after_scan(_pipeline(tree, tmp_path, "all"), tmp_path)
    assert "_hashlib" in modules
