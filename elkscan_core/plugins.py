"""Plugin loading with an allow-list.

A scanner runs as root: importing whatever happens to be installed is running code. So a session
imports only the plugins its pipeline lists; ``elkscan plugins`` is the one place that imports every
installed plugin, and it reports broken ones instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

import pluggy

from . import hookspecs
from .default_plugins import DEFAULT_PLUGINS
from .errors import PluginError

GROUP = "elkscan"
log = logging.getLogger("elkscan")


def entry_points_in(group: str) -> dict[str, EntryPoint]:
    """Entry points of a group by name, nothing imported (Python 3.9's API differs from 3.10's)."""
    found = entry_points()
    eps = found.select(group=group) if hasattr(found, "select") else found.get(group, ())
    return {ep.name: ep for ep in eps}


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
