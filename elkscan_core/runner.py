"""The session: builds components from a pipeline and runs them.

Sources feed one bounded work queue from their own threads; a pool of worker threads opens each target
once and runs the engines, then the enrichers; finished records go to each sink's single writer thread
through a bounded queue. A fast source waits, so memory stays flat.

Every (component x target) call is isolated: an exception, a result of the wrong type or a call that
overruns the component's ``call_timeout`` becomes an ``Outcome`` on the record and a counter, and the
scan goes on. A call that hangs is abandoned to its thread; the target continues on a fresh worker.

Every target ends as exactly one of: detected, clean (every engine read the whole file, or an engine
vouched for it as known good and the ones after it were not needed), not scanned (with the reason: a
source's policy, a file no engine takes that large, not a regular file) or error. Nothing that was not
judged is counted clean.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import os
import pwd
import queue
import re
import socket
import stat as stat_module
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from . import canary
from .canary import Canary
from .components import Component, Engine, Enricher, Sink, Source, Subject
from .errors import ComponentError, ConfigError, Stop
from .governor import Governor
from .model import KNOWN_GOOD, RECORD_FIELDS, Detection, KnownGood, Outcome, Record, Target, record_id
from .pipeline import ComponentSpec, Pipeline, configure_component
from .registry import Registry

if TYPE_CHECKING:
    from .cache import VerdictCache
    from .metrics import Metrics

log = logging.getLogger("elkscan")

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_DONE = object()
#: After a stop, how long in-flight calls and sinks get to finish before they are abandoned.
STOP_GRACE = 3.0
#: How long a sink call may take before the sink is given up (a sink may set its own ``call_timeout``).
SINK_TIMEOUT = 30.0
#: Added to an engine's cache key for its known-good verdicts (kept apart from its clean ones).
KNOWN_GOOD_KEY = "+known_good"


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

    files: int = 0  # regular files given to the engines
    bytes: int = 0
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


class _Work:
    """One target on its way through the stages: open, each engine, each enricher, emit."""

    __slots__ = ("target", "subject", "stage", "detections", "facts", "errors", "judged", "unread",
                 "known_good", "lock", "holders")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.subject: Subject | None = None
        self.stage = 0
        self.detections: list[Detection] = []
        self.facts: dict[str, Any] = {}
        self.errors: list[Outcome] = []
        self.judged: list[str] = []  # engines that read the whole file
        self.unread: list[str] = []  # why an engine did not
        self.known_good = ""  # the engine that vouched for the file: the ones after it are not needed
        self.lock = threading.Lock()
        self.holders = 1  # the worker that owns the record; +1 for each abandoned call still running

    def release(self) -> None:
        """Drop one holder; the last one closes the target's descriptor."""
        with self.lock:
            self.holders -= 1
            last = self.holders == 0
        if last:
            fd = self.subject.fd if self.subject else self.target.fd
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class _Call:
    """An in-flight component call, watched for its deadline."""

    __slots__ = ("work", "stage", "component", "deadline", "started", "abandoned", "thread")

    def __init__(self, work: _Work, component: Component, started: float) -> None:
        self.work, self.stage, self.component = work, work.stage, component
        self.thread = threading.current_thread()
        self.started = started
        self.deadline = started + component.call_timeout if component.call_timeout else None
        self.abandoned = False


class _Abandoned(Exception):
    """The watchdog gave this call up; the worker thread that made it retires."""


class Session:
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
        self.host = socket.gethostname()  # part of every record's id
        self.governor = Governor(pipeline.limits, self.stopping)
        self.cache: VerdictCache | None = None
        self._cache_keys: dict[int, str] = {}
        self._lock = threading.Lock()
        self._work: queue.Queue = queue.Queue(maxsize=pipeline.limits.queue)
        self._fed = threading.Event()  # every source has ended: workers finish when the queue is empty
        self._stopped_at: float | None = None
        self._ignored = _signature_matcher(pipeline.ignore_signatures)
        self._resumed: collections.deque[_Work] = collections.deque()
        self._calls: dict[int, _Call] = {}
        self._workers: list[threading.Thread] = []
        self._started = 0.0
        self._sink_queues: dict[int, queue.Queue] = {}  # id(sink) -> its writer's queue
        self._sink_calls: dict[int, tuple[Sink, float]] = {}  # id(sink) -> (sink, when its call began)
        self._given_up: set[int] = set()  # id(sink) of sinks given up as hung
        self._canaries: dict[int, Canary | None | str] = {}  # id(engine) -> the pipeline's canary for it
        self.canaries: canary.Watch | None = None
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
            self._canaries[id(component)] = canary.from_pipeline(spec.canary, self.resolve_path, spec.where)
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
    def queue_depth(self) -> int:
        """Targets waiting for a worker."""
        return self._work.qsize()

    @property
    def workers_alive(self) -> int:
        with self._lock:
            return len(self._workers)

    def given_up(self, sink: Sink) -> bool:
        """True once the sink hung past its ``call_timeout``: it gets no more records."""
        return id(sink) in self._given_up

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
            self._open_cache()
            if self.pipeline.metrics is not None:
                from .metrics import Metrics  # prometheus-client is imported only when metrics are on

                self.metrics = Metrics(self, self.pipeline.metrics)
                self.metrics.start()
            self._describe()
            self.governor.check_baseline()
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

    def _open_cache(self) -> None:
        """The verdict cache, when ``limits.cache`` asks; each engine keyed by its id (#n if repeated)."""
        limits = self.pipeline.limits
        if not limits.cache:
            return
        from .cache import VerdictCache  # sqlite3 costs memory only when the cache is used

        path = (self.resolve_path(limits.cache_path) if limits.cache_path
                else os.path.join(self.state_dir, "verdicts.sqlite"))
        try:
            self.cache = VerdictCache(path)
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
        try:
            sink_threads = [self._start_sink(sink) for sink in self.sinks]
            if self.pipeline.canary_every and self.engines:
                self.canaries = canary.Watch(self, self.pipeline.canary_every)
                self.canaries.start()
            for _ in range(self.pipeline.limits.workers):
                self._spawn_worker()
            threading.Thread(target=self._watchdog, name="elkscan-watchdog", daemon=True).start()
            source_threads = [threading.Thread(target=self._feed, args=(s,), name=f"source-{s.id}",
                                               daemon=True) for s in self.sources]
            for thread in source_threads:
                thread.start()
            for thread in source_threads:
                while thread.is_alive() and not self._grace_over():
                    thread.join(0.2)
            self._fed.set()
            while any(t.is_alive() for t in list(self._workers)) and not self._grace_over():
                for thread in list(self._workers):
                    thread.join(0.2)
        finally:
            self.stopping.set()
            self._abandon_queued()
            self._abandon_in_flight()
            self._finish_sinks(sink_threads)
            self.summary.elapsed = time.monotonic() - self._started
            self.close()
            self.hook.elkscan_session_finish(session=self, summary=self.summary)
        return self.summary

    def _grace_over(self) -> bool:
        """True once a stop was asked for ``STOP_GRACE`` seconds ago: what still runs is abandoned."""
        return self._stopped_at is not None and time.monotonic() - self._stopped_at > STOP_GRACE

    def _abandon_in_flight(self) -> None:
        """Count the targets of calls that did not end by the stop's deadline (their threads are left)."""
        with self._lock:
            works = {id(call.work) for call in self._calls.values()} | {id(w) for w in self._resumed}
            for call in self._calls.values():
                call.abandoned = True  # its thread drops the target when the call returns
            self._resumed.clear()
            self.summary.abandoned += len(works)

    def elapsed(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0

    # -- sources -------------------------------------------------------------------------------

    def _feed(self, source: Source) -> None:
        try:
            for item in source.targets():
                if isinstance(item, Target) and item.job is not None:
                    item.job.add()  # before anything can finish it
                if self.stopping.is_set():
                    if isinstance(item, Target):
                        self._discard(item)
                    break
                if isinstance(item, Record):
                    self.deliver(item)
                elif isinstance(item, Target):
                    if item.skip:
                        work = _Work(item)
                        self._not_scanned(work, item.skip)
                        work.release()
                    elif not self._known_clean(item):
                        self._put(item)
                else:
                    self.report(Outcome(source.id, "garbage", message=f"yielded {type(item).__name__}"))
        except Stop:
            self.stop()
        except Exception as exc:
            log.debug("source %r failed", source.id, exc_info=True)
            self.report(Outcome(source.id, "failed", message=f"{type(exc).__name__}: {exc}"))

    def _known_clean(self, target: Target) -> bool:
        """Finish here, in the source's thread, a target that every engine found clean as it is now (the
        verdict cache) and that nobody asked to see reported: no trip through the queue and a worker."""
        if self.cache is None or target.fd is None or target.report_clean:
            return False
        try:
            st = os.fstat(target.fd)
        except OSError:
            return False
        if not self.known_clean(st, target.path):
            return False
        os.close(target.fd)
        self._finish_job(target)
        return True

    def known_clean(self, st: os.stat_result, path: str | None = None) -> bool:
        """True, and counted as scanned, when every engine already found the file that ``st`` describes
        clean as it is now (the verdict cache). A source that has the file's ``lstat`` may ask before it
        even opens the file; a periodic scan of an unchanged tree then costs a walk and a look-up.
        Without the target's ``path``, an engine whose verdicts depend on it never answers from here."""
        cache = self.cache
        if cache is None or self.report_clean or not stat_module.S_ISREG(st.st_mode):
            return False
        hits, vouched = 0, False
        for engine in self.engines:
            if engine.max_file_size is not None and st.st_size > engine.max_file_size:
                return False  # not judged by that engine: reported as not scanned, never as clean
            key, version = self._verdict_key(engine)
            name = path if engine.path_dependent else None
            if not version:
                return False
            vouched = engine.vouches and cache.is_clean(key + KNOWN_GOOD_KEY, version, st, name)
            if not (vouched or cache.is_clean(key, version, st, name)):
                return False
            hits += 1
            if vouched:
                break  # the engines after it were not needed
        self.governor.pace()  # the CPU share holds for this thread's work too
        with self._lock:
            self.summary.files += 1
            self.summary.clean += 1
            self.summary.known_good += vouched
            self.summary.bytes += st.st_size
            self.summary.cached += hits
        return True

    def _put(self, item: Target) -> None:
        while self.governor.feeding_paused and self._work.qsize() and not self.stopping.is_set():
            self.stopping.wait(0.05)  # memory is tight: the queue drains before it takes more
        while not self.stopping.is_set():
            try:
                self._work.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        self._discard(item)

    def _discard(self, target: Target) -> None:
        with self._lock:
            self.summary.abandoned += 1
        if target.fd is not None:
            os.close(target.fd)
        if target.job is not None:
            target.job.finish(error=True)

    def _abandon_queued(self) -> None:
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Target):
                self._discard(item)

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

    # -- workers -------------------------------------------------------------------------------

    def _spawn_worker(self) -> None:
        thread = threading.Thread(target=self._worker, name="worker", daemon=True)
        with self._lock:
            self._workers.append(thread)
        thread.start()

    def _next(self) -> Any:
        while True:
            try:
                return self._resumed.popleft()
            except IndexError:
                pass
            if self.stopping.is_set() and self._fed.is_set():
                return _DONE
            if not self.governor.may_take(self._rank):
                time.sleep(0.1)  # parked (memory, pressure, fewer workers): take nothing, hold nothing
                continue
            try:
                return self._work.get(timeout=0.1)
            except queue.Empty:
                if self._fed.is_set():
                    return _DONE

    def _rank(self) -> int:
        """This worker's place among the live workers (the governor parks the ones it does not want)."""
        with self._lock:
            try:
                return self._workers.index(threading.current_thread())
            except ValueError:
                return 0

    def _worker(self) -> None:
        try:
            self._work_loop()
        finally:
            with self._lock:  # a finished worker no longer holds a rank
                if threading.current_thread() in self._workers:
                    self._workers.remove(threading.current_thread())

    def _work_loop(self) -> None:
        while True:
            item = self._next()
            if item is not _DONE:
                self.governor.pace()
            if item is _DONE:
                while self._resumed or self._calls_in_flight():
                    try:
                        self._advance(self._resumed.popleft())
                    except IndexError:
                        time.sleep(0.05)
                    except _Abandoned:
                        return
                return
            work = item if isinstance(item, _Work) else _Work(item)
            try:
                self._advance(work)
            except _Abandoned:
                return  # a replacement worker took over

    def _calls_in_flight(self) -> bool:
        with self._lock:
            return bool(self._calls or self._resumed)

    def _advance(self, work: _Work) -> None:
        """Run the remaining stages of one target: open, engines, enrichers, then deliver."""
        target = work.target
        if work.stage == 0:
            if self.stopping.is_set() or (target.job is not None and target.job.cancelled):
                work.release()
                with self._lock:
                    self.summary.abandoned += 1
                self._finish_job(target)
                return
            if not self._open(work):
                return
            work.stage = 1
        engines = self.engines
        if not engines:  # a monitor-only pipeline may run without engines, but judges nothing
            work.errors.append(Outcome("session", "failed", message="no engine in the pipeline to judge it",
                                       target=target.path))
        while work.stage <= len(engines):
            engine = engines[work.stage - 1]
            limit = engine.max_file_size
            if limit is not None and work.subject.size > limit:
                work.unread.append(f"above {engine.id}'s max_file_size")
            else:
                verdict = self._judge(work, engine)
                if verdict is not None:
                    work.judged.append(engine.id)
                    work.detections.extend(self._heeded(work, verdict))
                    if isinstance(verdict, KnownGood):
                        work.known_good = engine.id
                        work.stage = len(engines)  # the engines after it are not needed
            work.stage += 1
        record_wanted = bool(work.detections) or target.report_clean or self.report_clean
        base = len(engines) + 1
        while work.stage < base + len(self.enrichers):
            enricher = self.enrichers[work.stage - base]
            if record_wanted and (work.detections or target.report_clean or enricher.wants == "all"):
                result = self._call(work, enricher, enricher.enrich, work.subject, tuple(work.detections))
                taken = sorted(set(result or ()) & set(work.facts))
                if taken:  # two enrichers, one name: neither silently wins
                    self._fail(work, Outcome(enricher.id, "garbage", message=f"set fact(s) {', '.join(taken)} "
                                             "that an earlier enricher set; the earlier values are kept",
                                             target=target.path))
                if result is not None:
                    work.facts.update({k: v for k, v in result.items() if k not in work.facts})
            work.stage += 1
        if work.unread and not (work.detections or work.known_good):
            self._not_scanned(work, "; ".join(work.unread))
            work.release()
            return
        self._complete(work)

    def _judge(self, work: _Work, engine: Engine) -> tuple[Detection, ...] | None:
        """One engine's verdict on the file: from the verdict cache when it holds one (``KNOWN_GOOD`` or
        clean), else from a scan, kept in the cache when clean; None when the call failed (the error is
        on the record)."""
        subject, cache = work.subject, self.cache
        key, version = self._verdict_key(engine)
        path = subject.path if engine.path_dependent else None
        if version:
            vouched = engine.vouches and cache.is_clean(key + KNOWN_GOOD_KEY, version, subject.stat, path)
            if vouched or cache.is_clean(key, version, subject.stat, path):
                with self._lock:
                    self.summary.cached += 1
                return KNOWN_GOOD if vouched else ()
        claim = cache.claim(subject.fd) if version else None  # before the engine reads
        verdict = self._call(work, engine, engine.scan, subject)
        if claim is not None and verdict is not None and not verdict:
            good = isinstance(verdict, KnownGood)
            cache.record_clean(key + KNOWN_GOOD_KEY if good else key, version, claim, path)
        return verdict

    def _heeded(self, work: _Work, detections: tuple[Detection, ...]) -> tuple[Detection, ...]:
        """The detections whose signature the pipeline does not ignore; the others are counted (and
        logged with -v), so none disappears silently."""
        if self._ignored is None:
            return detections
        kept = []
        for detection in detections:
            if not self._ignored(detection.signature):
                kept.append(detection)
                continue
            with self._lock:
                self.summary.ignored += 1
            log.info("%s: %s detection %s ignored (ignore_signatures)", work.target.path, detection.engine,
                     detection.signature)
        return tuple(kept)

    def _verdict_key(self, engine: Engine) -> tuple[str, str]:
        """Where an engine's verdicts are cached: its key and current version ('' when not cached)."""
        if self.cache is None:
            return engine.id, ""
        return self._cache_keys.get(id(engine), engine.id), self._cache_version(engine)

    def _cache_version(self, engine: Engine) -> str:
        """The engine's version, read per file (a reload changes it); '' when it has none: not cached."""
        try:
            version = engine.version()
        except Exception:
            log.debug("engine %r: version() failed; its verdicts are not cached", engine.id, exc_info=True)
            return ""
        return version if isinstance(version, str) else ""

    def _open(self, work: _Work) -> bool:
        target = work.target
        fd = target.fd
        try:
            if fd is None:
                fd = os.open(target.path, _OPEN_FLAGS)
            st = os.fstat(fd)
        except OSError as exc:
            if fd is not None and target.fd is None:
                os.close(fd)
            if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                self._not_scanned(work, "vanished")  # between discovery and scan
            else:
                work.errors.append(Outcome("open", "failed", message=exc.strerror or str(exc),
                                           target=target.path))
                self._emit(work)
            work.release()
            return False
        work.subject = Subject(target, fd, st)
        if not stat_module.S_ISREG(st.st_mode):
            self._not_scanned(work, "not a regular file")
            work.release()
            return False
        return True

    def _call(self, work: _Work, component: Component, fn: Callable, *args: Any) -> Any:
        """One isolated component call: returns its checked result, or None after recording why not."""
        now = time.monotonic()
        call = _Call(work, component, now)
        ident = threading.get_ident()
        with self._lock:
            self._calls[ident] = call
        status, message, result = "ok", "", None
        try:
            result = fn(*args)
        except (Stop, KeyboardInterrupt):
            raise
        except Exception as exc:
            status, message = "failed", f"{type(exc).__name__}: {exc}"
            log.debug("%s %r failed on %s", component.kind, component.id, work.target.path, exc_info=True)
        with self._lock:
            self._calls.pop(ident, None)
            abandoned = call.abandoned
        if abandoned:
            work.release()
            raise _Abandoned
        if self.metrics is not None and isinstance(component, Engine):
            self.metrics.observe_scan(self.label(component), time.monotonic() - now)
        if status == "ok":
            result, problem = _check_result(component, result)
            if problem:
                status, message = "garbage", problem
        if status != "ok":
            self._fail(work, Outcome(component.id, status, time.monotonic() - now, message,
                                     work.target.path))
            return None
        return result

    def _fail(self, work: _Work, outcome: Outcome) -> None:
        with work.lock:
            work.errors.append(outcome)
        self._notify_error(outcome)

    def _watchdog(self) -> None:
        """Give up on calls past their deadline: the target resumes on a fresh worker."""
        while not (self.stopping.is_set() and not self._calls):
            time.sleep(0.05)
            self._check_sinks()
            now = time.monotonic()
            overdue, timeouts = [], []
            with self._lock:
                for call in self._calls.values():
                    if call.deadline is not None and now > call.deadline:
                        overdue.append(call)
                for call in overdue:
                    call.abandoned = True
                    self._calls = {k: v for k, v in self._calls.items() if v is not call}
                    self._workers.remove(call.thread)  # retired: the run no longer waits for it
                    outcome = Outcome(call.component.id, "timeout", now - call.started,
                                      f"no answer after {call.component.call_timeout:g}s",
                                      call.work.target.path)
                    with call.work.lock:
                        call.work.holders += 1
                        call.work.stage = call.stage + 1
                        call.work.errors.append(outcome)
                    # Queued before the call leaves _calls' view, so no worker retires in between.
                    self._resumed.append(call.work)
                    timeouts.append(outcome)
            for call, outcome in zip(overdue, timeouts):
                work = call.work
                self._notify_error(outcome)
                log.warning("%s %r hangs on %s; continuing without it", call.component.kind,
                            call.component.id, work.target.path)
                self._spawn_worker()

    def _complete(self, work: _Work) -> None:
        subject = work.subject
        with self._lock:
            self.summary.files += 1
            self.summary.bytes += subject.size if subject else 0
            self.summary.clean += not (work.detections or work.errors)
            self.summary.known_good += bool(work.known_good) and not (work.detections or work.errors)
        self._emit(work)
        work.release()

    def _not_scanned(self, work: _Work, reason: str) -> None:
        """A target that ends without being judged: counted by reason, reported, never clean."""
        target = work.target
        with self._lock:
            self.summary.not_scanned[reason] = self.summary.not_scanned.get(reason, 0) + 1
            self.summary.unjudged += target.required
        self._emit(work, skipped=reason)

    def _emit(self, work: _Work, skipped: str = "") -> None:
        target = work.target
        detections = tuple(work.detections)
        with self._lock:
            if detections:
                self.summary.detections += len(detections)
                self.summary.detected_files += 1
            if work.errors:
                self.summary.errors += 1
        if detections or work.errors or target.report_clean or self.report_clean or (skipped and target.required):
            facts = {**target.extra, **work.facts} if target.extra else work.facts
            self.deliver(Record(kind=target.kind, target=target, detections=detections, facts=facts,
                                errors=tuple(work.errors), token=target.job.token if target.job else "",
                                judged_by=tuple(work.judged), skipped=skipped, known_good=work.known_good))
        self._finish_job(target, len(detections), bool(work.errors) or bool(skipped and target.required))

    @staticmethod
    def _finish_job(target: Target, detections: int = 0, error: bool = False) -> None:
        if target.job is not None:
            target.job.finish(detections=detections, error=error)

    # -- sinks ---------------------------------------------------------------------------------

    def deliver(self, record: Record) -> None:
        """Give the record its id, and hand it to every sink's writer (waits while a sink's queue is full,
        until the stop's grace is over); a sink given up as hung gets nothing more."""
        if not record.id:
            versions = {d.engine: self._rule_version(d.engine) for d in record.detections}
            record = attrs.evolve(record, id=record_id(record, self.host, versions))
        with self._lock:
            self.summary.records += 1
        for key, q in list(self._sink_queues.items()):
            while key in self._sink_queues:
                try:
                    q.put(record, timeout=0.2)
                    break
                except queue.Full:
                    if self._grace_over():
                        break

    def _rule_version(self, engine_id: str) -> str:
        """The version of the rules of the engine(s) with this id, for record ids ('' when unknown)."""
        versions = []
        for engine in self.engines:
            if engine.id == engine_id:
                try:
                    versions.append(str(engine.version()))
                except Exception:
                    log.debug("engine %r: version() failed", engine_id, exc_info=True)
        return "|".join(versions)

    def _start_sink(self, sink: Sink) -> threading.Thread:
        q: queue.Queue = queue.Queue(maxsize=1024)
        self._sink_queues[id(sink)] = q
        thread = threading.Thread(target=self._write, args=(sink, q), name=f"sink-{sink.id}", daemon=True)
        thread.start()
        return thread

    def _write(self, sink: Sink, q: queue.Queue) -> None:
        """The sink's writer thread: records in order; a closed output stops the session."""
        closed = False
        while True:
            try:
                record = q.get(timeout=0.2)
            except queue.Empty:
                record = None
            if not closed:
                self._sink_calls[id(sink)] = (sink, time.monotonic())
                try:
                    if record is None or record is _DONE:
                        sink.flush()
                    else:
                        sink.write(record)
                except (Stop, BrokenPipeError) as exc:
                    log.warning("sink %r is closed (%s); stopping the session", sink.id,
                                type(exc).__name__)
                    closed = True
                    self.stop()
                except Exception as exc:
                    self.report(Outcome(sink.id, "failed", message=f"{type(exc).__name__}: {exc}"))
                finally:
                    self._sink_calls.pop(id(sink), None)
            if record is _DONE:
                return

    def _check_sinks(self) -> None:
        """Give up a sink whose call overran its ``call_timeout``: it gets no more records, and the
        session never waits for it again."""
        now = time.monotonic()
        for key, (sink, started) in list(self._sink_calls.items()):
            timeout = sink.call_timeout or SINK_TIMEOUT
            if now - started > timeout and self._sink_queues.pop(key, None) is not None:
                self._given_up.add(key)
                log.warning("sink %r hangs (no answer after %gs); its records are dropped from now on",
                            sink.id, timeout)
                self.report(Outcome(sink.id, "timeout", now - started, f"no answer after {timeout:g}s"))

    def _finish_sinks(self, threads: list[threading.Thread]) -> None:
        """Let each sink write what it was given and flush; a hung sink, or any sink still busy when a
        stop's grace is over, is left behind."""
        for key, q in list(self._sink_queues.items()):
            while key in self._sink_queues and not self._grace_over():
                try:
                    q.put(_DONE, timeout=0.2)
                    break
                except queue.Full:
                    self._check_sinks()
        for sink, thread in zip(self.sinks, threads):
            while thread.is_alive() and id(sink) in self._sink_queues:
                thread.join(0.1)
                self._check_sinks()
                if self._grace_over():
                    log.warning("sink %r did not finish within %gs of the stop; leaving it", sink.id,
                                STOP_GRACE)
                    break


def _labels(groups: Iterable[list[Component]]) -> dict[int, str]:
    """id(component) -> its id, with ``#n`` for the n-th repeat of an id within its kind."""
    labels = {}
    for group in groups:
        seen: collections.Counter[str] = collections.Counter()
        for component in group:
            labels[id(component)] = component.id + (f"#{seen[component.id]}" if seen[component.id] else "")
            seen[component.id] += 1
    return labels


def _check_result(component: Component, result: Any) -> tuple[Any, str]:
    """Validate what a component returned against its protocol; garbage is named, not trusted."""
    if result is None:
        expected = "a list of Detection ([] when clean)" if isinstance(component, Engine) else "a mapping"
        return None, f"returned None, expected {expected}"
    if isinstance(component, Engine):
        if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
            return None, f"returned {type(result).__name__}, expected a list of Detection"
        if isinstance(result, KnownGood):
            return result, ""
        items = tuple(result)
        bad = next((x for x in items if not isinstance(x, Detection)), None)
        if bad is not None:
            return None, f"returned a {type(bad).__name__} among its detections, expected Detection"
        return items, ""
    if isinstance(component, Enricher):
        if not isinstance(result, Mapping) or not all(isinstance(k, str) for k in result):
            return None, f"returned {type(result).__name__}, expected a mapping of field names to values"
        taken = sorted(RECORD_FIELDS.intersection(result))
        if taken:
            return None, f"tried to set the record's own field(s) {', '.join(taken)}; rename its facts"
        odd = next((k for k, v in result.items() if not _is_fact(v)), None)
        if odd is not None:
            return None, (f"returned a {type(result[odd]).__name__} for {odd!r}; a fact is a string, bytes, a "
                          "number, true/false, None, or a list or mapping of those")
        return result, ""
    return result, ""


def _signature_matcher(patterns: Iterable[str]) -> Callable[[str], Any] | None:
    """A test for signatures matching any of ``patterns`` (exact names; ``*``, ``?`` and ``[...]`` as in
    a shell), or None when there are none."""
    patterns = tuple(patterns)
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


#: Engine options that cap how much of a file is read.
SIZE_LIMITS = ("max_file_size", "max_scan_size")


def _raise_size_limits(config: Any, size: int) -> Any:
    """An engine's config whose size limits are at least ``size``: files a user names are read whole
    (``--max-size`` decides what is too large, and says so, instead of each engine silently)."""
    names = [f.name for f in attrs.fields(type(config))] if attrs.has(type(config)) else []
    raised = {name: max(getattr(config, name), size) for name in SIZE_LIMITS
              if name in names and getattr(config, name) is not None}
    return attrs.evolve(config, **raised) if raised else config


def _is_fact(value: Any, depth: int = 0) -> bool:
    """A value every sink can render as it is: JSON's types (and bytes, kept reversibly)."""
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return True
    if depth < 8 and isinstance(value, (list, tuple)):
        return all(_is_fact(v, depth + 1) for v in value)
    if depth < 8 and isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_fact(v, depth + 1) for k, v in value.items())
    return False


def build_session(pipeline: Pipeline, pm: pluggy.PluginManager, **kwargs: Any) -> Session:
    """A session for ``pipeline``; ConfigError names the pipeline file when a component's options fail."""
    try:
        return Session(pipeline, pm, **kwargs)
    except ConfigError as exc:
        where = exc.where if exc.where.startswith(pipeline.origin) else f"{pipeline.origin}: {exc.where}"
        raise ConfigError(exc.message, where, exc.hint) from None
