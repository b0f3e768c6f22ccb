"""The ``yarax`` engine: YARA rules through YARA-X, detections in the shape of the ``yara`` engine's.

YARA-X's Python bindings keep the GIL while they scan, so the engine says so (``releases_gil =
False``) and the session runs it in worker processes, one per worker, each with a scanner of its own;
files under 64 KiB it scans on the worker threads, where the hand-over would cost more than the scan.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence

from attrs import frozen

from elkscan_core import ComponentError, Detection, Engine, Subject
from elkscan_yara_backend.engine import PATH_EXTERNALS, ExternalValues, RuleOptions

from . import compat

log = logging.getLogger("elkscan.yarax")

@frozen
class YaraXConfig(RuleOptions):
    """Options of ``use: yarax``: the yara engine's (see plugins/yarax_backend/README.md), and one of
    YARA-X's own."""

    relaxed_re_syntax: bool = True


def _import_yara_x() -> None:
    try:
        import yara_x  # noqa: F401
    except ImportError as exc:
        raise ComponentError(f"yara-x is not installed ({exc}); pip install yara-x") from None


class YaraXEngine(Engine):
    """Scans each file through its open descriptor with YARA-X; reports every matching rule."""

    id = "yarax"
    Config = YaraXConfig
    forks = True  # its rules, shared copy-on-write by a share's process (elkscan_core/shares.py)
    releases_gil = False  # the bindings hold the GIL in every scan call (yara-x 1.23): worker processes
    inline_below = 64 * 1024  # but a file this small costs less to scan than to hand over (performance.md)
    thread_safe = True  # a scanner per thread (and per process)

    def __init__(self, config: YaraXConfig, session) -> None:
        super().__init__(config, session)
        self.max_file_size = config.max_file_size
        self.call_timeout = config.timeout + 10  # YARA-X's own timeout first; the runner's is the backstop
        self._local = threading.local()
        self._externals = ExternalValues()
        self._extra_rules: list[str] = []
        self._session_pid = os.getpid()

    def check(self) -> None:
        """Find, trust-check and compile the rules, and say what YARA-X refuses."""
        _import_yara_x()
        self._report(self._compile(self.config.rules))

    def start(self) -> None:
        _import_yara_x()
        self.compiled = self._compile(self.config.rules)
        self._report(self.compiled)

    def _compile(self, specs: Sequence[str]) -> compat.Compiled:
        compiled = compat.load(specs, relaxed=self.config.relaxed_re_syntax, resolve=self.session.resolve_path)
        if self.config.on_error == "fail":
            compat.require_all(compiled)
        elif not compiled.count:
            raise ComponentError(f"no rule compiles under yara-x ({compiled.summary()})")
        return compiled

    @staticmethod
    def _report(compiled: compat.Compiled) -> None:
        """Every rule YARA-X refuses or reads only with libyara's syntax, one line each, then the count."""
        for line in compiled.refused:
            log.warning("yarax: yara-x refuses %s", line)
        for line in compiled.relaxed:
            log.warning("yarax: %s", line)
        level = logging.WARNING if compiled.refused or compiled.relaxed else logging.INFO
        log.log(level, "yarax: %s", compiled.summary())

    def version(self) -> str:
        return self.compiled.version

    def describe(self) -> str:
        compiled, sources = self.compiled, [*self.config.rules, *self._extra_rules]
        return (f"yarax: {compiled.count} rules from {len(compiled.files)} file(s) ({', '.join(sources)}), "
                f"digest {compiled.digest[:16]}, yara-x {compat.yara_x_version()}; {len(compiled.refused)} "
                f"refused, {len(compiled.relaxed)} read with libyara's regexp syntax only")

    @property
    def path_dependent(self) -> bool:
        """Rules that read ``filename``, ``filepath`` or ``extension`` judge a name, not only content."""
        return not self.compiled.externals.isdisjoint(PATH_EXTERNALS)

    def reload(self, rules) -> None:
        """Use the configured rules plus a bundle's YARA files; the old set stays on any error."""
        extra = list(rules.get("yara", []))
        compiled = self._compile([*self.config.rules, *extra])
        self._report(compiled)
        self.compiled, self._extra_rules = compiled, extra

    def _scanner(self, compiled: compat.Compiled):
        """This thread's scanner for ``compiled`` (a YARA-X scanner serves one thread at a time)."""
        local = self._local
        if getattr(local, "rules", None) is not compiled.rules:
            import yara_x

            scanner = yara_x.Scanner(compiled.rules)
            scanner.set_timeout(max(1, round(self.config.timeout)))
            scanner.fast_scan(self.config.fast)
            local.scanner, local.rules = scanner, compiled.rules
        return local.scanner

    def scan(self, subject: Subject) -> list[Detection]:
        compiled = self.compiled  # one consistent set even if a reload swaps it mid-scan
        scanner = self._scanner(compiled)
        for name, value in self._externals.of(subject, compiled.externals).items():
            scanner.set_global(name, value)
        # YARA-X's timeout runs on one heartbeat thread per process, started by the first scan: a worker
        # process forked after the session scanned (files under inline_below) has none. There, a scan
        # that overruns by a second ends the process (SIGALRM, default action): an error on the record.
        alarm = os.getpid() != self._session_pid
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, max(1, round(self.config.timeout)) + 1)
        try:
            results = scanner.scan_file(subject.fd_path)
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return [self._detection(rule) for rule in results.matching_rules]

    def _detection(self, rule) -> Detection:
        hits = []
        for pattern in rule.patterns:
            for match in pattern.matches:
                if len(hits) >= self.config.max_strings:
                    break
                hits.append(f"{pattern.identifier},{match.offset},{match.length}")
        meta = {"namespace": rule.namespace, "tags": list(rule.tags), **dict(rule.metadata)}
        return Detection.from_signature(self.id, rule.identifier, yara_rule=True, hit_data=tuple(hits),
                                        meta=meta)
