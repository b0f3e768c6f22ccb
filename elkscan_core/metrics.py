"""The Prometheus endpoint of a session (``metrics:`` in a pipeline; docs/metrics.md).

Almost everything is read when scraped: the session's counts, its queue, the governor, the canaries
and each component's ``metrics()``. Only engine scan latencies are recorded as the scan goes. Each
session has its own ``CollectorRegistry`` and its own HTTP server thread (prometheus-client's threading
WSGI server and app, bounded: any local user can connect), shut down at close. prometheus-client is
imported only here, when a pipeline asks for metrics: it is the ``metrics`` extra, and importing it
costs a one-shot ``elkscan scan`` about 0.2 s.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from .components import Measure, SessionAPI, Sink
from .errors import ComponentError
from .version import __version__

if TYPE_CHECKING:
    from .canary_watch import Watch
    from .pipeline import MetricsConfig

try:
    from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
    from prometheus_client.process_collector import ProcessCollector
except ImportError as exc:  # the extra is not installed
    raise ComponentError(f"metrics: prometheus-client is not installed ({exc}); "
                         "pip install 'elkscan-core[metrics]'") from None

log = logging.getLogger("elkscan.metrics")


class Session(SessionAPI, Protocol):
    """What the metrics read of the running session (``elkscan_core.runner.Session``, which imports
    this module)."""

    canaries: Watch | None
    queue_depth: int
    workers_alive: int
    healthy: bool

    def counts(self) -> tuple[Any, dict[tuple[str, str], int]]: ...

    def given_up(self, sink: Sink) -> bool: ...

#: Seconds: from a small script read by YARA to a large archive unpacked by clamd.
SCAN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0)
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: Scrapes served at once; a connection beyond them is closed at once.
MAX_SCRAPES = 4
#: Seconds a connection may take to send its request and read the answer.
SCRAPE_TIMEOUT = 10.0


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        """No access log: stderr is the scanner's."""


class _Server(ThreadingWSGIServer):
    """prometheus-client's server, bounded: a local user who opens connections by the thousand has them
    closed, not a thread each in a process that runs as root, and a silent one is cut after
    ``SCRAPE_TIMEOUT``. Beyond ``MAX_SCRAPES`` at once, a scrape fails; the scan never notices."""

    request_queue_size = 64

    def __init__(self, *args, **kwargs) -> None:
        self.slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            request.settimeout(SCRAPE_TIMEOUT)
            super().process_request(request, client_address)  # a thread for it
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """A client that timed out or went away: nothing for stderr (anyone may connect)."""
        log.debug("metrics: a request from %s failed", client_address, exc_info=True)


class Metrics:
    """The session's registry, its scan-latency histogram, and the HTTP server that serves them."""

    def __init__(self, session: Session, config: MetricsConfig) -> None:
        self.session, self.config = session, config
        self.registry = CollectorRegistry(auto_describe=False)
        self.scan_seconds = Histogram("elkscan_engine_scan_seconds", "Time an engine took to judge one file",
                                      ["engine"], registry=self.registry, buckets=SCAN_BUCKETS)
        self.registry.register(_SessionCollector(session))
        ProcessCollector(registry=self.registry)
        self._server = self._thread = None
        self.port = 0  # the port listened on, once started (``listen: 127.0.0.1:0`` picks a free one)

    def start(self) -> None:
        host, port = self.config.address
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            server = type("Server", (_Server,), {"address_family": family})
            self._server = make_server(address[0], port, make_wsgi_app(self.registry), server, _Quiet)
        except OSError as exc:
            raise ComponentError(f"metrics: cannot listen on {self.config.listen}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="elkscan-metrics", daemon=True)
        self._thread.start()
        self.port = self._server.server_port
        log.info("metrics on http://%s/metrics", f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}")

    def observe_scan(self, engine: str, seconds: float) -> None:
        self.scan_seconds.labels(engine).observe(seconds)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = self._thread = None


class _SessionCollector:
    """Reads the session when scraped."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.started = time.time()
        self._broken: set[str] = set()  # components whose metrics() failed, said once each

    def collect(self) -> Iterator[Metric]:
        core = list(self._core())
        yield from core
        yield from self._components({family.name for family in core} | {"elkscan_engine_scan_seconds"})

    def _core(self) -> Iterator[Metric]:
        session = self.session
        summary, failures = session.counts()
        governor = session.governor
        yield _gauge("elkscan_up", "1 while the session runs, 0 once it is stopping",
                     0 if session.stopping.is_set() else 1)
        yield _gauge("elkscan_healthy", "1 while every engine passes its canary and no sink has been given up",
                     int(session.healthy))
        yield _gauge("elkscan_start_time_seconds", "When the session started, in unix seconds", self.started)
        yield InfoMetricFamily("elkscan_build", "elkscan's version", value={"version": __version__})
        for name, help_, value in (
                ("files", "Files judged, once per walk: every engine read them whole, or their verdicts came "
                 "from the cache",
                 summary.files),
                ("judged_bytes", "Bytes of the files judged", summary.bytes),
                ("names", "Names of the files judged (a file met under several names in a walk is judged "
                 "once)", summary.names),
                ("clean_files", "Files every engine read whole and found nothing in", summary.clean),
                ("detections", "Detections (a file can have several)", summary.detections),
                ("detected_files", "Files with at least one detection", summary.detected_files),
                ("ignored_detections", "Detections dropped by ignore_signatures", summary.ignored),
                ("errors", "Files, events and source steps that ended in an error", summary.errors),
                ("unjudged", "Files a user or a task named that ended not judged", summary.unjudged),
                ("abandoned", "Targets dropped unjudged by a stop", summary.abandoned),
                ("records", "Records handed to the sinks", summary.records),
                ("cache_hits", "Engine verdicts taken from the verdict cache", summary.cached),
                ("throttled_seconds", "Seconds workers slept to hold the CPU share", governor.throttled),
                ("memory_tight_episodes", "Times RSS came near limits.memory", governor.memory_episodes)):
            yield _counter(f"elkscan_{name}", help_, value)
        not_scanned = CounterMetricFamily("elkscan_not_scanned", "Files not judged, by reason", labels=["reason"])
        for reason, count in sorted(summary.not_scanned.items()):
            not_scanned.add_metric([reason], count)
        yield not_scanned
        errors = CounterMetricFamily("elkscan_component_errors", "Component calls that failed, timed out or "
                                     "returned garbage", labels=["component", "status"])
        for (component, status), count in sorted(failures.items()):
            errors.add_metric([component, status], count)
        yield errors
        yield _gauge("elkscan_queue_depth", "Targets waiting for a worker", session.queue_depth)
        yield _gauge("elkscan_queue_capacity", "Targets the work queue holds at most", session.pipeline.limits.queue)
        yield _gauge("elkscan_workers", "Worker threads alive", session.workers_alive)
        yield _gauge("elkscan_memory_tight", "1 while RSS is near limits.memory (feeding paused, one worker)",
                     int(governor.memory_tight))
        yield _gauge("elkscan_under_pressure", "1 while host pressure above limits.pressure slows the scan",
                     int(governor.under_pressure))
        yield from self._canaries()
        sink_up = GaugeMetricFamily("elkscan_sink_up", "0 once a sink hung and was given up", labels=["sink"])
        for sink in session.sinks:
            sink_up.add_metric([session.label(sink)], 0 if session.given_up(sink) else 1)
        yield sink_up

    def _canaries(self) -> Iterator[Metric]:
        watch = self.session.canaries
        state = dict(watch.state) if watch is not None else {}
        families = {
            "ok": GaugeMetricFamily("elkscan_canary_ok", "1 when the engine's last canary came back right",
                                    labels=["engine"]),
            "checked": GaugeMetricFamily("elkscan_canary_last_check_timestamp_seconds",
                                         "When the engine's canary was last checked", labels=["engine"]),
            "checks": CounterMetricFamily("elkscan_canary_checks", "Canary checks", labels=["engine"]),
            "failures": CounterMetricFamily("elkscan_canary_failures", "Canary checks that came back wrong",
                                            labels=["engine"]),
        }
        for engine, values in sorted(state.items()):
            for key, family in families.items():
                family.add_metric([engine], float(values[key]))
        yield from families.values()

    def _components(self, taken: set[str]) -> Iterator[Metric]:
        """What components report through ``metrics()``, grouped into families by name (a name the core
        uses is refused)."""
        session = self.session
        families: dict[str, tuple[Metric, list[str]]] = {}
        for group in (session.sources, session.engines, session.enrichers, session.sinks):
            for component in group:
                label = session.label(component)
                try:
                    measures = list(component.metrics())
                    for measure in measures:
                        _add(families, taken, component.kind, label, measure)
                except Exception as exc:
                    if label not in self._broken:
                        self._broken.add(label)
                        log.warning("%s %r: metrics() failed: %s: %s", component.kind, label,
                                    type(exc).__name__, exc)
        yield from (family for family, _ in families.values())


def _add(families: dict[str, tuple[Metric, list[str]]], taken: set[str], kind: str, label: str,
         measure: Measure) -> None:
    """Add one component's measure to its family (created at first use); ValueError for a bad one."""
    if not isinstance(measure, Measure):
        raise ValueError(f"returned a {type(measure).__name__}, expected Measure")
    name = measure.name.removesuffix("_total") if measure.kind == "counter" else measure.name
    if not _NAME.fullmatch(name) or measure.kind not in ("gauge", "counter"):
        raise ValueError(f"a measure needs a name of letters, digits and _ and a kind gauge or counter, got "
                         f"{measure.name!r} ({measure.kind!r})")
    labels = {kind: label, **measure.labels}
    full = f"elkscan_{name}"
    if full in taken:
        raise ValueError(f"{full} is one of the core's metrics; name a component's measures after it")
    if full not in families:
        cls = CounterMetricFamily if measure.kind == "counter" else GaugeMetricFamily
        families[full] = cls(full, measure.help or name.replace("_", " "), labels=list(labels)), list(labels)
    family, names = families[full]
    if list(labels) != names or (measure.kind == "counter") != (family.type == "counter"):
        raise ValueError(f"measure {measure.name!r} changes its kind or labels")
    family.add_metric([str(v) for v in labels.values()], float(measure.value))


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)
