"""The value objects that flow through a pipeline.

Everything here is a frozen attrs class: sources make ``Target``s, engines return ``Detection``s,
enrichers add facts, and the runner hands ``Record``s to sinks. Names are neutral; the Elkeid
transport maps them to data types and field names (see docs/records.md).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from attrs import field, frozen

from .builtin_hashes import sha256
from .text import raw_bytes

if TYPE_CHECKING:
    from .once import Pass

#: Record kinds the core and the bundled plugins produce.
FINDING = "finding"          # a scanned file or process executable (hit, or clean when asked for)
TASK_DONE = "task_done"      # a job (e.g. an Elkeid task) ended: fields status, msg
FILE_EVENT = "file_event"    # a file was written in a monitored directory
RANSOM_EVENT = "ransom_event"  # a decoy file was written; the writer's executable was scanned
LOG = "log"                  # an error log line meant for a remote operator

#: What became of a judged target (``Record.status``): only "clean" says every engine read it all.
DETECTED, CLEAN, NOT_SCANNED, ERROR = "detected", "clean", "not_scanned", "error"

#: Record fields that belong to the core: an enricher's facts may not overwrite them.
RECORD_FIELDS = frozenset({
    "id", "host", "verifier", "kind", "time", "origin", "path", "path_bytes", "exe", "static_file", "status",
    "reason", "judged_by", "known_good", "host_record_id",
    "engine", "signature", "types", "class", "name", "hit_data", "detections", "error", "token",
})


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


def _tuple(value: Iterable[Any]) -> tuple[Any, ...]:
    """``tuple`` as a converter: attrs reads a builtin's signature by tokenizing its text, which costs
    more at import than all of this module's classes together (a Python function's is read directly)."""
    return tuple(value)


@frozen
class Job:
    """A group of targets whose end someone waits for (an Elkeid task, a CLI scan of named paths).

    The runner counts each target of the job when its record is finished, so the job's source can
    wait for the last one before it reports the job's end. Cancelling drops the targets not started.
    """

    token: str = ""
    fields: Mapping[str, Any] = field(factory=dict, converter=_frozen_mapping)
    _state: dict = field(factory=lambda: {"pending": 0, "cancelled": False, "detections": 0,
                                           "scanned": 0, "errors": 0}, eq=False, repr=False)
    _cond: threading.Condition = field(factory=threading.Condition, eq=False, repr=False)

    def add(self, count: int = 1) -> None:
        with self._cond:
            self._state["pending"] += count

    def finish(self, detections: int = 0, error: bool = False) -> None:
        with self._cond:
            self._state["pending"] -= 1
            self._state["scanned"] += 1
            self._state["detections"] += detections
            self._state["errors"] += int(error)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every added target is finished; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._state["pending"] <= 0, timeout)

    def cancel(self) -> None:
        with self._cond:
            self._state["cancelled"] = True

    @property
    def cancelled(self) -> bool:
        return self._state["cancelled"]

    @property
    def counts(self) -> Mapping[str, int]:
        with self._cond:
            return {k: v for k, v in self._state.items() if k != "cancelled"}


class Receipt:
    """How a target that came from a message is settled: ``ack()`` once its record reached every sink (or
    no record was wanted for it), else ``nak()``. The session calls exactly one of them, exactly once, from
    any thread; both must be quick and must not raise (a source hands the real work to its own thread).

    The first of ``ack()``/``nak()`` settles it and calls the source's function; any later call does
    nothing, so two parts of the session that race to settle it (a sink given up, a stop) cannot settle
    it twice. ``settled`` is ``""`` until then, else ``"ack"`` or ``"nak"``.
    """

    __slots__ = ("_ack", "_nak", "_lock", "settled")

    def __init__(self, ack: Callable[[], None], nak: Callable[[], None]) -> None:
        self._ack, self._nak = ack, nak
        self._lock = threading.Lock()
        self.settled = ""

    def ack(self) -> bool:
        """Acknowledge (the first settlement only); True when this call settled it."""
        return self._settle("ack", self._ack)

    def nak(self) -> bool:
        """Ask for the message again (the first settlement only); True when this call settled it."""
        return self._settle("nak", self._nak)

    def _settle(self, how: str, call: Callable[[], None]) -> bool:
        with self._lock:
            if self.settled:
                return False
            self.settled = how
        call()
        return True

    def __repr__(self) -> str:
        return f"Receipt({self.settled or 'unsettled'})"


@frozen
class Target:
    """Something to judge: a file, reached by ``path`` or by an already open ``fd``.

    ``fd``, when given, belongs to the runner once the target is yielded: it scans through it (so a file
    swapped after discovery is not misjudged) and closes it. ``stat`` is ``os.fstat(fd)`` when the source
    took it as it opened the file (the session then does not take it again). ``pid`` names the process whose executable
    this is; ``kind`` is the record kind its result becomes; ``report_clean`` asks for a record even when
    nothing is detected; ``extra`` carries fields a source wants on the record (Elkeid task keys).

    ``skip`` is set by a source that decided not to judge the file: the reason, short and categorical
    ("excluded", "above max_size"), counted and reported, never passed off as clean. ``required`` says a
    user or a server named it (or what holds it): ending not judged then makes the scan an error.
    ``once`` is the walk's pass (once.py): a file met again under another name in it is not read again.
    ``receipt``, from a source that consumes messages, is settled once the target's end is delivered.

    ``digests`` (algorithm -> lowercase hex: ``md5``, ``sha1``, ``sha256``) make a digest target: a file
    known only by its digests and ``size`` (a record another host sent, ``fleet.digest_target``). The
    session never opens its ``path``: only engines that judge digests judge it. ``host`` names the host
    the file is on when it is not this one (its records carry it); such a target is never opened either.
    """

    path: str
    origin: str = "path"
    fd: int | None = None
    stat: os.stat_result | None = field(default=None, eq=False, repr=False)
    pid: int | None = None
    size: int | None = None
    job: Job | None = field(default=None, eq=False)
    kind: str = FINDING
    report_clean: bool = False
    extra: Mapping[str, Any] = field(factory=dict, converter=_frozen_mapping)
    skip: str = ""
    required: bool = False
    once: Pass | None = field(default=None, eq=False, repr=False)
    receipt: Receipt | None = field(default=None, eq=False, repr=False)
    digests: Mapping[str, str] = field(factory=dict, converter=_frozen_mapping)
    host: str = ""

    @property
    def has_content(self) -> bool:
        """False for a file that is not here to read (a digest target, a file of another host)."""
        return not (self.digests or self.host)


def split_signature(signature: str) -> tuple[str, str, str]:
    """Split an engine's signature name into Elkeid's ``types``, ``class`` and ``name``.

    A trailing ``.UNOFFICIAL`` is dropped; a YARA rule (ClamAV shows it as ``YARA.<rule>``) splits on
    ``_``, anything else on ``.``, into at most three parts. Fewer than three parts: types and class are
    empty and name is the whole name. ``Unix.Trojan.Mirai-9941418-0`` -> Unix / Trojan / Mirai-9941418-0.
    """
    name = signature.removesuffix(".UNOFFICIAL")
    if name.startswith("YARA."):
        name = name[len("YARA."):]
        parts = name.split("_", 2)
    else:
        parts = name.split(".", 2)
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    return "", "", name


@frozen
class Detection:
    """One signature or rule that matched a target, as an engine reports it.

    ``hit_data`` holds ``"<string id>,<offset>,<length>"`` items (YARA string matches); ``meta`` holds
    whatever else the engine knows (rule tags and metadata, clamd's raw reply).
    """

    engine: str
    signature: str
    types: str = ""
    class_: str = ""
    name: str = ""
    hit_data: tuple[str, ...] = field(default=(), converter=_tuple)
    meta: Mapping[str, Any] = field(factory=dict, converter=_frozen_mapping)

    @classmethod
    def from_signature(cls, engine: str, signature: str, *, yara_rule: bool = False,
                       hit_data: tuple[str, ...] = (), meta: Mapping[str, Any] | None = None) -> Detection:
        """Build a detection whose types/class/name follow Elkeid's naming rule."""
        types, class_, name = split_signature(f"YARA.{signature}" if yara_rule else signature)
        return cls(engine=engine, signature=signature, types=types, class_=class_, name=name,
                   hit_data=hit_data, meta=meta or {})


class KnownGood(tuple):
    """An engine's verdict that vouches for a file (a package file whose digest matches): no detections,
    and the engines after it in the pipeline need not read the file; the record is clean, with
    ``known_good`` naming the engine. An empty sequence, so code that only collects detections reads it
    as clean. Engines return ``KNOWN_GOOD``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "KNOWN_GOOD"


KNOWN_GOOD = KnownGood()


class NotScanned(Exception):
    """Raised by an engine's ``scan()`` that did not read the whole file because of a limit of its own
    (clamd's ``MaxScanSize``): the file ends not scanned with ``reason`` (short and categorical: it is
    counted by it), never clean, never an error. ``deterministic``: the same bytes, ``version()`` and
    ``limits()`` always give it (not a time limit), so the verdict cache may remember it."""

    def __init__(self, reason: str, deterministic: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.deterministic = reason, deterministic


@frozen
class FileFacts:
    """Facts about a file, named as Elkeid names them (see docs/elkeid-protocol.md section 4)."""

    exe_size: int
    exe_hash: str
    md5_hash: str
    create_at: int
    modify_at: int
    sha256: str | None = None

    def as_fields(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


#: Value Elkeid sends for a process fact that cannot be read.
UNREADABLE = -3


@frozen
class ProcessFacts:
    """Facts about a process, named as Elkeid names them (see docs/elkeid-protocol.md section 4)."""

    pid: int
    ppid: int = UNREADABLE
    pgid: int = UNREADABLE
    tgid: int = UNREADABLE
    argv: str = str(UNREADABLE)
    comm: str = str(UNREADABLE)
    sessionid: int = UNREADABLE
    uid: int = UNREADABLE
    pns: int = UNREADABLE
    docker_id: str = ""

    def as_fields(self) -> dict[str, Any]:
        return attrs.asdict(self)


@frozen
class Outcome:
    """How one component call on one target went: ``ok``, ``skipped``, ``failed``, ``timeout`` or
    ``garbage`` (it returned something that is not what its protocol promises), with elapsed time."""

    component: str
    status: str
    elapsed: float = 0.0
    message: str = ""
    target: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")

    def describe(self) -> str:
        return f"{self.component}: {self.status}" + (f": {self.message}" if self.message else "")


@frozen
class Record:
    """What a sink receives: a judged target, or an event or status a source reports on its own.

    ``facts`` are enrichers' (and events') fields by their Elkeid names; ``errors`` are the component
    calls that did not succeed on this target; ``token`` ties the record to a remote task.
    ``judged_by`` names the engines that read the whole file; ``skipped`` says why it was not judged
    (by a source, or by an engine that does not take files that large); ``known_good`` names the engine
    that vouched for the file, so the engines after it did not read it.
    """

    kind: str
    target: Target | None = None
    detections: tuple[Detection, ...] = field(default=(), converter=_tuple)
    facts: Mapping[str, Any] = field(factory=dict, converter=_frozen_mapping)
    errors: tuple[Outcome, ...] = field(default=(), converter=_tuple)
    token: str = ""
    timestamp: float = field(factory=time.time)
    judged_by: tuple[str, ...] = field(default=(), converter=_tuple)
    skipped: str = ""
    known_good: str = ""
    id: str = ""  # set by the session as it delivers the record: record_id()

    @property
    def detected(self) -> bool:
        return bool(self.detections)

    @property
    def status(self) -> str:
        """detected, error, not_scanned or clean, in that order of precedence."""
        if self.detections:
            return DETECTED
        if self.errors:
            return ERROR
        return NOT_SCANNED if self.skipped else CLEAN

    @property
    def error(self) -> str:
        """All failures on this record, one string ('' when none)."""
        return "; ".join(o.describe() for o in self.errors)


def record_id(record: Record, host: str, versions: Mapping[str, str]) -> str:
    """The record's stable identity, 32 hex digits: the same finding on the same host has the same id
    whenever it is found again, so a consumer can drop a redelivery and a sink can hold back a repeat.

    A scan result hashes the host name (the target's ``host`` for a file of another host), the kind, the path's exact bytes, the status and its reason,
    each detection's engine, signature and that engine's rule version (``versions``: engine id ->
    ``Engine.version()``), each failed component and how it failed, and the task token; never the time,
    a pid or enrichers' facts. An event (no target) is one occurrence: its time and facts count too.
    """
    target = record.target
    if target is not None and target.host:
        host = target.host  # a file of another host: the id is its host's
    parts: list[Any] = ["elkscan-record-1", host, record.kind, record.token]
    if target is not None:
        parts += [raw_bytes(target.path).hex(), record.status, record.skipped,
                  sorted([d.engine, d.signature, versions.get(d.engine, "")] for d in record.detections),
                  sorted([o.component, o.status] for o in record.errors)]
    else:
        parts += [repr(record.timestamp), json.dumps({str(k): v for k, v in record.facts.items()}, sort_keys=True, default=repr)]
    text = json.dumps(parts, ensure_ascii=True, default=repr)
    return sha256(text.encode("ascii")).hexdigest()[:32]
