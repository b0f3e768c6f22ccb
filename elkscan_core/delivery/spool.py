"""A bounded on-disk queue of documents for one sink: what it accepted survives an outage and a restart.

The spool is a private directory (0700, trusted as in ``elkscan_core.trust``) holding
- segments ``<16 digits>.seg``: append-only, created 0600 with ``O_NOFOLLOW``, one frame per document;
- ``acked``: where delivery stopped (``elkscan-spool 1 <segment> <offset>``, one line of fixed length
  rewritten in place: a rename per batch costs milliseconds on ext4);
- ``lock``: held (``flock``) while a session uses the spool: two never share one.

A frame is one line: ``<crc32> <length> <id> <payload>\\n`` (CRC-32 and length of the payload as 8 hex
digits each; the CRC covers the id, a space and the payload). A payload is one JSON document, never a
newline. A write torn by a crash (or a power loss) leaves a line that does not check out: it is skipped
and counted, and the reader goes on at the next newline; a torn end of the last segment is cut off when
the spool is opened, so nothing is appended after garbage.

Each document is appended once, by ``append``; the sender reads batches from the acknowledged position
on (``read``) and, once they are delivered, moves it past them (``ack``): a restart resumes exactly where
delivery stopped, redelivering at most the batch that was in flight (at-least-once). When a document
would take the spool past ``max_size``, the oldest segment is dropped, delivered or not, and the drop is
counted (``dropped``) for the caller to report.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
import threading
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import attrs

from ..trust import check_trusted

log = logging.getLogger("elkscan.delivery")

_SEGMENT = re.compile(r"([0-9]{16})\.seg")
_FRAME = re.compile(rb"([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9A-Za-z._-]{0,64}) ")
_ID = re.compile(r"[0-9A-Za-z._-]{0,64}")
_ACK = re.compile(r"elkscan-spool 1 ([0-9]{16}) ([0-9]{19})\n")
ACK_FILE = "acked"
LOCK_FILE = "lock"
#: Largest segment: the unit dropped when the spool is full is at most this (and at most an eighth of it).
MAX_SEGMENT = 16 << 20
_READ_CHUNK = 128 << 10
_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW


class Item(NamedTuple):
    """One spooled document: the record's ``id`` and its ``data`` (one document, bytes, no newline)."""

    id: str
    data: bytes


@attrs.frozen(order=True)
class Position:
    """A place in the spool: a segment, a byte offset in it, and how many documents come before it in
    that segment (not part of the order)."""

    segment: int
    offset: int
    index: int = attrs.field(default=0, order=False, eq=False)


def frame(item_id: str, data: bytes) -> bytes:
    """One framed line for ``data`` (which holds no newline) under ``item_id``."""
    ident = item_id.encode("ascii")
    return b"%08x %08x %s %s\n" % (zlib.crc32(ident + b" " + data), len(data), ident, data)


def parse_frames(data: bytes) -> Iterator[tuple[Item | None, int]]:
    """Each complete line of ``data`` as ``(item, end)``: the item, or None for a line that does not
    check out (torn, damaged), and the offset just past its newline. A last line without a newline is
    incomplete: not yielded."""
    start = 0
    while True:
        newline = data.find(b"\n", start)
        if newline < 0:
            return
        match = _FRAME.match(data, start, newline)
        item = None
        if match is not None:
            ident, payload = match[3], data[match.end():newline]
            if len(payload) == int(match[2], 16) and zlib.crc32(payload, zlib.crc32(ident + b" ")) == int(match[1], 16):
                item = Item(ident.decode("ascii"), payload)
        start = newline + 1
        yield item, start


def private_dir(path: str, what: str) -> str:
    """``path`` as a directory only this user can enter (0700), every directory above it trusted; created
    if missing. Raises ``UntrustedError`` (another user could read or forge what it holds) or OSError."""
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_trusted(path, what)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{what} {path} is not a directory")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)  # ours (checked): records must not be readable by others either
    return path


@attrs.define
class _Segment:
    size: int = 0
    records: int = 0


class Spool:
    """The spool of one sink. ``append`` (the sink's writer) and ``read``/``ack`` (its sender) may run
    on different threads."""

    def __init__(self, directory: str, max_size: int, name: str = "delivery") -> None:
        self.directory = private_dir(directory, f"{name}: spool")
        self.name = name
        self.max_size = max_size
        self.segment_size = max(1, min(max_size // 8, MAX_SEGMENT))
        self.dropped = 0  # documents dropped, unsent, because the spool was full
        self.damaged = 0  # lines that did not check out (torn or damaged writes), skipped
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._ack = Position(0, 0)
        self._cursor = Position(0, 0)
        self._fd: int | None = None  # the last segment, open for appending
        self._dirty = False
        self._closed = False
        self._lock_fd = os.open(os.path.join(self.directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | _OPEN, 0o600)
        self._ack_fd = -1
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._ack_fd = os.open(os.path.join(self.directory, ACK_FILE), os.O_RDWR | os.O_CREAT | _OPEN, 0o600)
            self._load()
        except BaseException:
            for fd in (self._lock_fd, self._ack_fd, self._fd):
                if fd is not None and fd >= 0:
                    os.close(fd)
            raise

    # -- opening -------------------------------------------------------------------------------

    def _path(self, segment: int) -> str:
        return os.path.join(self.directory, f"{segment:016d}.seg")

    def _load(self) -> None:
        numbers = sorted(int(m[1]) for m in map(_SEGMENT.fullmatch, os.listdir(self.directory)) if m)
        for number in numbers:
            self._segments[number] = self._scan(number, last=number == numbers[-1])
        ack = self._read_ack()
        first = numbers[0] if numbers else 0
        if ack is None or ack.segment < first or ack.segment not in self._segments:
            ack = Position(first, 0)
        elif ack.offset > self._segments[ack.segment].size:
            log.warning("%s: spool %s: the acknowledged offset is past the end of its segment; redelivering "
                        "that segment", self.name, self.directory)
            ack = Position(ack.segment, 0)
        self._ack = self._cursor = attrs.evolve(ack, index=self._count(ack))
        last = numbers[-1] if numbers else 0
        self._segments.setdefault(last, _Segment())
        self._fd = os.open(self._path(last), os.O_WRONLY | os.O_APPEND | os.O_CREAT | _OPEN, 0o600)
        self._drop_delivered()
        self._write_ack()
        os.ftruncate(self._ack_fd, len(self._ack_line()))

    def _scan(self, number: int, last: bool) -> _Segment:
        """Count a segment's frames; cut a torn end off the last one (a crash in the middle of a write)."""
        segment, good_end, damaged = _Segment(), 0, 0
        fd = os.open(self._path(number), (os.O_RDWR if last else os.O_RDONLY) | _OPEN)
        try:
            size = os.fstat(fd).st_size
            for data, base in _chunks(fd, 0, size):
                for item, end in parse_frames(data):
                    if item is None:
                        damaged += 1
                    else:
                        segment.records += 1
                        good_end = base + end
            if last and good_end < size:
                log.warning("%s: spool %s: cut %d bytes of a write torn by a crash off segment %d",
                            self.name, self.directory, size - good_end, number)
                os.ftruncate(fd, good_end)
                size = good_end
        finally:
            os.close(fd)
        segment.size = size
        if damaged:
            log.warning("%s: spool %s: segment %d holds %d damaged line(s); they are skipped", self.name,
                        self.directory, number, damaged)
        return segment

    def _read_ack(self) -> Position | None:
        text = os.pread(self._ack_fd, 256, 0).decode("ascii", "replace")
        if not text:
            return None  # a new spool
        match = _ACK.fullmatch(text)
        if match is None:
            log.warning("%s: spool %s: %s is damaged; delivering the whole spool again", self.name,
                        self.directory, ACK_FILE)
            return None
        return Position(int(match[1]), int(match[2]))

    def _count(self, position: Position) -> int:
        """Frames of ``position``'s segment before its offset."""
        if position.offset == 0:
            return 0
        count = 0
        fd = os.open(self._path(position.segment), os.O_RDONLY | _OPEN)
        try:
            for data, base in _chunks(fd, 0, position.offset):
                count += sum(item is not None for item, _ in parse_frames(data))
        finally:
            os.close(fd)
        return count

    # -- the writer ----------------------------------------------------------------------------

    def append(self, item_id: str, data: bytes) -> bool:
        """Add one document; False when it alone is larger than the spool (it is dropped and counted).
        When full, the oldest segment goes first, delivered or not (counted in ``dropped``)."""
        if b"\n" in data or not _ID.fullmatch(item_id):
            raise ValueError("a spooled document holds no newline, and its id is at most 64 of [0-9A-Za-z._-]")
        line = frame(item_id, data)
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.name}: spool is closed")
            last = max(self._segments)
            if self._segments[last].size and self._segments[last].size + len(line) > self.segment_size:
                last = self._roll(last)
            while self._total() + len(line) > self.max_size and len(self._segments) > 1:
                self._drop_oldest()
            if self._total() + len(line) > self.max_size:
                self.dropped += 1
                return False
            try:
                _write_all(self._fd, line)
            except OSError:  # a full disk: take back what part of it went out, or it would tear the next
                os.ftruncate(self._fd, self._segments[last].size)
                raise
            self._segments[last].size += len(line)
            self._segments[last].records += 1
            self._dirty = True
        return True

    def _roll(self, last: int) -> int:
        fd = os.open(self._path(last + 1), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | _OPEN, 0o600)
        os.fsync(self._fd)  # the finished segment is on disk before the next one exists
        os.close(self._fd)
        self._fd, self._dirty = fd, False
        self._segments[last + 1] = _Segment()
        return last + 1

    def _drop_oldest(self) -> None:
        oldest = min(self._segments)
        segment = self._segments.pop(oldest)
        lost = segment.records - (self._ack.index if oldest == self._ack.segment else 0)
        if oldest >= self._ack.segment:
            self.dropped += lost
            self._ack = Position(min(self._segments), 0)
            self._write_ack()
        if self._cursor.segment <= oldest:
            self._cursor = Position(min(self._segments), 0)
        os.unlink(self._path(oldest))

    def _total(self) -> int:
        return sum(s.size for s in self._segments.values())

    # -- the sender ----------------------------------------------------------------------------

    def read(self, limit: int) -> tuple[list[Item], Position]:
        """Up to ``limit`` documents from where the last ``read`` ended, and the position after them."""
        items: list[Item] = []
        with self._lock:
            cursor = self._cursor
            if self._closed:  # a sender left behind by close() sends nothing more
                return items, cursor
            if cursor.segment not in self._segments:  # dropped while full
                cursor = Position(min(s for s in self._segments if s > cursor.segment), 0)
            ends = {n: s.size for n, s in self._segments.items() if n >= cursor.segment}
        for number in sorted(ends):
            if number != cursor.segment:
                cursor = Position(number, 0)
            try:
                fd = os.open(self._path(number), os.O_RDONLY | _OPEN)
            except FileNotFoundError:  # dropped meanwhile
                continue
            try:
                cursor = self._read_segment(fd, cursor, ends[number], items, limit)
            finally:
                os.close(fd)
            if len(items) == limit:
                break
        with self._lock:
            self._cursor = max(cursor, self._cursor)
        return items, cursor

    def _read_segment(self, fd: int, cursor: Position, end: int, items: list[Item], limit: int) -> Position:
        """Append to ``items`` the documents of one segment from ``cursor`` until ``end`` or ``limit``."""
        index = cursor.index
        for data, base in _chunks(fd, cursor.offset, end):
            for item, stop in parse_frames(data):
                if item is None:
                    self.damaged += 1
                    continue
                items.append(item)
                index += 1
                if len(items) == limit:
                    return Position(cursor.segment, base + stop, index)
        return Position(cursor.segment, end, index)

    def rewind(self) -> None:
        """Read again from the acknowledged position (after a batch could not be delivered)."""
        with self._lock:
            self._cursor = self._ack

    def ack(self, position: Position) -> None:
        """What was read up to ``position`` was delivered: never deliver it again."""
        with self._lock:
            if self._closed or position <= self._ack:
                return  # dropped meanwhile, or already acknowledged
            self._ack = position
            self._drop_delivered()
            self._write_ack()

    def _drop_delivered(self) -> None:
        """Delete segments wholly delivered (every one before the acknowledged one, and that one too once
        it is complete and delivered to its end)."""
        ack = self._ack
        if ack.offset == self._segments[ack.segment].size and ack.segment != max(self._segments):
            ack = self._ack = Position(ack.segment + 1, 0)
            self._segments.setdefault(ack.segment, _Segment())
        for number in [n for n in self._segments if n < ack.segment]:
            del self._segments[number]
            try:
                os.unlink(self._path(number))
            except FileNotFoundError:
                pass

    def _ack_line(self) -> bytes:
        return b"elkscan-spool 1 %016d %019d\n" % (self._ack.segment, self._ack.offset)

    def _write_ack(self, sync: bool = False) -> None:
        """Rewrite the acknowledged position in place (one write of under 64 bytes: whole or not at all
        when the process dies; a power loss that tears it makes the next start redeliver, not lose)."""
        os.pwrite(self._ack_fd, self._ack_line(), 0)
        if sync:
            os.fsync(self._ack_fd)

    # -- state ---------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Documents not delivered yet."""
        with self._lock:
            return sum(s.records for n, s in self._segments.items() if n >= self._ack.segment) \
                - self._ack.index

    @property
    def size(self) -> int:
        with self._lock:
            return self._total()

    def sync(self) -> None:
        """Put what was appended and acknowledged on disk (a power loss then loses none of it)."""
        with self._lock:
            if self._closed:
                return
            if self._dirty:
                os.fsync(self._fd)
                self._dirty = False
            self._write_ack(sync=True)

    def close(self) -> None:
        self.sync()
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
                os.close(self._ack_fd)
                os.close(self._lock_fd)


def _chunks(fd: int, start: int, end: int) -> Iterator[tuple[bytes, int]]:
    """``fd``'s bytes from ``start`` to ``end`` in pieces that end on a newline, each with its offset;
    a line longer than a chunk is read whole."""
    offset, chunk = start, _READ_CHUNK
    while offset < end:
        data = os.pread(fd, min(chunk, end - offset), offset)
        if not data:
            return
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if offset + len(data) >= end:
                yield data, offset  # an incomplete last line: parse_frames leaves it
                return
            chunk *= 2  # one line longer than the chunk
            continue
        yield data[:cut], offset
        offset += cut
        chunk = _READ_CHUNK


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
