"""The researcher's example in docs/writing-plugins.md: a separately packaged enricher, installed with
pip and used from a pipeline by the real ``elkscan`` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "entropy_enricher"


def test_installed_example_enricher_adds_its_field(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(EXAMPLE)], check=True, capture_output=True)
    (tmp_path / "random.bin").write_bytes(os.urandom(4096))
    (tmp_path / "zeros.bin").write_bytes(b"\0" * 4096)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nplugins: [yara_backend, stdout_sink, entropy]\n"
                        "engines: [yara]\nenrichers: [entropy]\nsinks: [{use: stdout, with: {format: jsonl}}]\n")
    env = {**os.environ, "PYTHONPATH": str(site), "ELKSCAN_STATE_DIR": str(tmp_path / "state")}
    out = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "scan", "--all", "-p", str(pipeline),
                          str(tmp_path / "random.bin"), str(tmp_path / "zeros.bin")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    entropy = {Path(r["path"]).name: r["entropy"] for r in map(json.loads, out.stdout.splitlines())}
    assert entropy["zeros.bin"] == 0.0 and entropy["random.bin"] > 7.5
