"""Component registry: (kind, id) -> class, filled by the plugins' ``elkscan_register_*`` hooks.

Each plugin's registration hook is called on its own, with a ``Registration`` that knows the plugin's
name, so a duplicate id is reported naming both plugins and a broken hook names its plugin.
"""

from __future__ import annotations


import pluggy

from .components import KINDS, Component
from .errors import ConfigError, PluginError

_HOOKS = {
    "source": "elkscan_register_sources",
    "engine": "elkscan_register_engines",
    "enricher": "elkscan_register_enrichers",
    "sink": "elkscan_register_sinks",
}


class Registration:
    """What a registration hook receives: ``add()`` one component class of the hook's kind."""

    def __init__(self, registry: Registry, kind: str, plugin: str) -> None:
        self._registry, self.kind, self.plugin = registry, kind, plugin

    def add(self, cls: type[Component]) -> None:
        base = KINDS[self.kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin {self.plugin!r} registered {cls!r} as a {self.kind}, "
                              f"but it is not a subclass of elkscan_core.{base.__name__}")
        if not cls.id:
            raise PluginError(f"plugin {self.plugin!r}: {cls.__name__} has no id")
        self._registry._add(self.kind, cls, self.plugin)


class Registry:
    """Every component class the loaded plugins provide, by kind and id."""

    def __init__(self) -> None:
        self._classes: dict[tuple[str, str], tuple[type[Component], str]] = {}

    @classmethod
    def from_plugins(cls, pm: pluggy.PluginManager) -> Registry:
        """Every component of the loaded plugins; the first plugin error stops start-up."""
        registry = cls()
        for kind, plugin, register in registry._hooks(pm):
            registry._register(kind, plugin, register)
        return registry

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> tuple[Registry, dict[str, str]]:
        """Every component that registers cleanly, and the error of each plugin that does not."""
        registry, errors = cls(), {}
        for kind, plugin, register in registry._hooks(pm):
            try:
                registry._register(kind, plugin, register)
            except PluginError as exc:
                errors[plugin] = str(exc)
        return registry, errors

    @staticmethod
    def _hooks(pm: pluggy.PluginManager):
        for kind, hook_name in _HOOKS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                yield kind, impl.plugin_name, impl.function

    def _register(self, kind: str, plugin: str, register) -> None:
        try:
            register(registry=Registration(self, kind, plugin))
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r} failed in {_HOOKS[kind]}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _add(self, kind: str, cls: type[Component], plugin: str) -> None:
        key = (kind, cls.id)
        if key in self._classes:
            other = self._classes[key][1]
            raise PluginError(f"{kind} id {cls.id!r} is registered twice: by plugin {other!r} and by "
                              f"plugin {plugin!r}; remove one of them from the pipeline's plugins")
        self._classes[key] = (cls, plugin)

    def get(self, kind: str, component_id: str, where: str = "") -> type[Component]:
        try:
            return self._classes[(kind, component_id)][0]
        except KeyError:
            import difflib  # here: only a pipeline's mistake needs it

            known = ", ".join(self.ids(kind)) or "none"
            close = difflib.get_close_matches(component_id, self.ids(kind), n=1)
            guess = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {kind} {component_id!r} (known: {known}){guess}", where,
                f"plugin {default_plugin_name(component_id)!r} may not be installed or not listed in "
                "'plugins:'; 'elkscan plugins' lists what is installed") from None

    def plugin_of(self, kind: str, component_id: str) -> str:
        return self._classes[(kind, component_id)][1]

    def ids(self, kind: str) -> list[str]:
        return sorted(i for k, i in self._classes if k == kind)

    def items(self) -> list[tuple[str, str, type[Component], str]]:
        """(kind, id, class, plugin) for every registered component, sorted."""
        return sorted((k, i, c, p) for (k, i), (c, p) in self._classes.items())


_PLUGIN_OF_ID = {"clamav": "clamav_backend", "yara": "yara_backend", "hashes": "hash_extractor",
                 "hashlist": "hash_extractor", "process": "proc_enricher", "fanotify": "fanotify_source",
                 "elkeid": "elkeid_transport", "stdout": "stdout_sink"}


def default_plugin_name(component_id: str) -> str:
    """The bundled plugin that provides an id, for hints; a guess for ids we do not ship."""
    return _PLUGIN_OF_ID.get(component_id, f"{component_id}_*")
