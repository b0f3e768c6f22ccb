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
