"""elkscan: a pluggable host malware-scanning framework (a Python re-implementation of Elkeid's scanner).

The public API is what this module exports; everything else is an implementation detail. Each name is
imported from its module when first used, so a command pays only for the modules it needs
(docs/performance.md#start-up-and-shut-down).
"""

from importlib import import_module

from .version import __version__

#: Exported name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("EICAR", "Canary"), "canary"),
    **dict.fromkeys(("Engine", "Enricher", "Measure", "NoConfig", "Sink", "Source", "Subject"), "components"),
    **dict.fromkeys(("Cancelled", "ComponentError", "ConfigError", "ElkscanError", "PluginError", "Stop"),
                    "errors"),
    "hookimpl": "hookspecs",
    **dict.fromkeys(("FILE_EVENT", "FINDING", "KNOWN_GOOD", "LOG", "RANSOM_EVENT", "TASK_DONE", "UNREADABLE",
                     "Detection", "FileFacts", "Job", "KnownGood", "Outcome", "ProcessFacts", "Receipt", "Record",
                     "Target", "split_signature"), "model"),
    **dict.fromkeys(("Pipeline", "load_pipeline", "parse_pipeline"), "pipeline"),
    "make_plugin_manager": "plugins",
    **dict.fromkeys(("Session", "Summary", "build_session"), "runner"),
    **dict.fromkeys(("Duration", "Percent", "Size"), "units"),
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
