"""The verdict cache: an unchanged file is not judged again by an engine whose rules have not changed.

A clean verdict is stored per (file, engine) with the file's identity ``(dev, inode, size, mtime_ns,
ctime_ns)`` and the engine's ``version()`` (engine id + rule digest or database version); for an engine
whose verdicts depend on the file's name (``Engine.path_dependent``), with a hash of the path too, so
one name's verdict never covers a hard link. A lookup hits only when all of them still match. Only
clean verdicts are kept: a file with detections is judged and reported every time.

A verdict is kept only when the identity is sure to move with the content. ``write()``, truncation
and the like move ``ctime`` (no user can set it back), and so does every write fault through a shared
mapping on ext4, xfs and btrfs (``page_mkwrite``), including the first write of a new mapping; but a
mapping whose page is already writable and dirty changes content with no timestamp until writeback.
So ``claim()``, called before an engine reads, holds a verdict out when the filesystem is another
(tmpfs, overlayfs, FUSE, NFS...), when the file changed within the settle time, or when any process
has the file open for writing or mapped writable: a read lease, granted only when the inode has no
writer at all, asks the kernel. A writer that appears after the claim moves the timestamps, so the
stored identity no longer matches.

The store is one SQLite file in WAL mode, shared safely by concurrent runs; writes are batched. A file
that turns out not to be a database, or to be damaged, is moved aside and rebuilt with a warning: the
worst a broken cache can cost is a rescan.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import signal
import sqlite3
import stat
import threading
import time

log = logging.getLogger("elkscan.cache")

#: A file changed less than this long ago may still be changing within the filesystem's timestamp
#: granularity (the "racily clean" problem): its verdict is not stored.
DEFAULT_SETTLE = 1.0
_FLUSH_EVERY = 256  # pending verdicts written per transaction
_PENDING_MAX = 16 * _FLUSH_EVERY
_SCHEMA = """
CREATE TABLE IF NOT EXISTS clean (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, engine TEXT NOT NULL, name BLOB NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, version TEXT NOT NULL,
    PRIMARY KEY (dev, ino, engine, name)
) WITHOUT ROWID
"""
#: The table of stores written before verdicts were claimed (mmap writers, names): not trusted.
_OLD_TABLE = "DROP TABLE IF EXISTS verdicts"
#: statfs magic numbers of filesystems that move mtime and ctime on every write fault of a shared
#: mapping (ext2/3/4, xfs, btrfs). Elsewhere content may change with no timestamp: nothing is kept.
_DATED_FILESYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E})


class _StatFs(ctypes.Structure):
    """``struct statfs``: only ``f_type`` (a long, first) is read; the rest is room to spare."""

    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 248)]


_fstatfs = ctypes.CDLL(None).fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.POINTER(_StatFs))


def dates_mmap_writes(fd: int) -> bool:
    """Whether the filesystem holding ``fd`` moves the file's timestamps on every write fault through a
    shared mapping (asked each time, ~1 us: a device number may come back as another filesystem)."""
    buf = _StatFs()
    return _fstatfs(fd, ctypes.byref(buf)) == 0 and buf.f_type & 0xFFFFFFFF in _DATED_FILESYSTEMS


def _has_writer(fd: int) -> bool:
    """Whether any process has this inode open for writing or mapped writable (a mapping keeps its file
    open after the descriptor is closed). The kernel grants a read lease only when none has; it is
    dropped at once. Should a writer open the file meanwhile, the lease break signals SIGURG, ignored
    by default (SIGIO would end the process). No right to a lease (not our file, no CAP_LEASE) counts
    as a writer."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # closing the descriptor drops it
    return False


def _name(path: str | None) -> bytes:
    """The key part for a path-dependent engine's verdict (empty for any other)."""
    return b"" if path is None else hashlib.blake2b(os.fsencode(path), digest_size=16).digest()


class Claim:
    """A file's status taken before an engine read it, at a moment when nobody could change its content
    unseen: what a clean verdict is stored under (see ``VerdictCache.claim``)."""

    __slots__ = ("stat",)

    def __init__(self, st: os.stat_result) -> None:
        self.stat = st


def _check_private(path: str) -> None:
    """Refuse a store others could write: a forged clean verdict would hide a file from every scan."""
    st = os.stat(path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(errno.EPERM, f"{path} is writable by others or owned by uid {st.st_uid}; "
                              "make it private to this user (chmod go-w) or choose another cache_path")


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """The parts of a file's status that change whenever its content may have changed."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class VerdictCache:
    """Clean verdicts by file identity and engine version; thread-safe, shared between processes."""

    def __init__(self, path: str, *, settle: float = DEFAULT_SETTLE) -> None:
        self.path = path
        self.settle_ns = int(settle * 1e9)
        self._lock = threading.Lock()
        self._pending: list[tuple] = []
        self._db: sqlite3.Connection | None = None
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _check_private(directory)
        if os.path.exists(path):
            _check_private(path)
        try:
            self._db = self._connect_when_free()
        except sqlite3.OperationalError as exc:
            log.warning("verdict cache %s stays busy (%s); scanning without it", self.path, exc)
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)

    # -- the store ---------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # Created private before SQLite opens it (its -wal and -shm files take the same mode).
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.execute(_OLD_TABLE)
            db.execute("SELECT count(*) FROM (SELECT 1 FROM clean LIMIT 1)").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _connect_when_free(self, attempts: int = 50) -> sqlite3.Connection:
        """Connect, waiting while another run holds the store (a locked store is busy, not damaged:
        it must never be moved aside, or that run's verdicts would be lost)."""
        for _ in range(attempts - 1):
            try:
                return self._connect()
            except sqlite3.OperationalError:
                time.sleep(0.1)
        return self._connect()

    def _rebuild(self, exc: Exception) -> None:
        """Move a damaged store aside and start an empty one; without one, the scan goes on uncached."""
        log.warning("verdict cache %s is unreadable (%s); moving it to %s.corrupt and starting a new one",
                    self.path, exc, self.path)
        if self._db is not None:
            self._db.close()
            self._db = None
        for suffix in ("-wal", "-shm"):
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass
        try:
            os.replace(self.path, self.path + ".corrupt")
        except FileNotFoundError:
            pass
        try:
            self._db = self._connect()
        except (sqlite3.DatabaseError, OSError) as again:
            log.warning("verdict cache %s cannot be created (%s); scanning without it", self.path, again)

    def _guarded(self, operation, default):
        """Run ``operation(db)`` under the lock; a damaged store is rebuilt and ``default`` returned."""
        with self._lock:
            if self._db is None:
                return default
            try:
                return operation(self._db)
            except sqlite3.OperationalError as exc:  # busy past the timeout, disk full: skip, keep it
                log.debug("verdict cache %s: %s", self.path, exc)
                return default
            except sqlite3.DatabaseError as exc:
                self._pending.clear()
                self._rebuild(exc)
                return default

    # -- verdicts ----------------------------------------------------------------------------------

    def is_clean(self, engine: str, version: str, st: os.stat_result, path: str | None = None) -> bool:
        """True when ``engine`` at ``version`` found this very file clean before (under the name ``path``,
        for an engine whose verdicts depend on it; None for any other)."""
        dev, ino, size, mtime_ns, ctime_ns = identity(st)
        name = _name(path)

        def lookup(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT size, mtime_ns, ctime_ns, version FROM clean "
                             "WHERE dev = ? AND ino = ? AND engine = ? AND name = ?",
                             (dev, ino, engine, name)).fetchone()
            return row == (size, mtime_ns, ctime_ns, version)

        return bool(version) and self._guarded(lookup, False)

    def claim(self, fd: int) -> Claim | None:
        """Call before an engine reads ``fd``: what the verdict on what it reads may be stored under, or
        None when it may not be stored (a filesystem that may not date mmap writes, a change within the
        settle time, a writer anywhere)."""
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        if (not stat.S_ISREG(st.st_mode)
                or time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < self.settle_ns
                or not dates_mmap_writes(fd) or _has_writer(fd)):
            return None
        return Claim(st)

    def record_clean(self, engine: str, version: str, claim: Claim, path: str | None = None) -> None:
        """Remember a clean verdict, judged from what was read after ``claim()`` (written in batches;
        ``flush()`` writes the rest). ``path`` as for ``is_clean``."""
        if not version:
            return
        dev, ino, size, mtime_ns, ctime_ns = identity(claim.stat)
        row = (dev, ino, engine, _name(path), size, mtime_ns, ctime_ns, version)
        with self._lock:
            if len(self._pending) < _PENDING_MAX:  # beyond that the store is stuck: drop, rescan later
                self._pending.append(row)
            full = len(self._pending) >= _FLUSH_EVERY
        if full:
            self.flush()

    def flush(self) -> None:
        def write(db: sqlite3.Connection) -> None:
            if not self._pending:
                return
            with db:  # one transaction
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR REPLACE INTO clean VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._pending)
            self._pending.clear()

        self._guarded(write, None)

    def __len__(self) -> int:
        return self._guarded(lambda db: db.execute("SELECT count(*) FROM clean").fetchone()[0], 0)

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
