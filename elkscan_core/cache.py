"""The verdict cache: an unchanged file is not judged again by an engine whose rules have not changed.

A clean verdict is stored per (file, engine) with the file's identity ``(dev, inode, size, mtime_ns,
ctime_ns)`` and the engine's ``version()`` (engine id + rule digest or database version); for an engine
whose verdicts depend on the file's name (``Engine.path_dependent``), with a hash of the path too, so
one name's verdict never covers a hard link. A lookup hits only when all of them still match. Only
clean verdicts are kept, and outcomes an engine gives for a limit of its own (``NotScanned``: a
file clamd cannot scan whole under its ``MaxScanSize``), kept as what they are, never clean: keyed by
the engine's ``limits()`` too, so a change of version or limits judges the file again. A file with
detections, or an error, is judged and reported every time.

A verdict is kept only when the identity is sure to move with the content. ``write()``, truncation
and the like move ``ctime`` (no user can set it back), and so does every write fault through a shared
mapping on ext4, xfs and btrfs (``page_mkwrite``), including the first write of a new mapping; but a
mapping whose page is already writable and dirty changes content with no timestamp until writeback.
So ``claim()``, called before an engine reads, holds a verdict out when the filesystem is another
(tmpfs, overlayfs, FUSE, NFS...), when the file changed within the settle time, or when any process
has the file open for writing or mapped writable: a read lease, granted only when the inode has no
writer at all, asks the kernel. A writer that appears after the claim moves the timestamps, so the
stored identity no longer matches.

The store is one SQLite file in WAL mode, shared safely by concurrent runs; writes are batched, and a
crash loses at most the verdicts not yet written (never makes a wrong one count). Its keys are read once
per run into an in-memory index (``_Index``: a hash table of 64-bit keys, 12 to 24 bytes a verdict), so
a look-up costs a hash and a probe or two, not a query. A file that turns out not to be a database, or
to be damaged, is moved aside and rebuilt with a warning: the worst a broken cache can cost is a rescan.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Iterable, Sequence

from .builtin_hashes import blake2b

log = logging.getLogger("elkscan.cache")

#: A file changed less than this long ago may still be changing within the filesystem's timestamp
#: granularity (the "racily clean" problem): its verdict is not stored.
DEFAULT_SETTLE = 1.0
#: Pending verdicts written per transaction. Each commit appends every B-tree page it touched to the
#: WAL: at 256 a first scan of 60,000 files wrote 19 MB for a 3.5 MB store (5.4 us of the writer's CPU
#: a verdict); at 1,024, 3.5 us.
_FLUSH_EVERY = 1024
_WRITE_EVERY = 1.0  # seconds at most between writes of pending verdicts
_CLOSE_WAIT = 30.0  # seconds close() waits for the writer thread (SQLite's busy timeout is 10 s)
_PENDING_MAX = 4 * _FLUSH_EVERY
_SLOTS_MIN = 1024  # the index's smallest table; it doubles when it would be more than 2/3 full
_INODE_BITS = 1 << 20  # a bit for each inode number modulo this, set when a verdict on it is recorded
_SCHEMA = """
CREATE TABLE IF NOT EXISTS clean (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, engine TEXT NOT NULL, name BLOB NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, version TEXT NOT NULL,
    PRIMARY KEY (dev, ino, engine, name)
) WITHOUT ROWID
"""
#: Clean verdicts of one engine and version, many in one statement: their identities as a JSON array of
#: ``[dev, ino, size, mtime_ns, ctime_ns]``, their names (all empty, or all 16-byte digests) as one BLOB,
#: the n-th row's name its n-th piece. ``executemany`` lets go of the GIL about 4 times a row (binding
#: and stepping each), each time waking a thread that waits for the GIL to find it taken again; this
#: lets go of it once. (``substr`` of a zero-length BLOB is NULL, hence ``ifnull``; ``unhex()`` would
#: need SQLite 3.41.)
_INSERT_CLEAN = """
INSERT OR REPLACE INTO clean (dev, ino, engine, name, size, mtime_ns, ctime_ns, version)
SELECT value->>0, value->>1, ?3, ifnull(substr(?2, key * ?5 + 1, ?5), x''), value->>2, value->>3, value->>4, ?4
FROM json_each(?1)
"""
#: The table of stores written before verdicts were claimed (mmap writers, names): not trusted.
_OLD_TABLE = "DROP TABLE IF EXISTS verdicts"
#: What engines left unread for a limit of their own, with the limits and the reason: few rows (files
#: over a limit are rare), held in a dict, never consulted for a clean verdict.
_NOT_SCANNED_SCHEMA = """
CREATE TABLE IF NOT EXISTS not_scanned (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, engine TEXT NOT NULL, name BLOB NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, version TEXT NOT NULL,
    limits TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (dev, ino, engine, name)
) WITHOUT ROWID
"""
#: statfs magic numbers of filesystems that move mtime and ctime on every write fault of a shared
#: mapping (ext2/3/4, xfs, btrfs). Elsewhere content may change with no timestamp: nothing is kept.
_DATED_FILESYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E})


class _StatFs(ctypes.Structure):
    """``struct statfs``: only ``f_type`` (a long, first) is read; the rest is room to spare."""

    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 248)]


# Each call that lets go of the GIL costs a worker the wait to get it back from the walking thread
# (tens of microseconds on a busy 2-core host, more than the call): the claim's calls keep it when they
# cannot wait for a network or a user-space server. They are declared without ``argtypes``: ctypes then
# passes Python ints as C ints itself, at half the cost of a call through declared argument types
# (0.44 us against 0.80 us), which every claim pays four times.
_fstatfs = ctypes.CDLL(None).fstatfs  # lets go of the GIL: on NFS or FUSE it may wait for a server
#: statfs on a filesystem on a block device reads counters in memory: the GIL is kept.
_fstatfs_local = ctypes.PyDLL(None).fstatfs
#: fcntl(2) keeping the GIL: on ext4, xfs and btrfs (the only filesystems a lease is asked on),
#: setting or dropping a lease never waits for I/O.
_fcntl = ctypes.PyDLL(None).fcntl
_F_SETSIG, _F_SETLEASE, _F_RDLCK, _F_UNLCK, _SIGURG = (
    fcntl.F_SETSIG, fcntl.F_SETLEASE, fcntl.F_RDLCK, fcntl.F_UNLCK, int(signal.SIGURG))
_buffers = threading.local()  # each thread's struct statfs, filled by its calls only


def dates_mmap_writes(fd: int, dev: int | None = None) -> bool:
    """Whether the filesystem holding ``fd`` moves the file's timestamps on every write fault through a
    shared mapping (asked each time, ~1 us: a device number may come back as another filesystem).
    ``dev``, the file's ``st_dev``, tells whether it is on a block device (a local filesystem)."""
    buf = getattr(_buffers, "statfs", None)
    if buf is None:
        buf = _buffers.statfs = _StatFs()
    statfs = _fstatfs_local if dev is not None and os.major(dev) != 0 else _fstatfs
    return statfs(fd, ctypes.byref(buf)) == 0 and buf.f_type & 0xFFFFFFFF in _DATED_FILESYSTEMS


def _has_writer(fd: int) -> bool:
    """Whether any process has this inode open for writing or mapped writable (a mapping keeps its file
    open after the descriptor is closed). The kernel grants a read lease only when none has; it is
    dropped at once. Should a writer open the file meanwhile, the lease break signals SIGURG, ignored
    by default (SIGIO would end the process). No right to a lease (not our file, no CAP_LEASE) counts
    as a writer."""
    if _fcntl(fd, _F_SETSIG, _SIGURG) < 0 or _fcntl(fd, _F_SETLEASE, _F_RDLCK) < 0:
        return True
    _fcntl(fd, _F_SETLEASE, _F_UNLCK)  # should it fail, closing the descriptor drops it
    return False


def unwritten(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """Whether the regular file ``name`` in ``dir_fd`` is still the one ``st`` (its lstat) describes and
    nobody has it open for writing or mapped writable now (a read lease, as ``claim`` asks)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return False
    try:
        now = os.fstat(fd)
        return identity(now) == identity(st) and not _has_writer(fd)
    except OSError:
        return False
    finally:
        os.close(fd)


#: A file's identity, packed: the fixed-size middle of a key (the name, empty or 16 bytes, ends it).
_IDENTITY_LAYOUT = struct.Struct("<QQqqq")
_IDENTITY = _IDENTITY_LAYOUT.pack
#: What a looked-up identity that does not fit packs to (``_packed``): a byte longer than any that fits,
#: so its key is never a stored verdict's.
_UNHELD = bytes(_IDENTITY_LAYOUT.size + 1)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1  # what SQLite's INTEGER and the packed times hold
#: Keys are 64-bit, never 0 (an empty slot of the index): ``hash(...) & _MASK or 1``.
_MASK = (1 << 64) - 1


def _packed(st: os.stat_result) -> bytes:
    """A looked-up file's packed identity. A file's owner may set a time after 2262 (ext4 keeps dates to
    2446, xfs to 2486) or before 1678 (btrfs and tmpfs keep any), which 64 bits of nanoseconds do not
    hold: packing it would raise and end the walk that asked. ``claim`` never lets such a file's verdict
    be stored, so it packs to ``_UNHELD`` and finds nothing."""
    try:
        return _IDENTITY(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except struct.error:
        return _UNHELD


def _name(path: str) -> bytes:
    """The key part for a path-dependent engine's verdict (any other's is empty)."""
    return blake2b(os.fsencode(path), digest_size=16).digest()


class _Index:
    """The clean keys of the store, loaded once per run, and those recorded since: each verdict's whole key
    (engine, version, identity, name) as a 64-bit keyed hash, in a hash table (an array of 64-bit slots,
    0 for empty, linear probing, at most 2/3 full: 12 to 24 bytes a verdict). A look-up is a hash and
    a probe or two in Python; a binary search of a sorted array took 16 comparisons of Python ints.

    The hash is SipHash (Python's ``hash()`` of bytes, in C: a tenth of a BLAKE2b's cost in Python) over
    a 16-byte prefix drawn from this run's secret for each (engine, version), then the packed identity
    and name. The prefix is what keeps it secret, even should the interpreter's own SipHash key be known
    (``PYTHONHASHSEED``): without it nobody can make a file's key collide with a clean one; by chance, a
    look-up among n keys collides with probability n / 2**64 (6e-15 for 100,000 verdicts)."""

    def __init__(self) -> None:
        self._secret = os.urandom(32)
        self._prefixes: dict[tuple[str, ...], bytes] = {}
        #: readers take the table once and probe it without the lock: a key is written to a slot in one
        #: step, and a grown table replaces the old one whole
        self.table = array.array("Q", bytes(8 * _SLOTS_MIN))
        self.count = 0
        #: not-scanned outcomes: key (with the engine's limits in its prefix) -> reason
        self.unread: dict[int, str] = {}
        #: False while every key was recorded in this run (the store held none at start): a look-up then
        #: needs a key only for an inode whose bit ``recorded`` has set (128 KB; a first scan's look-ups,
        #: which find nothing, cost a bit test instead of a hash).
        self.loaded = False
        self.recorded = bytearray(_INODE_BITS // 8)
        self._lock = threading.Lock()  # for writers

    def key(self, engine: str, version: str, st: os.stat_result, path: str | None, *limits: str) -> int:
        """A clean verdict's key; with ``limits``, a not-scanned outcome's (under those limits)."""
        prefix = self._prefixes.get((engine, version, *limits)) or self.prefix(engine, version, *limits)
        return hash(prefix + _packed(st) + (b"" if path is None else _name(path))) & _MASK or 1

    def prefix(self, *parts: str) -> bytes:
        """The secret first 16 bytes of every key of this engine at this version (and these limits)."""
        prefix = self._prefixes.get(parts)
        if prefix is None:
            h = blake2b(digest_size=16, key=self._secret)
            for part in parts:
                data = part.encode("utf-8", "surrogatepass")
                h.update(b"%d:" % len(data) + data)
            prefix = self._prefixes[parts] = h.digest()
        return prefix

    def __contains__(self, key: int) -> bool:
        table = self.table
        mask = len(table) - 1
        slot = key & mask
        found = table[slot]
        while found != key and found:
            slot = (slot + 1) & mask
            found = table[slot]
        return found == key

    def found(self, keys: Iterable[int]) -> list[bool]:
        """``key in self`` for each of ``keys`` (the probe inline: a walk asks for every file)."""
        table = self.table
        mask = len(table) - 1
        answers = []
        for key in keys:
            slot = key & mask
            found = table[slot]
            while found != key and found:
                slot = (slot + 1) & mask
                found = table[slot]
            answers.append(found == key)
        return answers

    def mark(self, ino: int) -> None:
        """Note that a verdict on this inode was recorded (``may_know``). Not under the lock: two
        threads marking at once may lose a bit, and a lost bit only costs that file a scan."""
        ino %= _INODE_BITS
        self.recorded[ino >> 3] |= 1 << (ino & 7)

    def add_unread(self, key: int, ino: int, reason: str) -> None:
        with self._lock:
            self.unread[key] = reason
        self.mark(ino)

    def add_rows(self, rows: Sequence[tuple]) -> None:
        """Index clean verdicts, given as the rows queued for the store (a not-scanned row, with its
        limits and reason, is indexed when recorded: ``add_unread``)."""
        prefixes, prefix, pack = self._prefixes, self.prefix, _IDENTITY
        keys = [hash((prefixes.get((engine, version)) or prefix(engine, version))
                     + pack(dev, ino, size, mtime_ns, ctime_ns) + name) & _MASK or 1
                for dev, ino, engine, name, size, mtime_ns, ctime_ns, version in (r for r in rows if len(r) == 8)]
        if not keys:
            return
        with self._lock:
            table = self.table
            if 3 * (self.count + len(keys)) > 2 * len(table):  # readers still probing the old one find less
                self.table, self.count = _table(array.array("Q", [*filter(None, table), *keys]))
                return
            added = 0
            for key in keys:
                added += _insert(table, key)
            self.count += added

    def replace(self, keys: Iterable[int]) -> None:
        table, count = _table(keys)
        with self._lock:
            self.table, self.count, self.loaded = table, count, bool(count)


def _insert(table: array.array, key: int) -> bool:
    """Put ``key`` in ``table`` (not full); False when it was there already."""
    mask = len(table) - 1
    slot = key & mask
    found = table[slot]
    while found:
        if found == key:
            return False
        slot = (slot + 1) & mask
        found = table[slot]
    table[slot] = key
    return True


def _table(keys: Iterable[int]) -> tuple[array.array, int]:
    """A hash table holding ``keys`` (nonzero), at most 2/3 full, and how many distinct keys it holds."""
    keys = keys if isinstance(keys, (list, tuple, array.array)) else array.array("Q", keys)
    slots = _SLOTS_MIN
    while 3 * len(keys) > 2 * slots:
        slots *= 2
    table = array.array("Q", bytes(8 * slots))
    mask, count = slots - 1, 0
    for key in keys:  # _insert, inline: a run's start puts every stored verdict here
        slot = key & mask
        found = table[slot]
        while found and found != key:
            slot = (slot + 1) & mask
            found = table[slot]
        if not found:
            table[slot] = key
            count += 1
    return table, count


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

    def __init__(self, path: str, *, settle: float = DEFAULT_SETTLE, share: tuple[int, int] | None = None) -> None:
        """``share``: (k, n) for a process that judges only the files whose inode modulo n is k (a walk
        split into shares): only the verdicts on those are loaded (the others would never be asked)."""
        self.path = path
        self.settle_ns = int(settle * 1e9)
        self._share = share
        self._lock = threading.Lock()  # the connection
        self._pending_lock = threading.Lock()  # verdicts not yet written: taken without waiting for a write
        self._pending: list[tuple] = []
        self._indexed = 0  # how many of the pending verdicts are in the index already
        self._wake = threading.Condition(self._pending_lock)
        self._writer: threading.Thread | None = None
        self._closing = False
        self._index = _Index()
        self._db: sqlite3.Connection | None = None
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _check_private(directory)
        if os.path.exists(path):
            _check_private(path)
        try:
            self._db = self._connect_when_free()
            self._load()
        except sqlite3.OperationalError as exc:
            log.warning("verdict cache %s stays busy (%s); scanning without it", self.path, exc)
            if self._db is not None:
                self._db.close()
                self._db = None
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
            db.execute(_NOT_SCANNED_SCHEMA)
            db.execute(_OLD_TABLE)
            db.execute("SELECT count(*) FROM (SELECT 1 FROM clean LIMIT 1)").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _load(self) -> None:
        """Every stored verdict into the in-memory index (streamed: the rows are never all held). The
        prefix of each (engine, version) is looked up in a dict of this load's own: most rows share one.
        A row no claim writes (a value that does not fit, a name that is not a BLOB) is damage. A load
        that does not finish leaves nothing of the store in the index."""
        try:
            self._load_rows()
        except BaseException as exc:
            self._index = _Index()
            if isinstance(exc, (struct.error, TypeError)):
                raise sqlite3.DatabaseError(f"a stored verdict no scan could have written ({exc})") from exc
            raise

    def _load_rows(self) -> None:
        prefix, pack, prefixes = self._index.prefix, _IDENTITY, {}
        mine, share = ("", ()) if self._share is None else (" WHERE ino % ? = ?", self._share[::-1])
        rows = self._db.execute("SELECT engine, version, dev, ino, size, mtime_ns, ctime_ns, name FROM clean" + mine,
                                share)
        self._index.replace(array.array("Q", (
            hash((prefixes.get((engine, version)) or prefixes.setdefault((engine, version), prefix(engine, version)))
                 + pack(dev, ino, size, mtime_ns, ctime_ns) + name) & _MASK or 1
            for engine, version, dev, ino, size, mtime_ns, ctime_ns, name in rows)))
        reasons: dict[str, str] = {}  # one string per distinct reason
        rows = self._db.execute("SELECT engine, version, limits, dev, ino, size, mtime_ns, ctime_ns, name, "
                                "reason FROM not_scanned" + mine, share)
        self._index.unread = {
            hash(prefix(engine, version, limits) + pack(dev, ino, size, mtime_ns, ctime_ns) + name) & _MASK or 1:
                reasons.setdefault(reason, reason)
            for engine, version, limits, dev, ino, size, mtime_ns, ctime_ns, name, reason in rows}
        self._index.loaded |= bool(self._index.unread)  # their inodes' bits are not set

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
                self._rebuild(exc)
                return default

    # -- verdicts ----------------------------------------------------------------------------------

    def is_clean(self, engine: str, version: str, st: os.stat_result, path: str | None = None) -> bool:
        """True when ``engine`` at ``version`` found this very file clean before (under the name ``path``,
        for an engine whose verdicts depend on it; None for any other)."""
        index = self._index
        if not index.loaded:  # only this run's verdicts can be found: none on this inode, no key needed
            ino = st.st_ino % _INODE_BITS
            if not index.recorded[ino >> 3] & 1 << (ino & 7):
                return False
        if self._indexed < len(self._pending):
            self._catch_up()
        if not (version and index.count):
            return False
        return index.key(engine, version, st, path) in index

    def clean_all(self, engine: str, version: str, stats: Sequence[os.stat_result],
                  paths: Sequence[str] | None = None) -> list[bool]:
        """``is_clean`` for several files at once (a walk's, a directory at a time): the same keys, made
        and probed in two loops instead of two calls a file. ``paths``: the files' names, for an engine
        whose verdicts depend on them."""
        index = self._index
        if self._indexed < len(self._pending):
            self._catch_up()
        if not (version and index.count):
            return [False] * len(stats)
        loaded, picked, count = index.loaded, (), len(stats)
        if not loaded:  # a first scan: only files whose inode's bit is set may have a key
            may_know = self.may_know
            picked = [i for i, st in enumerate(stats) if may_know(st)]
            stats = [stats[i] for i in picked]
            paths = None if paths is None else [paths[i] for i in picked]
        prefix, pack = index._prefixes.get((engine, version)) or index.prefix(engine, version), _IDENTITY
        try:  # _packed, inline: a walk asks for every file
            if paths is None:
                keys = [hash(prefix + pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
                        & _MASK or 1 for st in stats]
            else:
                keys = [hash(prefix + pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                             + _name(path)) & _MASK or 1 for st, path in zip(stats, paths)]
        except struct.error:  # a time that does not fit: these files one at a time
            keys = [index.key(engine, version, st, None if paths is None else paths[i]) for i, st in enumerate(stats)]
        found = index.found(keys)
        if loaded:
            return found
        answers = [False] * count
        for i, hit in zip(picked, found):
            answers[i] = hit
        return answers

    def may_know(self, st: os.stat_result) -> bool:
        """False when no verdict at all can be held on this file (a first scan, and none recorded on its
        inode yet): a walk then asks no engine's key for it."""
        index = self._index
        if index.loaded:
            return True
        ino = st.st_ino % _INODE_BITS
        return bool(index.recorded[ino >> 3] & 1 << (ino & 7))

    def not_scanned(self, engine: str, version: str, limits: str, st: os.stat_result,
                    path: str | None = None) -> str:
        """Why ``engine`` at ``version`` with ``limits`` left this very file unread before (a limit of
        its own), or '' when it did not (or was never asked). ``path`` as for ``is_clean``."""
        unread = self._index.unread
        if not (version and limits and unread):
            return ""
        return unread.get(self._index.key(engine, version, st, path, limits), "")

    def claim(self, fd: int, st: os.stat_result | None = None) -> Claim | None:
        """Call before an engine reads ``fd``: what the verdict on what it reads may be stored under, or
        None when it may not be stored (a filesystem that may not date mmap writes, a change within the
        settle time, a writer anywhere, a status the store cannot hold: a time before 1678, an inode
        past 2**63; a time after now has not settled). ``st``: the descriptor's ``fstat`` when the caller
        has one (taken before this call: a change after it moves the timestamps, so the verdict is then
        kept under an identity the file no longer has)."""
        if st is None:
            try:
                st = os.fstat(fd)
            except OSError:
                return None
        if (not stat.S_ISREG(st.st_mode) or time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < self.settle_ns
                or min(st.st_mtime_ns, st.st_ctime_ns) < _INT64_MIN or st.st_ino > _INT64_MAX):
            return None
        # dates_mmap_writes() and then _has_writer(), inline: a claim is made for every file judged
        buf = getattr(_buffers, "statfs", None)
        if buf is None:
            buf = _buffers.statfs = _StatFs()
        if ((_fstatfs_local if os.major(st.st_dev) else _fstatfs)(fd, ctypes.byref(buf))
                or buf.f_type & 0xFFFFFFFF not in _DATED_FILESYSTEMS
                or _fcntl(fd, _F_SETSIG, _SIGURG) < 0 or _fcntl(fd, _F_SETLEASE, _F_RDLCK) < 0):
            return None
        _fcntl(fd, _F_SETLEASE, _F_UNLCK)  # should it fail, closing the descriptor drops it
        return Claim(st)

    def record_clean(self, engine: str, version: str, claim: Claim, path: str | None = None) -> None:
        """Remember a clean verdict, judged from what was read after ``claim()``: it counts at once, and
        a writer thread stores it within a second (``flush()`` writes what is pending now). ``path`` as
        for ``is_clean``."""
        if not version:
            return
        st = claim.stat
        self._index.mark(st.st_ino)  # the key is made and indexed later, by the first look-up or write
        self._queue((st.st_dev, st.st_ino, engine, b"" if path is None else _name(path), st.st_size,
                     st.st_mtime_ns, st.st_ctime_ns, version))

    def record_not_scanned(self, engine: str, version: str, limits: str, claim: Claim, path: str | None,
                           reason: str) -> None:
        """Remember that ``engine`` at ``version`` with ``limits`` left the file claimed by ``claim``
        unread, and why: an outcome the same bytes, version and limits always give (a size limit, not
        a time limit). ``path`` as for ``is_clean``."""
        if not (version and limits and reason):
            return
        st = claim.stat
        self._index.add_unread(self._index.key(engine, version, st, path, limits), st.st_ino, reason)
        dev, ino, size, mtime_ns, ctime_ns = identity(st)
        self._queue((dev, ino, engine, b"" if path is None else _name(path), size, mtime_ns, ctime_ns, version,
                     limits, reason))

    def _queue(self, row: tuple) -> None:
        """A row for the writer thread: 8 columns for a clean verdict, 10 (limits, reason) for a
        not-scanned outcome. A row, not the stat it is made from: up to ``_FLUSH_EVERY`` wait here, and
        a stat_result with its float times is six times larger (0.7 MB a batch; row 3's peak RSS)."""
        with self._pending_lock:
            pending = self._pending
            if len(pending) < _PENDING_MAX:  # beyond that the store is stuck: drop, rescan later
                pending.append(row)
            count = len(pending)
            if self._writer is None and not self._closing:
                self._writer = threading.Thread(target=self._write_behind, name="elkscan-verdicts",
                                                daemon=True)
                self._writer.start()
            elif count == _FLUSH_EVERY:  # woken once a batch: it checks the count itself before it waits
                self._wake.notify()
        if count >= _PENDING_MAX:  # the writer thread does not get its turn (a busy host): this thread writes
            self.flush()

    def _catch_up(self) -> None:
        """Index the verdicts queued since the last catch-up: a look-up that may need them (one on an
        inode a verdict was recorded on), or a write, makes their keys, in one go, so a worker's
        ``record_clean`` holds the GIL (which every other thread then waits for) only to queue a row."""
        with self._pending_lock:
            fresh = self._pending[self._indexed:]
            self._indexed = len(self._pending)
        self._index.add_rows(fresh)

    def _write_behind(self) -> None:
        """The writer thread: pending verdicts go to the store every ``_FLUSH_EVERY`` or every second,
        so no worker waits for SQLite's writes and checkpoints (and their fsync)."""
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or len(self._pending) >= _FLUSH_EVERY, _WRITE_EVERY)
                closing = self._closing
            self.flush()
            if closing:
                return

    def flush(self) -> None:
        """Write the pending verdicts in one transaction (kept for the next try when the store is busy)."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
            indexed, self._indexed = self._indexed, 0
        if not pending:
            return
        self._index.add_rows(pending[indexed:])

        # a statement for each engine, version and name length (digest or none): one or two a batch
        groups: dict[tuple[str, str, int], tuple[list, bytearray]] = {}
        unread = []
        for row in pending:
            if len(row) == 10:
                unread.append(row)
            else:
                dev, ino, engine, name, size, mtime_ns, ctime_ns, version = row
                rows, names = groups.setdefault((engine, version, len(name)), ([], bytearray()))
                rows.append((dev, ino, size, mtime_ns, ctime_ns))
                names += name
        statements = [(json.dumps(rows, separators=(",", ":")), bytes(names), engine, version, width)
                      for (engine, version, width), (rows, names) in groups.items()]

        def write(db: sqlite3.Connection) -> bool:
            with db:
                db.execute("BEGIN IMMEDIATE")
                for statement in statements:
                    db.execute(_INSERT_CLEAN, statement)
                db.executemany("INSERT OR REPLACE INTO not_scanned VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", unread)
            return True

        if not self._guarded(write, False) and self._db is not None:
            with self._pending_lock:
                kept = pending[:max(0, _PENDING_MAX - len(self._pending))]
                self._pending[:0] = kept
                self._indexed += len(kept)  # indexed above

    def __len__(self) -> int:
        return self._guarded(lambda db: db.execute("SELECT count(*) FROM clean").fetchone()[0], 0)

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
            writer = self._writer
        if writer is not None:
            writer.join(_CLOSE_WAIT)
        self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
