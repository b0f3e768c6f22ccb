"""Plugin loading with an allow-list.

A scanner runs as root: importing whatever happens to be installed is running code. So a session
imports only the plugins its pipeline lists; ``elkscan plugins`` is the one place that imports every
installed plugin, and it reports broken ones instead of failing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from importlib import import_module
from typing import Any

import pluggy

from . import hookspecs
from .default_plugins import DEFAULT_PLUGINS
from .errors import PluginError

GROUP = "elkscan"
log = logging.getLogger("elkscan")
_VALUE = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")


class EntryPoint:
    """An installed entry point, as ``importlib.metadata`` gives it (name, group, value, dist, load()),
    read without importing ``importlib.metadata`` (with email, zipfile and csv, a fifth of a scan's
    start-up: docs/performance.md#start-up-and-shut-down)."""

    def __init__(self, name: str, value: str, group: str, dist_path: str) -> None:
        self.name, self.value, self.group, self._dist_path = name, value, group, dist_path

    @property
    def dist(self) -> Any:
        """The distribution that declares it (``.name``, as its metadata says)."""
        return _Distribution(self._dist_path)

    def load(self) -> Any:
        match = _VALUE.match(self.value)
        if match is None:
            raise ValueError(f"malformed entry point value {self.value!r}")
        found = import_module(match["module"])
        for attr in (match["attr"] or "").split(".") if match["attr"] else ():
            found = getattr(found, attr)
        return found


class _Distribution:
    def __init__(self, path: str) -> None:
        self._path = path

    @property
    def name(self) -> str:
        for name in ("METADATA", "PKG-INFO"):
            try:
                with open(os.path.join(self._path, name), encoding="utf-8") as metadata:
                    for line in metadata:
                        if line.startswith("Name:"):
                            return line[5:].strip()
                        if not line.strip():
                            break
            except OSError:
                continue
        return os.path.basename(self._path).partition("-")[0]


def _distributions() -> list[str] | None:
    """The metadata directories of the installed distributions, the first of each name, in the order
    ``importlib.metadata`` finds them on ``sys.path``; None when it could find others (a zip on the path,
    a finder of its own), which only it can read."""
    if any(getattr(finder, "find_distributions", None) is not None and finder.__module__ != "_frozen_importlib_external"
           for finder in sys.meta_path):
        return None
    seen: set[str] = set()
    found = []
    for entry in sys.path:
        try:
            children = os.listdir(entry or ".")
        except NotADirectoryError:
            return None  # a zip on the path
        except OSError:
            continue
        infos = [c for c in children if c.lower().endswith(".dist-info")]
        eggs = [c for c in children if c.lower().endswith(".egg-info")]
        for child in (*infos, *eggs):
            key = re.sub(r"[-_.]+", "_", child.rpartition(".")[0].partition("-")[0]).lower()
            if key not in seen:
                seen.add(key)
                found.append(os.path.join(entry or ".", child))
    return found


def _sections(text: str) -> Iterable[tuple[str, str, str]]:
    """(section, name, value) of an ``entry_points.txt``."""
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section:
            name, _, value = line.partition("=")
            yield section, name.strip(), value.strip()


def entry_points_in(group: str) -> dict[str, Any]:
    """Entry points of a group by name, nothing imported."""
    paths = _distributions()
    if paths is None:
        from importlib.metadata import entry_points  # the general case, for what the scan above cannot read

        found = entry_points()
        eps = found.select(group=group) if hasattr(found, "select") else found.get(group, ())
        return {ep.name: ep for ep in eps}
    points: dict[str, EntryPoint] = {}
    for path in paths:
        try:
            with open(os.path.join(path, "entry_points.txt"), encoding="utf-8") as text:
                content = text.read()
        except (OSError, UnicodeDecodeError):
            continue
        for section, name, value in _sections(content):
            if section == group:  # as importlib.metadata's entry points in a dict: the last one wins
                points[name] = EntryPoint(name, value, group, path)
    return points


def installed() -> dict[str, EntryPoint]:
    """Entry points of installed plugins by name (nothing is imported)."""
    return entry_points_in(GROUP)


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, module in DEFAULT_PLUGINS:
        pm.register(module, name=name)
    return pm


def _load(pm: pluggy.PluginManager, ep: EntryPoint) -> None:
    try:
        module = ep.load()
    except Exception as exc:
        raise PluginError(f"plugin {ep.name!r} failed to import ({ep.value}): "
                          f"{type(exc).__name__}: {exc}") from exc
    try:
        pm.register(module, name=ep.name)
    except Exception as exc:
        raise PluginError(f"plugin {ep.name!r} cannot be registered: {exc}") from exc


def make_plugin_manager(allow: Iterable[str], *, missing_ok: bool = False) -> pluggy.PluginManager:
    """A plugin manager with the core's defaults plus exactly the allowed plugins.

    Raises PluginError naming the plugin when an allowed one fails to import, or is not installed,
    unless ``missing_ok``: then the session decides, since a plugin whose components the pipeline marks
    ``optional: true`` (or does not use) may be left out of an installation.
    """
    pm = _new_manager()
    available = installed()
    for name in dict.fromkeys(allow):
        if name not in available:
            message = (f"plugin {name!r} is listed in the pipeline's plugins but is not installed (install "
                       f"the {'elkscan-' + name.replace('_', '-')} distribution, or remove it from 'plugins:')")
            if not missing_ok:
                raise PluginError(message)
            log.info("%s", message)
            continue
        _load(pm, available[name])
    return pm


def load_everything() -> tuple[pluggy.PluginManager, dict[str, str]]:
    """Every installed plugin that loads, and the reason for each one that does not."""
    pm = _new_manager()
    failures: dict[str, str] = {}
    for name, ep in sorted(installed().items()):
        try:
            _load(pm, ep)
        except PluginError as exc:
            failures[name] = str(exc)
    return pm, failures
