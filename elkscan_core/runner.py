"""The session: builds components from a pipeline, starts them, runs the sources to their end, and
stops and closes everything in order.

Its work is split by job (docs/architecture.md): scheduling.py moves targets from the sources' threads
through one bounded work queue to a pool of worker threads; targets.py takes each target through its
stages (open once, engines, enrichers) to exactly one end (detected, clean, not scanned, error);
isolation.py makes every component call one that cannot stop the scan (exceptions, garbage, timeouts);
emission.py hands records to each sink's single writer thread.
"""

from __future__ import annotations

import collections
import logging
import os
import pwd
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from .canary import Canary, from_pipeline
from .canary_watch import Watch
from .components import Component, Engine, Enricher, Sink, Source
from .emission import Emission
from .errors import ComponentError, ConfigError
from .governor import Governor
from .isolation import Isolation
from .model import Outcome, Record
from .pipeline import ComponentSpec, Pipeline, configure_component
from .registry import Registry
from .scheduling import STOP_GRACE, SWITCH_INTERVAL, Scheduling
from .targets import Targets

if TYPE_CHECKING:
    from .cache import VerdictCache
    from .journal import Journal
    from .metrics import Metrics

log = logging.getLogger("elkscan")


def default_state_dir() -> str:
    """The state directory of a pipeline without ``state_dir`` (also for commands that have no pipeline,
    such as ``elkscan quarantine``): ELKSCAN_STATE_DIR, else the user's cache directory."""
    if os.environ.get("ELKSCAN_STATE_DIR"):
        return os.environ["ELKSCAN_STATE_DIR"]
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "elkscan")
    if os.environ.get("HOME"):
        return os.path.join(os.environ["HOME"], ".cache", "elkscan")
    # no HOME (a systemd unit without User=): never the working directory, which anyone may own
    if os.geteuid() == 0:
        return "/var/lib/elkscan"
    try:
        return os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache", "elkscan")
    except KeyError:
        raise ConfigError(f"no state directory: HOME is unset and uid {os.geteuid()} has no passwd entry",
                          "state_dir", "set state_dir in the pipeline or ELKSCAN_STATE_DIR") from None



@attrs.define
class Summary:
    """What a session did. Counters are updated under the session's lock."""

    files: int = 0  # regular files judged (each file once per pass, however many names it has)
    bytes: int = 0  # their size
    names: int = 0  # names of regular files given a verdict: a hard link, a symlink are names of their file
    clean: int = 0  # files every engine read whole and found nothing in, or an engine vouched for
    known_good: int = 0  # of those, files an engine vouched for (the engines after it did not read them)
    detections: int = 0
    detected_files: int = 0
    ignored: int = 0  # detections dropped because the pipeline ignores their signature
    errors: int = 0
    not_scanned: dict[str, int] = attrs.Factory(dict)  # reason -> files not judged for it
    unjudged: int = 0  # of those, files a user or a task named: the scan did not do what was asked
    abandoned: int = 0
    records: int = 0
    cached: int = 0  # engine verdicts taken from the verdict cache instead of a scan
    memory_tight: int = 0  # times RSS came near limits.memory
    elapsed: float = 0.0
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)



class Session(Scheduling, Isolation, Targets, Emission):
    """A pipeline's components, built and running. Components reach the session as ``self.session``."""

    def __init__(self, pipeline: Pipeline, pm: pluggy.PluginManager, *, report_clean: bool = False,
                 whole_up_to: int | None = None) -> None:
        self.pipeline = pipeline
        self.whole_up_to = whole_up_to
        self.pm = pm
        self.hook = pm.hook
        self.registry = Registry.from_plugins(pm)
        self.report_clean = report_clean
        self.summary = Summary()
        self.stopping = threading.Event()
        self.state_dir = self._state_dir()
        # on every record, and part of its id; the name gethostname() gives, without importing socket
        self.host = pipeline.host or os.uname().nodename
        self.governor = Governor(pipeline.limits, self.stopping)
        self.cache: VerdictCache | None = None
        #: A change journal a source offers periodic walks (the fanotify source's): elkscan_core.journal
        self.journal: Journal | None = None
        self._lock = threading.Lock()
        self._stopped_at: float | None = None
        self._started = 0.0
        self._shares = 0  # processes the walk is split into (shares.py); 0: worker threads
        self._init_scheduling()
        self._init_isolation()
        self._init_targets()
        self._init_emission()
        self._canaries: dict[int, Canary | None | str] = {}  # id(engine) -> the pipeline's canary for it
        self.canaries: Watch | None = None
        self.metrics: Metrics | None = None
        #: (component id, status) -> failed calls, for the metrics
        self.failures: collections.Counter[tuple[str, str]] = collections.Counter()
        self.sources: list[Source] = self._create_all(pipeline.sources)
        self.engines: list[Engine] = self._create_all(pipeline.engines)
        self.enrichers: list[Enricher] = self._create_all(pipeline.enrichers)
        self.sinks: list[Sink] = self._create_all(pipeline.sinks)
        self._labels = _labels((self.sources, self.engines, self.enrichers, self.sinks))

    # -- construction --------------------------------------------------------------------------

    def _state_dir(self) -> str:
        if self.pipeline.state_dir:
            return self.pipeline.resolve_path(self.pipeline.state_dir)
        return default_state_dir()

    def _create_all(self, specs: Iterable[ComponentSpec]) -> list:
        """The components of a section; an optional one whose plugin is not installed is left out."""
        components = []
        for spec in specs:
            if spec.optional and spec.use not in self.registry.ids(spec.kind):
                log.warning("%s %r is not available and is skipped: no installed plugin in 'plugins:' "
                            "provides it", spec.kind, spec.use)
                continue
            components.append(self.create(spec))
        return components

    def create(self, spec: ComponentSpec) -> Component:
        """Instantiate the component a pipeline entry names, with its validated config."""
        cls = self.registry.get(spec.kind, spec.use, f"{spec.where}.use")
        config = configure_component(cls, spec)
        if spec.kind == "engine" and self.whole_up_to is not None:
            config = _raise_size_limits(config, self.whole_up_to)
        component = cls(config, self)
        component.optional, component.where = spec.optional, spec.where
        if spec.kind == "engine":
            self._canaries[id(component)] = from_pipeline(spec.canary, self.resolve_path, spec.where)
        return component

    def canary_of(self, engine: Engine) -> Canary | None:
        """What ``engine`` must detect: the pipeline entry's ``canary:``, else the engine's own."""
        chosen = self._canaries.get(id(engine), "default")
        return engine.canary if chosen == "default" else chosen

    def label(self, component: Component) -> str:
        """The component's name in metrics and canary reports: its id, ``#n`` from the second of an id."""
        return self._labels.get(id(component), component.id)

    def counts(self) -> tuple[Summary, dict[tuple[str, str], int]]:
        """A consistent copy of the summary and of the failed calls by (component, status)."""
        with self._lock:
            summary = attrs.evolve(self.summary, not_scanned=dict(self.summary.not_scanned))
            return summary, dict(self.failures)

    @property
    def workers_alive(self) -> int:
        with self._lock:
            return len(self._workers)

    @property
    def healthy(self) -> bool:
        """False while an engine fails its canary or a sink has been given up as hung."""
        return (self.canaries is None or self.canaries.healthy) and not self._given_up

    def resolve_path(self, path: str) -> str:
        return self.pipeline.resolve_path(path)

    def find(self, kind: str, component_id: str) -> Component | None:
        """The running component of that kind and id, e.g. for a transport that controls a monitor."""
        group = {"source": self.sources, "engine": self.engines, "enricher": self.enrichers,
                 "sink": self.sinks}[kind]
        return next((c for c in group if c.id == component_id), None)

    # -- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        """Start every component in pipeline order; an optional one that cannot start is dropped.

        A failure closes what already started. A pipeline whose engines all failed to start is an error:
        nothing would be judged, and a scan that judges nothing is not a clean scan.
        """
        try:
            self.hook.elkscan_configure(pipeline=self.pipeline)
            self.governor.start()
            for group in (self.sinks, self.engines, self.enrichers, self.sources):
                for component in list(group):
                    self._start(component, group)
            if self.pipeline.engines and not self.engines:
                raise ComponentError(f"{self.pipeline.origin}: every engine failed to start (see the "
                                     "warnings above); nothing would be judged")
            self._shares = 0
            if self.pipeline.limits.shares:
                from .shares import wanted  # imported only when a pipeline asks for shares

                self._shares = wanted(self)
            if self._shares:  # each share's process places its engines and opens its own cache
                log.info("the walk is split into %d shares, each judged by a worker process of its own",
                         self._shares)
            else:
                self._place(self.engines, self.pipeline.limits.workers)
                self._open_cache()
            if self.pipeline.metrics is not None:
                from .metrics import Metrics  # prometheus-client is imported only when metrics are on

                self.metrics = Metrics(self, self.pipeline.metrics)
                self.metrics.start()
            self._describe()
            self.governor.check_baseline()
            if self.pipeline.canary_every and self.engines:  # there for the start hook; run() starts it
                self.canaries = Watch(self, self.pipeline.canary_every)
            self.hook.elkscan_session_start(session=self)
        except BaseException:
            self.close()
            raise

    def _start(self, component: Component, group: list) -> None:
        try:
            component.start()
        except Exception as exc:
            message = str(exc) if isinstance(exc, ComponentError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ComponentError):
                log.debug("%s %r failed to start", component.kind, component.id, exc_info=True)
            if component.optional:
                log.warning("%s %r is not available and is skipped: %s", component.kind, component.id, message)
                group.remove(component)
                self._close(component)  # whatever it acquired before failing
                return
            raise ComponentError(f"{component.where or component.id} ({component.id}): {message}") from exc

    def _describe(self) -> None:
        """Log what each started component uses (``-v``): which engines, rule sets, daemons."""
        if not log.isEnabledFor(logging.INFO):
            return
        for group in (self.sources, self.engines, self.enrichers, self.sinks):
            for component in group:
                try:
                    text = component.describe()
                except Exception as exc:
                    text = f"{component.id} (describe() failed: {type(exc).__name__}: {exc})"
                log.info("%s %s", component.kind, text)

    def _open_cache(self, share: tuple[int, int] | None = None) -> None:
        """The verdict cache, when ``limits.cache`` asks; each engine keyed by its id (#n if repeated).
        ``share``: (k, n) in the process of share k of n, which loads only the verdicts on its own files."""
        limits = self.pipeline.limits
        if not limits.cache:
            return
        from .cache import VerdictCache  # sqlite3 costs memory only when the cache is used

        path = (self.resolve_path(limits.cache_path) if limits.cache_path
                else os.path.join(self.state_dir, "verdicts.sqlite"))
        try:
            self.cache = VerdictCache(path, share=share)
        except OSError as exc:
            log.warning("verdict cache %s cannot be opened (%s); scanning without it", path, exc.strerror)
            return
        seen: collections.Counter[str] = collections.Counter()
        for engine in self.engines:
            self._cache_keys[id(engine)] = engine.id + (f"#{seen[engine.id]}" if seen[engine.id] else "")
            seen[engine.id] += 1

    def stop(self) -> None:
        """Ask for an orderly end: sources stop, queued targets are abandoned, sinks are flushed; calls
        still running after ``STOP_GRACE`` seconds are abandoned too."""
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self.stopping.set()
        self.summary.interrupted = True
        for source in self.sources:
            try:
                source.stop()
            except Exception:
                log.exception("source %r failed to stop", source.id)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.canaries is not None:
            self.canaries.close(STOP_GRACE)  # a check still running gives up its verdict, never its engine
        self._close_pools()
        for group in (self.sources, self.enrichers, self.engines, self.sinks):
            for component in group:
                self._close(component)
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        self.governor.close()
        self.summary.memory_tight = self.governor.memory_episodes

    @staticmethod
    def _close(component: Component) -> None:
        try:
            component.close()
        except Exception:
            log.exception("%s %r failed to close", component.kind, component.id)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Summary:
        """Start, run every source to its end (or until ``stop()``), drain, close; the summary."""
        self.start()
        self._started = time.monotonic()
        sink_threads: list[threading.Thread] = []
        shares = None
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL))  # restored when the run ends
        try:
            if self._shares:  # forked before the session starts threads of its own
                from .shares import Shares

                shares = Shares(self, self._shares)
                shares.start()
            sink_threads = [self._start_sink(sink) for sink in self.sinks]
            if self.canaries is not None:
                self.canaries.start()
            threading.Thread(target=self._watchdog, name="elkscan-watchdog", daemon=True).start()
            if shares is not None:
                shares.collect()
            else:
                self._drive(self.pipeline.limits.workers)
        finally:
            sys.setswitchinterval(switch)
            self.stopping.set()
            if shares is not None:
                shares.kill_all()
            self._abandon_queued()
            self._abandon_in_flight()
            self._finish_sinks(sink_threads)
            self.summary.elapsed = time.monotonic() - self._started
            self.close()
            self.hook.elkscan_session_finish(session=self, summary=self.summary)
        return self.summary

    def _drive(self, workers: int) -> None:
        """Run the sources on their threads and ``workers`` worker threads until all have ended."""
        for _ in range(workers):
            self._spawn_worker()
        source_threads = [threading.Thread(target=self._feed, args=(s,), name=f"source-{s.id}",
                                           daemon=True) for s in self.sources]
        for thread in source_threads:
            thread.start()
        for thread in source_threads:
            while thread.is_alive() and not self._grace_over():
                thread.join(0.2)
        self._all_fed()
        while any(t.is_alive() for t in list(self._workers)) and not self._grace_over():
            for thread in list(self._workers):
                thread.join(0.2)

    # -- a share's process (shares.py) ---------------------------------------------------------

    def share_process(self, k: int, n: int, deliver: Callable[[Record], None]) -> None:
        """Become the process of share ``k`` of ``n``, just forked: fresh locks and counts (a thread of
        the session may have held one at the fork), records to ``deliver``, a 1/n CPU share, engines on
        this process's own worker thread, a connection of its own to the verdict cache."""
        self._lock = threading.Lock()
        self._init_scheduling()
        self._init_isolation()
        self._init_targets()
        self._init_emission()
        self.summary = Summary()
        self.failures = collections.Counter()
        self.canaries = None  # (the metrics endpoint is the session's: this process never serves it)
        self.deliver = deliver  # type: ignore[method-assign]
        self.governor.split(n)
        for source in self.sources:
            source.take_share(k, n)
        self._place(self.engines, 1, processes=False)
        self._open_cache((k, n))

    def run_share(self) -> None:
        """Judge this process's share on one worker thread (the walk on its own), to its end."""
        self._started = time.monotonic()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL))
        try:
            threading.Thread(target=self._watchdog, name="elkscan-watchdog", daemon=True).start()
            self._drive(1)
        finally:
            sys.setswitchinterval(switch)
            self.stopping.set()
            self._abandon_queued()
            self._abandon_in_flight()
            if self.cache is not None:
                self.cache.close()
                self.cache = None
            self.summary.memory_tight = self.governor.memory_episodes

    def elapsed(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0

    def report(self, outcome: Outcome) -> None:
        """Count and log a failure that is not tied to a record (a source's unreadable directory)."""
        with self._lock:
            self.summary.errors += 1
        log.warning("%s", f"{outcome.target}: " * bool(outcome.target) + outcome.describe())
        self._notify_error(outcome)

    def _notify_error(self, outcome: Outcome) -> None:
        with self._lock:
            self.failures[outcome.component, outcome.status] += 1
        try:
            self.hook.elkscan_component_error(session=self, outcome=outcome)
        except Exception:
            log.exception("an elkscan_component_error hook failed")


def _labels(groups: Iterable[list[Component]]) -> dict[int, str]:
    """id(component) -> its id, with ``#n`` for the n-th repeat of an id within its kind."""
    labels = {}
    for group in groups:
        seen: collections.Counter[str] = collections.Counter()
        for component in group:
            labels[id(component)] = component.id + (f"#{seen[component.id]}" if seen[component.id] else "")
            seen[component.id] += 1
    return labels



#: Engine options that cap how much of a file is read.
SIZE_LIMITS = ("max_file_size", "max_scan_size")


def _raise_size_limits(config: Any, size: int) -> Any:
    """An engine's config whose size limits are at least ``size``: files a user names are read whole
    (``--max-size`` decides what is too large, and says so, instead of each engine silently)."""
    names = [f.name for f in attrs.fields(type(config))] if attrs.has(type(config)) else []
    raised = {name: max(getattr(config, name), size) for name in SIZE_LIMITS
              if name in names and getattr(config, name) is not None}
    return attrs.evolve(config, **raised) if raised else config



def build_session(pipeline: Pipeline, pm: pluggy.PluginManager, **kwargs: Any) -> Session:
    """A session for ``pipeline``; ConfigError names the pipeline file when a component's options fail."""
    try:
        return Session(pipeline, pm, **kwargs)
    except ConfigError as exc:
        where = exc.where if exc.where.startswith(pipeline.origin) else f"{pipeline.origin}: {exc.where}"
        raise ConfigError(exc.message, where, exc.hint) from None

