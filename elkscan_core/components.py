"""The four component protocols: sources find targets, engines judge them, enrichers add facts,
sinks deliver records.

A plugin subclasses one of these, gives it a short ``id`` and, when it takes options, an attrs
``Config`` class (validated from the pipeline's ``with:``), and registers the class from a
``elkscan_register_*`` hook. The runner creates one instance per pipeline entry and calls it from
worker threads inside its own isolation boundary, so a component never has to protect the scan
from itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs
from attrs import frozen

from .canary import EICAR, Canary
from .model import Detection, KnownGood, Outcome, Record, Target

if TYPE_CHECKING:
    from .governor import Governor
    from .journal import Journal
    from .pipeline import Pipeline


class SessionAPI(Protocol):
    """What a component may use of the session that built it (``elkscan_core.runner.Session``, which
    imports this module: the protocol keeps the import one way)."""

    pipeline: Pipeline
    state_dir: str  # the pipeline's state_dir, else ELKSCAN_STATE_DIR or the user's cache directory
    host: str
    stopping: threading.Event  # set when the session is ending
    governor: Governor
    sources: list[Source]
    engines: list[Engine]
    enrichers: list[Enricher]
    sinks: list[Sink]
    journal: Journal | None  # a change journal a source offers periodic walks (the fanotify source's)

    def resolve_path(self, path: str) -> str: ...

    def find(self, kind: str, component_id: str) -> Component | None: ...

    def label(self, component: Component) -> str: ...

    def known_clean(self, st: os.stat_result, path: str | None = None) -> bool: ...

    def known_clean_all(self, files: Sequence[tuple[os.stat_result, str | None]],
                        once: Any = None) -> list[bool]: ...

    def deliver(self, record: Record) -> None: ...

    def report(self, outcome: Outcome) -> None: ...

    def stop(self) -> None: ...


@frozen
class Measure:
    """One number a component reports for the metrics endpoint: ``elkscan_<name>`` (a ``counter``
    also gets ``_total``), labelled with the component (``source="fanotify"``) and ``labels``."""

    name: str
    value: float
    kind: str = "gauge"  # or "counter": a count that only grows while the session runs
    help: str = ""
    labels: Mapping[str, str] = attrs.field(factory=dict)


@frozen
class NoConfig:
    """The ``Config`` of a component that takes no options: any key under ``with:`` is an error."""


class Component:
    """What every component shares: an id, a config class, a session, and start/close."""

    kind: ClassVar[str] = ""
    #: The short id a pipeline names this component by (``use: yara``).
    id: ClassVar[str] = ""
    #: attrs class that validates ``with:``; an instance is passed to ``__init__``.
    Config: ClassVar[type] = NoConfig
    #: Seconds after which the runner gives up on one call and records a timeout (None: never).
    call_timeout: ClassVar[float | None] = 60.0
    #: Once started, it may be used in a process forked from the session (no connection, thread or
    #: open file of its own that two processes must not share): a walk may then be split into shares.
    forks: ClassVar[bool] = False
    #: Set by the session from the pipeline entry: may it be dropped when start() fails, and where is it.
    optional: bool = False
    where: str = ""

    def __init__(self, config: Any, session: SessionAPI) -> None:
        self.config = config
        self.session = session

    def check(self) -> None:
        """Called by ``elkscan validate``: check what ``start()`` would use (paths exist and are trusted,
        rules compile), so what validate accepts, scan runs; raise ComponentError. Start nothing that
        lasts (no daemon, no thread)."""

    def start(self) -> None:
        """Acquire resources (compile rules, reach a daemon); raise ComponentError to stop start-up."""

    def close(self) -> None:
        """Release resources; called once at the end of the session, even after errors."""

    def metrics(self) -> Iterable[Measure]:
        """What this component counts, read when the session's metrics are scraped (docs/metrics.md):
        return current values quickly, from another thread, without blocking."""
        return ()

    def describe(self) -> str:
        """One line on what this component uses, logged after ``start()`` (``-v``): for an engine its
        rule set (how many rules, their digest) or the daemon it asks. Default: its id."""
        return self.id

    def __repr__(self) -> str:
        return f"<{self.kind} {self.id!r}>"


class Source(Component):
    """Finds targets. ``targets()`` is iterated on the source's own thread: a walk returns when done,
    a monitor keeps yielding until ``stopping`` is set. It may also yield ``Record``s of its own
    (events, the end of a task), which go straight to the sinks."""

    kind = "source"
    #: True when the source asks ``session.known_clean(st, path, ...)`` itself before it opens a file:
    #: the runner does not ask again for its targets.
    asks_known_clean = False

    def __init__(self, config: Any, session: SessionAPI) -> None:
        super().__init__(config, session)
        self.stopping = threading.Event()

    def targets(self) -> Iterator[Target | Record]:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask ``targets()`` to return soon; monitors blocked in a read should wake themselves up."""
        self.stopping.set()


class Subject:
    """A target opened for judging: the runner opens each file once and every engine and enricher
    reads the same open file through ``fd`` (or by name through ``fd_path``), so a file replaced
    while it is being scanned cannot be misreported."""

    __slots__ = ("target", "fd", "stat")

    def __init__(self, target: Target, fd: int, stat: os.stat_result) -> None:
        self.target, self.fd, self.stat = target, fd, stat

    @property
    def path(self) -> str:
        return self.target.path

    @property
    def fd_path(self) -> str:
        """A path that opens this very file, for libraries that take a name and not a descriptor."""
        return f"/proc/self/fd/{self.fd}"

    @property
    def size(self) -> int:
        return self.stat.st_size

    def read(self, size: int, offset: int = 0) -> bytes:
        return os.pread(self.fd, size, offset)


class Engine(Component):
    """Judges a subject. ``scan()`` returns every detection (an empty list when clean) and raises on
    failure; the runner turns the exception into an error on the record. An engine that can vouch for a
    file returns ``KNOWN_GOOD`` for it: the engines after it do not read it (see ``vouches``)."""

    kind = "engine"
    # Capabilities: what the runner may do with the engine (docs/writing-plugins.md#engine-capabilities).
    #: Files larger than this are not given to this engine (None: no limit of its own); they end not
    #: scanned, never clean. (Issue 14's ``max_size`` capability: one name for one thing.)
    max_file_size: int | None = None
    #: ``scan()`` lets go of Python's GIL while it works (libyara, a daemon's socket): worker threads
    #: scan in parallel. False: the runner runs it in worker processes, each with its own GIL.
    releases_gil: ClassVar[bool] = True
    #: For an engine that holds the GIL: files smaller than this (bytes) are scanned on the worker thread
    #: all the same, where handing one to a worker process costs more than its scan (docs/performance.md).
    inline_below: ClassVar[int] = 0
    #: ``scan()`` may run on several threads at once. False: the runner never makes two calls at once.
    thread_safe: ClassVar[bool] = True
    #: ``scan()`` reads the file only through ``subject.fd`` (or ``fd_path``), so it can judge a descriptor
    #: passed to another process. An engine that holds the GIL but needs the name stays in threads.
    accepts_fd: ClassVar[bool] = True
    #: It looks inside archives (zip, gzip, ...): sources that skip archives by type give them to it.
    unpacks_archives: bool = False
    #: What it must detect when the session checks it is still detecting (``canary_every``): the EICAR
    #: test string by default; an engine whose rules cannot know EICAR names its own, or None to opt out.
    canary: Canary | None = EICAR
    #: It judges a file by its digests alone (``judge_digests``): digest targets, files of other hosts.
    judges_digests: ClassVar[bool] = False

    def scan(self, subject: Subject) -> Sequence[Detection] | KnownGood:
        raise NotImplementedError

    def judge_digests(self, digests: Mapping[str, str], size: int | None) -> Sequence[Detection] | KnownGood:
        """Judge a file known only by its digests (algorithm -> lowercase hex: ``md5``, ``sha1``,
        ``sha256``) and its size (None when unknown), as ``scan`` judges an open file; called only when
        ``judges_digests`` is set. Called in the same isolation as ``scan`` (timeouts, errors)."""
        raise NotImplementedError

    def version(self) -> str:
        """Engine and rule version (e.g. the rule digest); a change invalidates cached verdicts."""
        return ""

    def limits(self) -> str:
        """The engine's own limits, as they decide which files it leaves unread (``NotScanned``): such
        an outcome is cached under ``version()`` and this, so a change of either judges the file again.
        '' (the default, or limits it cannot know): never cached. Read per file: a stored string."""
        return ""

    @property
    def path_dependent(self) -> bool:
        """True when a verdict may depend on the file's name as well as its content (rules that read
        the path): the verdict cache then keys it by path, so it never covers another hard link."""
        return False

    @property
    def vouches(self) -> bool:
        """True when ``scan()`` may return ``KNOWN_GOOD``: the verdict cache then remembers those
        verdicts apart from plain clean ones, so a cached file stays known good."""
        return False

    def reload(self, rules: Mapping[str, Sequence[str]]) -> None:
        """Switch to new rules without a restart (an Elkeid 6050 database update).

        ``rules`` maps a rule kind (``"clamav"``, ``"yara"``, ``"hashes"``) to the files of that kind
        in a freshly extracted rule bundle; an engine takes the kinds it understands and ignores the
        rest, and rules without any of its kinds put it back on its configured rules (``{}`` undoes a
        bundle). Raise to keep the old rules; the caller reports the failure.
        """


class Enricher(Component):
    """Adds facts (hashes, process details) to a result. ``wants`` is ``"hits"`` (only results with
    detections, and targets that ask to be reported even when clean, such as an Elkeid task's files: the
    default, so expensive work runs only where it matters), ``"all"`` (every reported result) or
    ``"new"`` (results with detections, and every file judged afresh in this pass, clean ones included:
    a record for each; a file the verdict cache answers gets none). Enrichers read the open file: a
    target without content (a digest target) is never given to them."""

    kind = "enricher"
    wants: str = "hits"

    def enrich(self, subject: Subject, detections: Sequence[Detection]) -> Mapping[str, Any]:
        raise NotImplementedError


class Sink(Component):
    """Delivers records. ``write()`` is called from the sink's single writer thread, in order. A call
    that overruns ``call_timeout`` gets the sink given up: it receives nothing more, and shutdown does
    not wait for it."""

    kind = "sink"
    call_timeout = 30.0

    def write(self, record: Record) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Push buffered output out; called when the writer is idle, soon after a record whose target has a
        receipt (it is acked once every sink flushed it), and before ``close()``."""


KINDS: dict[str, type[Component]] = {"source": Source, "engine": Engine, "enricher": Enricher, "sink": Sink}
