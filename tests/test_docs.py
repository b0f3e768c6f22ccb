"""Meta-tests that keep the docs true: links resolve, nothing points outside the repository, every
plugin is packaged by the convention, and every option of every component and of ``limits`` is
documented."""

import os
import re
import tomllib
from pathlib import Path

import attrs
import pytest

from elkscan_core.pipeline import Limits
from elkscan_core.plugins import load_everything
from elkscan_core.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("plugins/*/README.md"), ROOT / "bench/README.md"]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for link in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
        if not link.startswith(("http://", "https://", "mailto:")):
            assert (page.parent / link).exists(), f"{page.relative_to(ROOT)} links to missing {link}"


#: What a file of a clone must not cite: the development-time spec and data that sit beside the repository.
OUTSIDE = re.compile(r"(\.\.|/work)/shared\b|\bELKEID\.md|\bDESIGN\.md")
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".elkscan"}
TEXT = (".md", ".py", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg", ".ini", ".yar")


def repository_text_files():
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        yield from (Path(top) / f for f in files if f.endswith(TEXT))


def test_nothing_points_outside_the_repository():
    cited = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in repository_text_files()
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not cited, "a fresh clone has nothing beside it:\n" + "\n".join(cited)


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_plugin_follows_the_packaging_convention(plugin):
    project = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]
    assert project["name"] == "elkscan-" + plugin.name.replace("_", "-")
    assert project["entry-points"]["elkscan"] == {plugin.name: f"elkscan_{plugin.name}.plugin"}
    assert (plugin / "README.md").exists() and (plugin / "tests").is_dir()
    assert project["readme"] == "README.md" and project["license"]  # a wheel says what it is, and its terms


def documented_text() -> str:
    return "\n".join(p.read_text() for p in PAGES)


def _components():
    pm, failures = load_everything()
    assert not failures
    registry, errors = Registry.collect(pm)
    assert not errors
    return [(kind, cid, cls) for kind, cid, cls, _ in registry.items()]


@pytest.mark.parametrize("kind,cid,cls", _components(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_component_option_is_documented(kind, cid, cls):
    text = documented_text()
    missing = [f.name for f in attrs.fields(cls.Config) if not re.search(rf"`{f.name}:?`", text)]
    assert not missing, f"{kind} {cid!r}: options not documented in docs/ or a plugin README: {missing}"


def test_every_limit_is_documented():
    text = (ROOT / "docs" / "pipeline.md").read_text()
    assert [f.name for f in attrs.fields(Limits) if f"`{f.name}`" not in text] == []
