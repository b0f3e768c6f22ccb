"""The ``yara`` engine: every matching rule of a compiled set, with Elkeid-format hit data."""

from __future__ import annotations

import os
import pwd
import threading
from collections.abc import Sequence
from typing import Optional

import attrs
from attrs import frozen

from elkscan_core import ComponentError, Detection, Duration, Engine, Size, Subject
from elkscan_core.mapping import contents
from elkscan_core.units import MiB

from . import ruleset

ON_ERROR = ("fail", "skip")
#: The external variables that tell a rule the file's name.
PATH_EXTERNALS = frozenset({"filename", "filepath", "extension"})
#: Why a file was not judged when it shrank under yara's mapping (someone held it open for writing, so it
#: could not be held still): an error on its record, never a clean.
SHRANK = "the file shrank while yara read it (truncated by a writer); not judged"


@frozen
class RuleOptions:
    """The options of every engine that runs YARA rules (``yara``, and ``yarax`` from its own plugin)."""

    rules: list[str] = attrs.field(factory=lambda: [ruleset.BUILTIN])
    timeout: Duration = Duration(5)
    max_file_size: Size = Size(25 * MiB)
    fast: bool = False
    max_strings: int = 16
    on_error: str = attrs.field(default="fail", validator=attrs.validators.in_(ON_ERROR))


@frozen
class YaraConfig(RuleOptions):
    """Options of ``use: yara`` (see plugins/yara_backend/README.md)."""

    cache: bool = True
    cache_dir: Optional[str] = None


_HEAD_TYPES = ((b"\x7fELF", "ELF"), (b"MZ", "EXE"), (b"#!", "SCRIPT"), (b"<?php", "PHP"),
               (b"\xca\xfe\xba\xbe", "MACHO"), (b"\xcf\xfa\xed\xfe", "MACHO"), (b"PK\x03\x04", "ZIP"))


def file_type(head: bytes) -> str:
    """A short type name for the ``filetype`` external variable, from the file's first bytes."""
    return next((name for magic, name in _HEAD_TYPES if head.startswith(magic)), "")


class ExternalValues:
    """The values of the externals a rule set declares (``filename``, ``filepath``, ``extension``,
    ``filetype``, ``owner``) for one subject, each computed only when declared; owner names are looked up
    once per uid. Shared by the engines that run YARA rules."""

    def __init__(self) -> None:
        self._owners: dict[int, str] = {}
        self._lock = threading.Lock()

    def of(self, subject: Subject, wanted: frozenset[str]) -> dict[str, str]:
        path = subject.path
        name = os.path.basename(path)
        values = {"filename": lambda: name, "filepath": lambda: path,
                  "extension": lambda: os.path.splitext(name)[1].lstrip(".").lower(),
                  "filetype": lambda: file_type(subject.read(8)),
                  "owner": lambda: self._owner(subject.stat.st_uid)}
        return {key: values[key]() for key in wanted}

    def _owner(self, uid: int) -> str:
        with self._lock:
            if uid not in self._owners:
                try:
                    self._owners[uid] = pwd.getpwuid(uid).pw_name
                except KeyError:
                    self._owners[uid] = str(uid)
            return self._owners[uid]


def _import_yara() -> None:
    try:
        import yara  # noqa: F401
    except ImportError as exc:
        raise ComponentError(f"yara-python is not installed ({exc}); pip install yara-python") from None


class YaraEngine(Engine):
    """Scans each file through its open descriptor; reports every matching rule."""

    id = "yara"
    Config = YaraConfig
    path_dependent = False  # set with each rule set (``compiled``)
    forks = True  # its compiled rules, shared copy-on-write by a share's process (elkscan_core/shares.py)

    def __init__(self, config: YaraConfig, session) -> None:
        super().__init__(config, session)
        self.max_file_size = config.max_file_size
        # yara enforces its own timeout; the runner's deadline is only the backstop for a stuck call
        self.call_timeout = config.timeout + 10
        self._externals = ExternalValues()
        self._extra_rules: list[str] = []
        self._options = {"timeout": max(1, round(config.timeout)), "fast": config.fast}

    def check(self) -> None:
        """Find, trust-check and compile the rules, in memory (validate writes no cache)."""
        _import_yara()
        ruleset.load(self.config.rules, cache_dir=None, skip_broken=self.config.on_error == "skip",
                     resolve=self.session.resolve_path)

    def start(self) -> None:
        _import_yara()
        self.compiled = self._load(self.config.rules)

    def _load(self, specs: Sequence[str]) -> ruleset.CompiledRules:
        cache_dir = None
        if self.config.cache:
            cache_dir = (self.session.resolve_path(self.config.cache_dir) if self.config.cache_dir
                         else os.path.join(self.session.state_dir, "yara-rules"))
        return ruleset.load(specs, cache_dir=cache_dir, skip_broken=self.config.on_error == "skip",
                            resolve=self.session.resolve_path)

    def version(self) -> str:
        return self._version  # read per file (the verdict cache's key): made with each rule set

    def describe(self) -> str:
        import yara

        compiled, sources = self.compiled, [*self.config.rules, *self._extra_rules]
        return (f"yara: {compiled.count} rules from {len(compiled.files)} file(s) ({', '.join(sources)}), "
                f"digest {compiled.digest[:16]}, yara {yara.__version__}")

    @property
    def compiled(self) -> ruleset.CompiledRules:
        return self._compiled

    @compiled.setter
    def compiled(self, compiled: ruleset.CompiledRules) -> None:
        # Known once per rule set, not asked per file: rules that read ``filename``, ``filepath`` or
        # ``extension`` judge a name, not only content; the version names the rules' digest.
        import yara

        self.path_dependent = not compiled.externals.isdisjoint(PATH_EXTERNALS)
        self._version = f"yara {yara.__version__} rules {compiled.digest[:16]}"
        self._compiled = compiled

    def reload(self, rules) -> None:
        """Use the configured rules plus a bundle's YARA files; the old set stays on any error."""
        extra = list(rules.get("yara", []))
        self.compiled = self._load([*self.config.rules, *extra])
        self._extra_rules = extra

    def scan(self, subject: Subject) -> list[Detection]:
        compiled = self._compiled  # one consistent set even if a reload swaps it mid-scan
        options = self._options
        if compiled.externals:
            options = {**options, "externals": self._externals.of(subject, compiled.externals)}
        try:
            with contents(subject.fd, subject.size) as data:
                matches = compiled.rules.match(data=data, **options)
        except Exception as exc:  # yara.Error; yara is imported lazily
            if "could not map file" not in str(exc):
                raise
            raise OSError(SHRANK) from None  # libyara caught a SIGBUS: a read past the end
        return [self._detection(m) for m in matches]

    def _detection(self, match) -> Detection:
        hits = []
        for string in match.strings:
            for instance in string.instances:
                if len(hits) >= self.config.max_strings:
                    break
                hits.append(f"{string.identifier},{instance.offset},{instance.matched_length}")
        meta = {"namespace": match.namespace, "tags": list(match.tags), **match.meta}
        return Detection.from_signature(self.id, match.rule, yara_rule=True, hit_data=tuple(hits), meta=meta)
