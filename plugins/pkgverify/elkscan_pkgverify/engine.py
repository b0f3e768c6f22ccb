"""The ``pkgverify`` engine: a file an installed package ships is checked against the digest the package
manager recorded. A match is a vendor's file, known good (with ``trust_packages``, the engines after it
need not read it); a difference is a finding, ``Elkscan.ModifiedVendorFile.<package>``: the classic
sign of a trojaned ``ls``, ``ps`` or ``sshd``. Files no package ships, and conffiles, get no opinion.

The database is read once into a compact index and read again when it changes (checked at most once
a second, and before any difference is reported). A difference is not reported while the package
manager holds its lock: it may be replacing that very file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time

import attrs
from attrs import frozen

from elkscan_core import KNOWN_GOOD, ComponentError, Detection, Engine, Subject
from elkscan_core.trust import UntrustedError

from .dpkg import DpkgDatabase
from .index import Aliases, IndexBuilder, Package, PackageIndex
from .rpm import RpmDatabase

log = logging.getLogger("elkscan.pkgverify")
#: Seconds between two checks whether the package database changed.
RECHECK = 1.0
_CHUNK = 1 << 20


@frozen
class PkgVerifyConfig:
    """``manager``: whose database; ``database``: its directory (the manager's own by default);
    ``trust_packages``: a verified file needs no other engine."""

    manager: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "dpkg", "rpm")))
    database: str = ""
    trust_packages: bool = False


class PkgVerifyEngine(Engine):
    """Verifies package files against their package manager's digests."""

    id = "pkgverify"
    Config = PkgVerifyConfig
    canary = None  # its findings are about package files; a buffer in memory is none
    path_dependent = True  # the path decides which package's digest applies

    def __init__(self, config: PkgVerifyConfig, session) -> None:
        super().__init__(config, session)
        self.database = None
        self.index: PackageIndex | None = None
        self._state: tuple = ()
        self._failure = ""  # why the database, changed since, cannot be read again
        self._next_check = 0.0
        self._lock = threading.Lock()
        self._busy_said = False

    @property
    def vouches(self) -> bool:
        return self.config.trust_packages

    def _database(self):
        manager, where = self.config.manager, self.config.database
        if where and not os.path.isabs(where):
            where = self.session.resolve_path(where)
        if manager == "auto":
            if os.path.exists(os.path.join(where or "/var/lib/dpkg", "status")):
                manager = "dpkg"
            elif shutil.which("rpm", path="/usr/bin:/bin"):
                manager = "rpm"
            else:
                raise ComponentError("no package database: neither dpkg's /var/lib/dpkg/status nor the rpm "
                                     "command was found (set manager and database)")
        if manager == "dpkg":
            return DpkgDatabase(where or "/var/lib/dpkg")
        return RpmDatabase(where or None)

    def check(self) -> None:
        """Find, trust-check and read the database, as ``start`` would; the index is not kept."""
        self._load(self._database())

    def start(self) -> None:
        self.database = self._database()
        self._state = self.database.state()
        self.index = self._load(self.database)

    def _load(self, database) -> PackageIndex:
        builder = IndexBuilder(Aliases.of_root())
        started = time.monotonic()
        try:
            database.load(builder)
        except (UntrustedError, OSError) as exc:
            raise ComponentError(f"{database.manager} database: {exc}") from None
        index = builder.build()
        if builder.problems:
            shown = "; ".join(f"{where}: {what}" for where, what in builder.problems[:3])
            log.warning("pkgverify: skipped %d malformed entries of the %s database: %s%s", len(builder.problems),
                        database.manager, shown, " ..." if len(builder.problems) > 3 else "")
        log.info("pkgverify: %d files of %d %s packages in %.1f MB, read in %.2fs", len(index),
                 len(index.packages), database.manager, index.memory() / 1e6, time.monotonic() - started)
        return index

    def version(self) -> str:
        index = self.index
        return f"pkgverify {self.database.manager} {index.digest[:16]}" if index is not None else ""

    def _current(self, now: bool = False) -> PackageIndex:
        """The index, read again first when the database changed since (checked at most once a second,
        or ``now``). While the database cannot be read, every call fails with the reason."""
        if now or time.monotonic() >= self._next_check:
            with self._lock:
                if now or time.monotonic() >= self._next_check:
                    state = self.database.state()
                    if state != self._state:
                        self._state = state
                        try:
                            self.index, self._failure = self._load(self.database), ""
                        except ComponentError as exc:
                            self._failure = str(exc)
                    self._next_check = time.monotonic() + RECHECK
        if self._failure:
            raise ComponentError(f"{self._failure} (it changed since start; files are not verified until "
                                 "it can be read again)")
        return self.index

    def scan(self, subject: Subject):
        path = subject.path
        index = self._current()
        shipped = index.lookup(path) if path.startswith("/") else []
        if not shipped or not _is_at(subject):
            return []  # no package ships it (a conffile, or a file seen under another name): no opinion
        actual: dict[str, bytes] = {}
        if _matches(shipped, subject.fd, actual):
            return self._good()
        fresh = self._current(now=True)  # the package may have been upgraded since the index was read
        if fresh is not index:
            shipped = fresh.lookup(path)
            if not shipped or _matches(shipped, subject.fd, actual):
                return self._good() if shipped else []
        if self.database.busy():
            if not self._busy_said:
                self._busy_said = True
                log.warning("pkgverify: %s is changing packages; files that differ from their package "
                            "while it runs are not reported (first: %s)", self.database.manager, path)
            return []
        findings, seen = [], set()
        for package, digest in shipped:
            if package.name not in seen:
                seen.add(package.name)
                findings.append(Detection.from_signature(
                    self.id, f"Elkscan.ModifiedVendorFile.{package.name}",
                    meta={"package": package.name, "version": package.version, "arch": package.arch,
                          "manager": self.database.manager, "algorithm": package.algorithm,
                          "expected": digest.hex(), "actual": actual[package.algorithm].hex()}))
        return findings

    def _good(self):
        return KNOWN_GOOD if self.config.trust_packages else []


def _matches(shipped: list[tuple[Package, bytes]], fd: int, actual: dict[str, bytes]) -> bool:
    """Whether the file's content is what one of the packages shipped (``actual`` keeps the digests
    computed, so a second look-up reads the file again only for another algorithm)."""
    actual.update(_digests(fd, {package.algorithm for package, _ in shipped} - set(actual)))
    return any(actual[package.algorithm] == digest for package, digest in shipped)


def _is_at(subject: Subject) -> bool:
    """Whether the file opened is the one at its path on this host (not a container's file of that
    name, seen through /proc/<pid>/exe, nor one replaced since it was opened)."""
    try:
        st = os.stat(subject.path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (subject.stat.st_dev, subject.stat.st_ino)


def _digests(fd: int, algorithms: set[str]) -> dict[str, bytes]:
    """Each algorithm's digest of the whole file, in one read pass."""
    hashers = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    offset = 0
    while hashers:
        count = os.preadv(fd, [buffer], offset)
        if not count:
            break
        for hasher in hashers.values():
            hasher.update(view[:count])
        offset += count
    return {name: hasher.digest() for name, hasher in hashers.items()}
