"""The per-target state machine: open the file once, each engine (or its cached verdict), each enricher,
then one end.

Every target ends as exactly one of: detected, clean (every engine read the whole file, or an engine
vouched for it as known good and the ones after it were not needed), not scanned (with the reason: a
source's policy, a file no engine takes that large, not a regular file) or error. Nothing that was not
judged is counted clean.

A target without content (a digest target: a file of another host known by its digests) is never opened:
the engines that judge digests judge it, in the same isolation; the others do not apply to it (they are
not in its ``judged_by``), and neither the verdict cache, the walk's pass nor the enrichers (they read the
open file) take part. Its facts travel in ``Target.extra``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat as stat_module
import threading
from collections.abc import Callable, Iterable, Sequence
from itertools import compress
from typing import TYPE_CHECKING, Any

from .components import Engine, Subject
from .model import KNOWN_GOOD, Detection, KnownGood, NotScanned, Outcome, Record, Target
from .once import CLEAN, Pass

if TYPE_CHECKING:
    from .cache import Claim

log = logging.getLogger("elkscan")

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
#: Added to an engine's cache key for its known-good verdicts (kept apart from its clean ones).
KNOWN_GOOD_KEY = "+known_good"
#: ``Work.share`` before the target's pass was asked whether another name of the file was judged.
_ASK = -1


class Work:
    """One target on its way through the stages: open, each engine, each enricher, emit."""

    __slots__ = ("target", "subject", "stage", "detections", "facts", "errors", "judged", "unread",
                 "known_good", "share", "unshared", "vouched", "fresh", "wanted", "claim", "lock", "holders")

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
        #: None: this name is judged by every engine; else another name of the file was judged in this pass
        #: and its verdict (a once.py code) stands for the engines that do not read the name
        self.share: int | None = _ASK if target.once is not None and target.has_content else None
        self.unshared = False  # some verdict on it is not to be shared with its other names
        self.vouched = CLEAN  # the stage of the name-independent engine that vouched for it, if one did
        self.fresh = False  # an engine read it in this pass (not every verdict came from the verdict cache)
        self.wanted = False  # it gets a record even when clean (an enricher wants every new file)
        #: the verdict cache's claim on the file, taken before the first engine read it: it holds for
        #: every engine that reads after it (None: no verdict on it may be stored)
        self.claim: Claim | None | bool = False
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


class Targets:
    """The session's part that takes one target through its stages (a mixin of ``runner.Session``):
    owns ``_cache_keys`` (each engine's key in the verdict cache) and ``_ignored`` (the pipeline's
    ignore_signatures)."""

    def _init_targets(self) -> None:
        self._cache_keys: dict[int, str] = {}
        self._waiting: dict[int, Work] = {}  # names waiting for another name of their file to be judged
        self._ignored = _signature_matcher(self.pipeline.ignore_signatures)

    def known_clean(self, st: os.stat_result, path: str | None = None, once: Pass | None = None) -> bool:
        """True, and counted as scanned, when every engine already found the file that ``st`` describes
        clean as it is now (the verdict cache). A source that has the file's ``lstat`` may ask before it
        even opens the file; a periodic scan of an unchanged tree then costs a walk and a look-up.
        Without the target's ``path``, an engine whose verdicts depend on it never answers from here.
        ``once``: the source's pass, where a file met again under another name is counted once."""
        return self.known_clean_all(((st, path),), once)[0]

    def known_clean_all(self, files: Sequence[tuple[os.stat_result, str | None]],
                        once: Pass | None = None) -> list[bool]:
        """``known_clean`` for several files (a directory's, as a walk lists them): each engine's version
        and properties are asked once, and the summary is counted under one lock."""
        cache = self.cache
        if cache is None or self.report_clean or not files or not self.engines:
            return [False] * len(files)  # no engine: nothing was judged, so nothing is known clean
        plan, vouches, cap = [], False, None
        for index, engine in enumerate(self.engines):
            key, version = self._verdict_key(engine)
            if not version:
                return [False] * len(files)
            limit = engine.max_file_size
            vouches = vouches or engine.vouches
            cap = limit if cap is None or (limit is not None and limit < cap) else cap
            plan.append((limit, key, version, engine.path_dependent, key + KNOWN_GOOD_KEY if engine.vouches else "",
                         index))
        if not vouches:
            return self._known_clean_by_engine(files, plan, cap, once)
        is_clean, may_know, regular = cache.is_clean, cache.may_know, stat_module.S_ISREG
        known, counted, names, known_good, size, hits = [], 0, 0, 0, 0, 0
        for st, path in files:
            if not (regular(st.st_mode) and may_know(st)):
                known.append(False)
                continue
            found, vouched, code = 0, False, CLEAN
            for limit, key, version, by_name, good_key, index in plan:
                if limit is not None and st.st_size > limit:
                    break  # not judged by that engine: reported as not scanned, never as clean
                name = path if by_name else None
                vouched = bool(good_key) and is_clean(good_key, version, st, name)
                if not (vouched or is_clean(key, version, st, name)):
                    break
                found += 1
                if vouched:
                    code = None if by_name else index + 1
                    break  # the engines after it were not needed
            if not (found == len(plan) or vouched):
                known.append(False)
                continue
            known.append(True)
            first = once is None or code is None or once.remember(st, code)
            counted += first
            names += 1
            known_good += vouched
            size += st.st_size if first else 0
            hits += found
        if names:
            self.count_clean(counted, names, size, hits, known_good)
        return known

    def _known_clean_by_engine(self, files: Sequence[tuple[os.stat_result, str | None]], plan: list[tuple],
                               cap: int | None, once: Pass | None) -> list[bool]:
        """``known_clean_all`` when no engine vouches: the files still in the running are asked of each
        engine in turn, all at once (``VerdictCache.clean_all``): a file is known clean when every engine
        reads it (its size is within ``cap``, the least ``max_file_size``) and found it clean as it is now."""
        regular = stat_module.S_ISREG
        if cap is None:
            left = [file for file in files if regular(file[0].st_mode)]
        else:  # not judged by an engine: reported as not scanned, never as clean
            left = [file for file in files if regular(file[0].st_mode) and file[0].st_size <= cap]
        clean_all = self.cache.clean_all
        for _, key, version, by_name, _, _ in plan:
            if by_name:  # without its name, a file's verdict from such an engine is not known here
                left = [file for file in left if file[1] is not None]
                found = clean_all(key, version, [st for st, _ in left], [path for _, path in left])
            else:
                found = clean_all(key, version, [st for st, _ in left])
            left = list(compress(left, found))
            if not left:
                return [False] * len(files)
        if len(left) == len(files):
            known = [True] * len(files)
        else:
            chosen = set(map(id, left))
            known = [id(file) in chosen for file in files]
        stats = [st for st, _ in left]
        counted, size = (len(stats), sum(st.st_size for st in stats)) if once is None else once.remember_all(stats)
        self.count_clean(counted, len(stats), size, len(stats) * len(plan))
        return known

    def count_clean(self, files: int, names: int, size: int, hits: int, known_good: int = 0) -> None:
        """Count names known clean without a scan (the verdict cache's ``hits``)."""
        self.governor.pace()  # the CPU share holds for the source's thread's work too
        with self._lock:
            self.summary.files += files
            self.summary.names += names
            self.summary.clean += names
            self.summary.known_good += known_good
            self.summary.bytes += size
            self.summary.cached += hits

    def clean_signature(self) -> tuple | None:
        """What the verdicts of a cached pass depend on, to be compared with a later pass's: each engine's
        cache key, version and whether it reads the name; None when some verdict is not cached, or is
        vouched for (known good: counted apart)."""
        if self.cache is None or self.report_clean or not self.engines:
            return None
        parts = []
        for engine in self.engines:
            key, version = self._verdict_key(engine)
            if not version or engine.vouches:
                return None
            parts.append((key, version, engine.path_dependent, engine.max_file_size))
        return tuple(parts)

    def _advance(self, work: Work) -> None:
        """Run the remaining stages of one target: open, engines, enrichers, then deliver."""
        target = work.target
        if work.stage == 0:
            if self.stopping.is_set() or (target.job is not None and target.job.cancelled):
                work.release()
                with self._lock:
                    self.summary.abandoned += 1
                self._end(target, False)
                self._finish_job(target)
                return
            if target.has_content:
                if not self._open(work):
                    return
            elif not (target.digests and any(engine.judges_digests for engine in self.engines)):
                self._not_scanned(work, "no engine judges digests" if target.digests else "no digests")
                work.release()
                return
            work.stage = 1
        if work.share == _ASK and not self._claim(work):
            return  # another name of the file is being judged: this one resumes when it is
        engines = self.engines
        if not engines:  # a monitor-only pipeline may run without engines, but judges nothing
            work.errors.append(Outcome("session", "failed", message="no engine in the pipeline to judge it",
                                       target=target.path))
        while work.stage <= len(engines):
            engine = engines[work.stage - 1]
            limit = engine.max_file_size
            if work.subject is None:  # no content here: judged by its digests, by the engines that can
                if engine.judges_digests:
                    self._verdict(work, engine, self._call(work, engine, engine.judge_digests,
                                                           dict(target.digests), target.size))
            elif work.share is not None and not engine.path_dependent:
                work.judged.append(engine.id)  # judged under the file's other name, in this pass
                if work.share == work.stage:
                    work.known_good = engine.id
                    work.stage = len(engines)
            elif limit is not None and work.subject.size > limit:
                work.unread.append(f"above {engine.id}'s max_file_size")
                work.unshared = True
            else:
                verdict = self._judge(work, engine)
                work.unshared |= verdict is None or (bool(verdict) and not engine.path_dependent)
                self._verdict(work, engine, verdict)
            work.stage += 1
        if work.share is None and work.target.once is not None and work.subject is not None:
            self._publish(work)
        base = len(engines) + 1
        if work.stage == base:  # once, even when a call given up resumes the target
            work.wanted = work.fresh and any(enricher.wants == "new" for enricher in self.enrichers)
        record_wanted = bool(work.detections) or target.report_clean or self.report_clean or work.wanted
        while work.stage < base + len(self.enrichers):
            enricher = self.enrichers[work.stage - base]
            if record_wanted and work.subject is not None and (
                    work.detections or target.report_clean or enricher.wants == "all"
                    or (enricher.wants == "new" and work.fresh)):
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

    def _verdict(self, work: Work, engine: Engine,
                 verdict: tuple[Detection, ...] | KnownGood | NotScanned | None) -> None:
        """Take one engine's verdict (None: its call failed, the error is on the record already)."""
        if verdict is None:
            return
        if isinstance(verdict, NotScanned):  # a limit of the engine's: it did not read the whole file
            work.unread.append(verdict.reason)
            work.unshared = True
            return
        work.judged.append(engine.id)
        work.detections.extend(self._heeded(work, verdict))
        if isinstance(verdict, KnownGood):
            work.known_good = engine.id
            work.unshared |= engine.path_dependent  # the engines after it did not judge it
            work.vouched = work.stage
            work.stage = len(self.engines)  # the engines after it are not needed

    def _claim(self, work: Work) -> bool:
        """Ask the target's pass about its file: judge it (the first name), take the verdict another name
        had, or wait for the name being judged now (False: it holds the work until then)."""
        with self._lock:  # before the name being judged can hand it back (publish)
            decision, code = work.target.once.claim(work.subject.stat, work)
            if decision == "wait":
                self._waiting[id(work)] = work
                return False
        work.share = code
        return True

    def _publish(self, work: Work) -> None:
        """The verdict of a file's first name, for its other names: shared when every engine that does not
        read the name found it clean or vouched for it (a known-good verdict from one that reads the name
        stops the others, so it is not shared); the names that waited go on, on any worker."""
        code = None if work.unshared or work.errors else work.vouched
        waiting = work.target.once.publish(work.subject.stat, code)
        with self._lock:
            for other in waiting:
                self._waiting.pop(id(other), None)
            self._resumed.extend(waiting)

    def _judge(self, work: Work, engine: Engine) -> tuple[Detection, ...] | NotScanned | None:
        """One engine's verdict on the file: from the verdict cache when it holds one (``KNOWN_GOOD``,
        clean, or not scanned for a limit of the engine's), else from a scan, kept in the cache when
        clean or left unread by such a limit; None when the call failed (the error is on the record)."""
        subject, cache = work.subject, self.cache
        key, version = self._verdict_key(engine)
        path = subject.path if engine.path_dependent else None
        limits = self._cache_limits(engine) if version else ""
        claim = None
        if version:
            if cache.may_know(subject.stat):  # a first scan asks no key of a file nothing was recorded on
                vouched = engine.vouches and cache.is_clean(key + KNOWN_GOOD_KEY, version, subject.stat, path)
                clean = vouched or cache.is_clean(key, version, subject.stat, path)
                unread = "" if clean else cache.not_scanned(key, version, limits, subject.stat, path)
                if clean or unread:
                    with self._lock:
                        self.summary.cached += 1
                    return NotScanned(unread, True) if unread else KNOWN_GOOD if vouched else ()
            if work.claim is False:  # before the first engine reads
                work.claim = cache.claim(subject.fd, subject.stat)
            claim = work.claim
        work.fresh = True
        pool = self._pools.get(id(engine))
        verdict = self._call(work, engine, engine.scan if pool is None else pool.scan, subject)
        if claim is not None and isinstance(verdict, NotScanned):
            if verdict.deterministic and limits:
                cache.record_not_scanned(key, version, limits, claim, path, verdict.reason)
        elif claim is not None and verdict is not None and not verdict:
            good = isinstance(verdict, KnownGood)
            cache.record_clean(key + KNOWN_GOOD_KEY if good else key, version, claim, path)
        return verdict

    def _heeded(self, work: Work, detections: tuple[Detection, ...]) -> tuple[Detection, ...]:
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

    @staticmethod
    def _cache_limits(engine: Engine) -> str:
        """The engine's limits, read per file like its version; '' when it has none: what it leaves
        unread is not cached."""
        try:
            limits = engine.limits()
        except Exception:
            log.debug("engine %r: limits() failed; what it leaves unread is not cached", engine.id,
                      exc_info=True)
            return ""
        return limits if isinstance(limits, str) else ""

    def _open(self, work: Work) -> bool:
        target = work.target
        fd = target.fd
        try:
            if fd is None:
                fd = os.open(target.path, _OPEN_FLAGS)
            st = target.stat if target.fd is not None and target.stat is not None else os.fstat(fd)
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

    def _complete(self, work: Work) -> None:
        subject = work.subject
        with self._lock:
            self.summary.files += work.share is None
            self.summary.bytes += subject.size if subject and work.share is None else 0
            self.summary.names += 1
            self.summary.clean += not (work.detections or work.errors)
            self.summary.known_good += bool(work.known_good) and not (work.detections or work.errors)
        self._emit(work)
        work.release()

    def _not_scanned(self, work: Work, reason: str) -> None:
        """A target that ends without being judged: counted by reason, reported, never clean."""
        target = work.target
        with self._lock:
            self.summary.not_scanned[reason] = self.summary.not_scanned.get(reason, 0) + 1
            self.summary.unjudged += target.required
        self._emit(work, skipped=reason)

    def _emit(self, work: Work, skipped: str = "") -> None:
        target = work.target
        detections = tuple(work.detections)
        with self._lock:
            if detections:
                self.summary.detections += len(detections)
                self.summary.detected_files += 1
            if work.errors:
                self.summary.errors += 1
        if detections or work.errors or work.wanted or target.report_clean or self.report_clean or \
                (skipped and target.required):
            facts = {**target.extra, **work.facts} if target.extra else work.facts
            self.deliver(Record(kind=target.kind, target=target, detections=detections, facts=facts,
                                errors=tuple(work.errors), token=target.job.token if target.job else "",
                                judged_by=tuple(work.judged), skipped=skipped, known_good=work.known_good))
        elif target.receipt is not None:
            self._end(target, True)  # no record wanted: nothing to wait for
        self._finish_job(target, len(detections), bool(work.errors) or bool(skipped and target.required))

    @staticmethod
    def _finish_job(target: Target, detections: int = 0, error: bool = False) -> None:
        if target.job is not None:
            target.job.finish(detections=detections, error=error)


def _signature_matcher(patterns: Iterable[str]) -> Callable[[str], Any] | None:
    """A test for signatures matching any of ``patterns`` (exact names; ``*``, ``?`` and ``[...]`` as in
    a shell), or None when there are none."""
    patterns = tuple(patterns)
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match

