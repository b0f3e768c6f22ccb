"""Vet YARA rule files before they are used (docs/rules.md#vetting).

1. Every file compiles alone, as the yara engine compiles it (its own namespace, the externals the
   engine fills in). One that does not, or that ``include``s other files, is set aside whole with the
   compiler's message; the rest of its source goes on.
2. Each rule's cost is measured: yara-python cannot profile one rule, so rules are compiled in groups
   and each group scans the profiling sample (files of the baseline, held in memory) with the thread's
   CPU time measured, less what an empty rule set costs. A group within the budget clears every rule in
   it; a group over it is split in two, down to single rules, which are measured twice more, each time
   against an empty set measured just before (the lower difference counts), and set aside when still
   over the budget or when yara's timeout stops them.
3. The rules left scan every baseline file (with the external variables the engine gives that file);
   a rule that matches one is a false positive and is set aside, naming the file and its package.
4. A rule that needs a rule set aside (mentions it, or it is a ``global`` rule of its file) is set
   aside with it. The files are written again without what was set aside and compiled together.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import attrs
from attrs import frozen

from elkscan_core.units import MiB

from . import yarasrc
from .baseline import BenignFile
from .config import Vetting

log = logging.getLogger("elkscan.rules")

COMPILE, INCLUDE, TOO_LARGE, SLOW, TIMEOUT, FALSE_POSITIVE, DEPENDS = (
    "does not compile", "includes other files", "too large", "over the cost budget", "timed out",
    "false positive", "needs a rule set aside")
_INCLUDE = re.compile(rb'^[ \t]*include[ \t]+"', re.M)
_EMPTY = b"rule elkscan_empty_rule { condition: false }"


@frozen
class RuleFile:
    """A candidate rule file: its source, its path relative to the source's tree, and where it is."""

    source: str
    relative: str
    path: str


@frozen
class SetAside:
    """What vetting left out and why: ``rule`` is "" when the whole file was."""

    source: str
    file: str
    rule: str
    reason: str
    detail: str

    def public(self) -> dict:
        return attrs.asdict(self)


@attrs.define
class Vetted:
    """What vetting kept (files written under ``directory``), what it set aside, and its numbers."""

    directory: str
    files: list[str] = attrs.field(factory=list)
    kept: int = 0
    set_aside: list[SetAside] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)
    seconds: dict[str, float] = attrs.field(factory=dict)
    sample_files: int = 0
    sample_bytes: int = 0
    baseline_files: int = 0


@attrs.define
class _File:
    candidate: RuleFile
    data: bytes
    split: yarasrc.Source | None
    names: list[str]
    out: set[str] = attrs.field(factory=set)  # rules set aside

    @property
    def namespace(self) -> str:
        return f"{self.candidate.source}/{self.candidate.relative}"


def externals_for(path: str, data: bytes, owner: str = "root") -> dict[str, str]:
    """The external variables the yara engine fills in for a file (plugins/yara_backend)."""
    from elkscan_yara_backend.engine import file_type

    name = os.path.basename(path)
    return {"filename": name, "filepath": path, "extension": os.path.splitext(name)[1].lstrip(".").lower(),
            "filetype": file_type(data[:8]), "owner": owner}


def _owner(path: str) -> str:
    try:
        return pwd.getpwuid(os.lstat(path).st_uid).pw_name
    except (OSError, KeyError):
        return ""


class Vetter:
    def __init__(self, settings: Vetting, baseline: Sequence[BenignFile], directory: str,
                 max_file_size: int, say: Callable[[str], None] = log.info) -> None:
        import yara

        from elkscan_yara_backend.ruleset import EXTERNALS, describe_syntax_error

        self.yara, self.describe = yara, describe_syntax_error
        self.empty_externals = {name: "" for name in EXTERNALS}
        self.settings, self.baseline, self.directory = settings, baseline, directory
        self.max_file_size, self.say = max_file_size, say
        self.result = Vetted(directory=directory, baseline_files=len(baseline))

    # -- 1. compile -----------------------------------------------------------------------------

    def run(self, candidates: Sequence[RuleFile]) -> Vetted:
        started = time.monotonic()
        files = [f for f in (self._load(c) for c in candidates) if f is not None]
        self.result.seconds["compile"] = round(time.monotonic() - started, 2)
        self.say(f"compiled {len(candidates)} files: {len(files)} compile, "
                 f"{sum(len(f.names) for f in files)} rules")
        started = time.monotonic()
        self._profile(files)
        self.result.seconds["profile"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        self._false_positives(files)
        self.result.seconds["baseline"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        self._write(files)
        self.result.seconds["write"] = round(time.monotonic() - started, 2)
        return self.result

    def _aside(self, file: RuleFile, rule: str, reason: str, detail: str) -> None:
        self.result.set_aside.append(SetAside(file.source, file.relative, rule, reason, detail))

    def _load(self, candidate: RuleFile) -> _File | None:
        try:
            with open(candidate.path, "rb") as handle:
                data = handle.read(self.max_file_size + 1)
        except OSError as exc:
            self._aside(candidate, "", COMPILE, f"cannot be read: {exc.strerror}")
            return None
        if len(data) > self.max_file_size:
            self._aside(candidate, "", TOO_LARGE, f"larger than limits.max_file_size ({self.max_file_size})")
            return None
        if _INCLUDE.search(data):
            self._aside(candidate, "", INCLUDE, "a vetted file must stand alone: a bundle holds no paths, "
                                                "and an include could read any file of this host")
            return None
        try:
            rules = self.yara.compile(filepath=candidate.path, externals=self.empty_externals)
        except self.yara.Error as exc:
            message = self.describe(exc).replace(candidate.path, candidate.relative)
            self._aside(candidate, "", COMPILE, message)
            return None
        for warning in getattr(rules, "warnings", ()):  # "<path>(<line>): <message>"
            line, message = "", warning
            if warning.startswith(candidate.path + "("):
                line, _, message = warning[len(candidate.path) + 1:].partition("): ")
            self.result.warnings.append(f"{candidate.source}/{candidate.relative}"
                                        f"{', line ' + line if line else ''}: {message}")
        names = [rule.identifier for rule in rules]
        split = yarasrc.split(data)
        if split is not None and [rule.name for rule in split.rules] != names:
            split = None
        if split is None:
            self.result.warnings.append(f"{candidate.source}/{candidate.relative}: its rules could not be told "
                                        "apart; it is vetted whole")
        return _File(candidate, data, split, names)

    # -- 2. cost --------------------------------------------------------------------------------

    def _compile(self, sources: dict[str, bytes]):
        """Compile rule texts, one namespace each, from files: yara-python takes sources only as str,
        and a rule's bytes (a Latin-1 string literal) must be the ones the bundle will hold."""
        scratch = tempfile.mkdtemp(prefix="compile-", dir=os.path.dirname(self.directory))
        try:
            paths = {}
            for index, (namespace, text) in enumerate(sources.items()):
                paths[namespace] = os.path.join(scratch, f"{index}.yar")
                fd = os.open(paths[namespace], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(text)
            return self.yara.compile(filepaths=paths, externals=self.empty_externals)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _sources(self, units: Sequence[tuple[_File, str | None]]) -> dict[str, bytes]:
        by_file: dict[int, tuple[_File, list[str | None]]] = {}
        for file, name in units:
            by_file.setdefault(id(file), (file, []))[1].append(name)
        sources = {}
        for file, names in by_file.values():
            text = file.data if None in names or file.split is None else file.split.text(file.data, names)
            sources[file.namespace] = text
        return sources

    def _sample(self) -> list[tuple[bytes, dict[str, str]]]:
        sample, total = [], 0
        for item in self.baseline:
            if total >= self.settings.profile_bytes:
                break
            data = item.read()
            if data is None:
                continue
            data = data[:self.settings.profile_bytes - total]
            sample.append((data, externals_for(item.path, data, _owner(item.path))))
            total += len(data)
        self.result.sample_files, self.result.sample_bytes = len(sample), total
        return sample

    def _measure(self, sources: dict[str, str], sample) -> float:
        """CPU seconds the rules take over the sample, or infinity when yara's timeout stops them."""
        rules = self._compile(sources)
        timeout = max(1, round(self.settings.timeout))
        started = time.thread_time()
        try:
            for data, externals in sample:
                rules.match(data=data, externals=externals, timeout=timeout)
        except self.yara.TimeoutError:
            return float("inf")
        return time.thread_time() - started

    def _profile(self, files: list[_File]) -> None:
        sample = self._sample()
        if not sample or not files:
            return
        mib = max(self.result.sample_bytes / MiB, 1 / 16)
        empty = min(self._measure({"e": _EMPTY}, sample) for _ in range(3))
        budget = self.settings.budget

        def cost(units) -> float:
            return (self._measure(self._sources(units), sample) - empty) / mib

        def confirmed(units) -> float:
            """Twice, each time against an empty set measured just before it: a busy host slows both
            alike, and one slow measurement does not set a rule aside."""
            best = float("inf")
            for _ in range(2):
                now = self._measure({"e": _EMPTY}, sample)
                best = min(best, (self._measure(self._sources(units), sample) - now) / mib)
            return best

        units: list[tuple[_File, str | None]] = []
        for file in files:
            units += [(file, name) for name in file.names] if file.split is not None else [(file, None)]
        pending, measured = [units], 0
        while pending:
            group = pending.pop()
            seconds = cost(group)
            measured += 1
            if seconds <= budget:
                continue
            if len(group) > 1:
                middle = len(group) // 2
                pending += [group[middle:], group[:middle]]
                continue
            if seconds != float("inf"):
                seconds = confirmed(group)
                if seconds <= budget:
                    continue
            file, name = group[0]
            if seconds == float("inf"):
                detail = f"yara's timeout ({self.settings.timeout:g}s) stopped it on the profiling sample"
                reason = TIMEOUT
            else:
                detail = (f"{seconds * 1000:.1f} ms CPU per MiB scanned, budget {budget * 1000:g} ms "
                          f"(sample: {self.result.sample_files} files, {self.result.sample_bytes / MiB:.1f} MiB)")
                reason = SLOW
            self._set_aside_rule(file, name, reason, detail)
        self.say(f"profiled {len(units)} rules in {measured} measurements over {len(sample)} files "
                 f"({self.result.sample_bytes / MiB:.1f} MiB); empty rule set {empty * 1000 / mib:.2f} ms/MiB")

    def _set_aside_rule(self, file: _File, name: str | None, reason: str, detail: str) -> None:
        if name is None:  # vetted whole
            if not file.out:
                self._aside(file.candidate, "", reason, detail)
            file.out.update(file.names)
            return
        if name in file.out:
            return
        file.out.add(name)
        self._aside(file.candidate, name, reason, detail)

    # -- 3. false positives ---------------------------------------------------------------------

    def _kept_units(self, file: _File) -> list[str | None]:
        if file.split is None:
            return [] if file.out else [None]
        return [name for name in file.names if name not in file.out and not self._needs_out(file, name)]

    def _needs_out(self, file: _File, name: str) -> bool:
        return any(other in file.out for other in file.split.closure(name))

    def _false_positives(self, files: list[_File]) -> None:
        units = [(file, name) for file in files for name in self._kept_units(file)]
        if not units or not self.baseline:
            return
        by_namespace = {file.namespace: file for file in files}
        rules = self._compile(self._sources(units))
        timeout = max(1, round(self.settings.timeout))
        hits: dict[tuple[str, str], list[str]] = {}
        for item in self.baseline:
            data = item.read()
            if data is None:
                continue
            try:
                matches = rules.match(data=data, externals=externals_for(item.path, data, _owner(item.path)),
                                      timeout=timeout)
            except self.yara.TimeoutError:
                self.result.warnings.append(f"the rules timed out on baseline file {item.path}")
                continue
            for match in matches:
                where = item.path + (f" (package {item.package})" if item.package else " (baseline.paths)")
                hits.setdefault((match.namespace, match.rule), []).append(where)
        for (namespace, rule), where in sorted(hits.items()):
            file = by_namespace[namespace]
            more = f" and {len(where) - 1} more" if len(where) > 1 else ""
            self._set_aside_rule(file, rule if file.split is not None else None, FALSE_POSITIVE,
                                 f"matched {where[0]}{more}")

    # -- 4. write -------------------------------------------------------------------------------

    def _write(self, files: list[_File]) -> None:
        for file in files:
            if file.split is not None:
                for name in file.names:
                    if name not in file.out and self._needs_out(file, name):
                        missing = [o for o in file.split.closure(name) if o in file.out]
                        file.out.add(name)
                        self._aside(file.candidate, name, DEPENDS, f"needs {', '.join(missing)}")
            kept = [n for n in file.names if n not in file.out]
            if not kept:
                continue
            text = file.data if not file.out else file.split.text(file.data, kept)
            target = os.path.join(self.directory, file.candidate.source, file.candidate.relative)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(text)
            self.result.files.append(target)
            self.result.kept += len(kept)
        if self.result.files:  # as the engine will load them: one namespace a file
            self.yara.compile(filepaths={p: p for p in self.result.files}, externals=self.empty_externals)
