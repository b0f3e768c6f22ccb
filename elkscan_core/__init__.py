"""elkscan: a pluggable host malware-scanning framework (a Python re-implementation of Elkeid's scanner).

The public API is what this module exports; everything else is an implementation detail.
"""

from .canary import EICAR, Canary
from .components import Engine, Enricher, Measure, NoConfig, Sink, Source, Subject
from .errors import Cancelled, ComponentError, ConfigError, ElkscanError, PluginError, Stop
from .hookspecs import hookimpl
from .model import (FILE_EVENT, FINDING, KNOWN_GOOD, LOG, RANSOM_EVENT, TASK_DONE, UNREADABLE, Detection,
                    FileFacts, Job, KnownGood, Outcome, ProcessFacts, Receipt, Record, Target,
                    split_signature)
from .pipeline import Pipeline, load_pipeline, parse_pipeline
from .plugins import make_plugin_manager
from .runner import Session, Summary, build_session
from .units import Duration, Percent, Size
from .version import __version__

__all__ = [
    "Canary", "Cancelled", "ComponentError", "ConfigError", "Detection", "Duration", "EICAR", "ElkscanError", "Engine",
    "Enricher", "FILE_EVENT", "FINDING", "FileFacts", "Job", "KNOWN_GOOD", "KnownGood", "LOG", "Measure", "NoConfig",
    "Outcome", "Percent",
    "Pipeline", "PluginError", "ProcessFacts", "RANSOM_EVENT", "Receipt", "Record", "Session", "Sink", "Size",
    "Source", "Stop", "Subject", "Summary", "TASK_DONE", "Target", "UNREADABLE", "build_session",
    "hookimpl", "load_pipeline", "make_plugin_manager", "parse_pipeline", "split_signature",
]
