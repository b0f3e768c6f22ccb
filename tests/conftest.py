"""Fixtures for the core's tests: fake plugin distributions installed for real (a dist-info with entry
points on sys.path), so the allow-list loader is exercised exactly as in production."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """install_plugin(name, source): a distribution whose ``elkscan`` entry point ``name`` is a module
    with ``source`` as its code. Returns the site directory."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install(name: str, source: str, group: str = "elkscan") -> Path:
        module = f"fake_{name}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"fake_{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-{name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}\n")
        sys.modules.pop(module, None)
        return site

    return install


class Live:
    """Helpers for tests of a running scanner: ``elkscan run`` in a child process, polling."""

    command = [sys.executable, "-m", "elkscan_core.cli"]

    @staticmethod
    def pipeline(path: Path, data: dict) -> Path:
        import yaml

        path.write_text(yaml.safe_dump({"version": 1, **data}))
        return path

    def start(self, pipeline: Path, env: dict | None = None):
        """``elkscan -v run PIPELINE``; the process and the metrics URL it logs (stderr is then drained)."""
        import os
        import re
        import subprocess
        import threading
        import time

        proc = subprocess.Popen([*self.command, "-v", "run", str(pipeline)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            found = re.search(r"metrics on (http://\S+)", line)
            if found:
                threading.Thread(target=proc.stderr.read, daemon=True).start()  # never let stderr fill up
                return proc, found.group(1)
            if not line and proc.poll() is not None:
                break
        proc.kill()
        raise AssertionError("no metrics line on stderr: " + "".join(lines))

    @staticmethod
    def wait_for(condition, timeout: float = 30.0):
        """Poll until ``condition()`` is truthy; its value."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def live() -> Live:
    return Live()
