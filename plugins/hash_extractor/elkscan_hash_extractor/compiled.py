"""Compiled hash indexes: ``hashlist.py``'s tables laid out in one file, answered from a memory map.

A fleet verifier holds the full hash set (10 million signatures and more). Parsed from text, every
verifier process would hold its own copy; compiled once (``elkscan db hashes``) and mapped read-only,
the copy is the kernel's page cache, shared by every process that maps it.

Layout (little-endian; every section starts on an 8-byte boundary):

- header, 128 bytes: magic ``\\x89EHI\\r\\n\\x1a\\n``, format version, header size, number of tables,
  flags (0), file size, number of signatures, 56 reserved zero bytes, and the SHA-256 of the whole file
  with these last 32 bytes left out;
- one 160-byte directory entry per table (one per algorithm): algorithm code and digest width, whether
  some signature matches any size, signature count, distinct sizes, name blocks, then (offset, length)
  of its 8 sections;
- the sections: digests (sorted), sizes and signature numbers of the sorted entries (u32), the 16-bit
  prefix table (65,537 u32 entry indices), the distinct sizes by low byte (257 u32 offsets, then the
  u32 sizes), and the names in signature order, zlib-compressed in blocks of 64 (u64 offsets, then the
  blocks).

The file is untrusted until checked: ``parse_index`` checks the header, the digest, and every section
against the file size and its table's counts before any look-up, and raises HashListError otherwise.
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
import struct
import sys
import tempfile
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

from elkscan_core.errors import ElkscanError

from .hashlist import _NAMES_PER_BLOCK, _PREFIX_SLOTS, _SIZE_BUCKETS, ALGORITHMS, ANY_SIZE, HashListBuilder, \
    HashListError, _Pending, distinct_sizes, release_free_memory

MAGIC = b"\x89EHI\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIIIQQ56s32s")
ENTRY = struct.Struct("<BBBBIQQQ16Q")
SECTIONS = ("digests", "sizes", "order", "prefix", "size_offsets", "size_values", "block_offsets", "blocks")
_DIGEST_AT = HEADER.size - 32
_CODES = {"md5": 1, "sha1": 2, "sha256": 3}
_ALGORITHM_OF = {code: name for name, code in _CODES.items()}
REBUILD = "rebuild it with `elkscan db hashes`"

Buffer = Union[bytes, mmap.mmap]


def is_compiled(path: str) -> bool:
    """Does the file start with the compiled index's magic? (Whatever its name; False if unreadable.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, len(MAGIC), 0) == MAGIC
    finally:
        os.close(fd)


class MappedTable:
    """One algorithm's table answered straight from the file: ``find``, ``numbers`` and ``may_have`` as
    ``hashlist._Table``'s, on memoryview casts of the map."""

    __slots__ = ("buffer", "name_of", "width", "count", "any_size", "mapped", "base", "sizes", "order",
                 "offsets", "starts", "size_offsets", "size_values", "block_offsets", "blocks")

    def __init__(self, buffer: Buffer, view: memoryview, name_of: str, width: int, count: int,
                 any_size: bool, sections: Mapping[str, tuple[int, int]]) -> None:
        def cast(section: str, kind: str) -> memoryview:
            offset, length = sections[section]
            return view[offset:offset + length].cast(kind)

        self.buffer, self.name_of, self.width, self.count, self.any_size = buffer, name_of, width, count, any_size
        self.base = sections["digests"][0]
        self.sizes, self.order, self.offsets = cast("sizes", "I"), cast("order", "I"), cast("prefix", "I")
        self.starts: Optional[array] = None  # byte offsets of the prefixes, once the table is checked
        self.size_offsets, self.size_values = cast("size_offsets", "I"), cast("size_values", "I")
        self.block_offsets = cast("block_offsets", "Q")
        self.blocks = sections["blocks"][0]
        self.mapped = sum(length for _, length in sections.values())

    def may_have(self, size: int) -> bool:
        if self.any_size:
            return True
        bucket = size % _SIZE_BUCKETS
        low, high = self.size_offsets[bucket], self.size_offsets[bucket + 1]
        index = bisect.bisect_left(self.size_values, size, low, high)
        return index < high and self.size_values[index] == size

    def find(self, digest: bytes, size: int | None) -> list[str]:
        return [self.name(number) for number in self.numbers(digest, size)]

    def list_of(self, number: int) -> str:
        """Every signature here came from this compiled index (the lists it was built from are not kept)."""
        return self.name_of

    def numbers(self, digest: bytes, size: int | None) -> list[int]:
        slot = digest[0] << 8 | digest[1]
        starts = self.starts
        end = starts[slot + 1]
        position = self.buffer.find(digest, starts[slot], end)
        if position < 0:  # the common case, kept short
            return []
        width, base = self.width, self.base
        while position >= 0 and (position - base) % width:  # an unaligned hit spans two entries
            position = self.buffer.find(digest, position + 1, end)
        numbers = []
        index = (position - base) // width
        while position >= 0 and index < self.count and \
                self.buffer[base + index * width:base + (index + 1) * width] == digest:
            if size is None or self.sizes[index] in (size, ANY_SIZE):
                numbers.append(self.order[index])
            index += 1
        return numbers

    def name(self, number: int) -> str:
        block = number // _NAMES_PER_BLOCK
        if number >= self.count:
            raise HashListError(f"{self.name_of}: a signature number is out of range; {REBUILD}")
        start, end = self.block_offsets[block], self.block_offsets[block + 1]
        try:
            names = zlib.decompress(self.buffer[self.blocks + start:self.blocks + end]).split(b"\n")
            return names[number % _NAMES_PER_BLOCK].decode("utf-8", "replace")
        except (zlib.error, IndexError):
            raise HashListError(f"{self.name_of}: a block of signature names is corrupt; {REBUILD}") from None

    def memory(self) -> int:
        return 0  # everything is in the mapped file


def _corrupt(name: str, what: str) -> HashListError:
    return HashListError(f"{name} is not a usable compiled hash index ({what}): it is corrupt or "
                         f"truncated; {REBUILD}")


def _file_digest(read: Callable[[int, int], bytes], size: int) -> bytes:
    """SHA-256 of the file without the header's last 32 bytes (where it is kept)."""
    import hashlib  # here, not at import: it loads OpenSSL (docs/performance.md)

    hasher = hashlib.sha256(read(0, _DIGEST_AT))
    offset = HEADER.size
    while offset < size:
        chunk = read(offset, min(1 << 20, size - offset))
        if not chunk:
            break
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.digest()


def parse_index(buffer: Buffer, name: str,
                read: Optional[Callable[[int, int], bytes]] = None) -> tuple[str, dict[str, MappedTable]]:
    """Check a compiled index held in ``buffer`` (an mmap or bytes) and give its SHA-256 (hex) and its
    tables by algorithm. ``read(offset, length)`` reads the same bytes (the digest is checked through
    it, so checking a mapped file does not make it resident). HashListError names ``name`` and why."""
    size = len(buffer)
    if size < HEADER.size or buffer[:len(MAGIC)] != MAGIC:
        raise _corrupt(name, "no compiled index header")
    magic, version, header_size, tables, flags, file_size, signatures, reserved, digest = \
        HEADER.unpack(buffer[:HEADER.size])
    if version != FORMAT_VERSION:
        raise HashListError(f"{name} is a compiled hash index of format {version}; this elkscan reads "
                            f"format {FORMAT_VERSION}: {REBUILD} of this version")
    if sys.byteorder != "little":
        raise HashListError(f"{name}: compiled hash indexes are little-endian and this host is not; "
                            "load the text lists instead")
    if file_size != size:
        raise _corrupt(name, f"the header says {file_size} bytes, the file has {size}")
    if header_size != HEADER.size or flags or any(reserved) or not 1 <= tables <= len(_CODES):
        raise _corrupt(name, "bad header fields")
    reader = read or (lambda offset, length: bytes(buffer[offset:offset + length]))
    if _file_digest(reader, size) != digest:
        raise _corrupt(name, "its SHA-256 is not the one its header records")
    view = memoryview(buffer)
    found: dict[str, MappedTable] = {}
    total = 0
    for number in range(tables):
        at = HEADER.size + number * ENTRY.size
        if at + ENTRY.size > size:
            raise _corrupt(name, f"table {number}'s entry is past the end")
        table = _parse_entry(buffer, view, name, ENTRY.unpack(buffer[at:at + ENTRY.size]),
                             HEADER.size + tables * ENTRY.size)
        if table.name_of in found:
            raise _corrupt(name, f"two {table.name_of} tables")
        found[table.name_of] = table
        total += table.count
    if total != signatures:
        raise _corrupt(name, f"the header counts {signatures} signatures, the tables {total}")
    for table in found.values():
        table.name_of = name
    return digest.hex(), found


def _parse_entry(buffer: Buffer, view: memoryview, name: str, entry: tuple, data_start: int) -> MappedTable:
    code, width, any_size, pad, reserved, count, distinct, blocks, *places = entry
    algorithm = _ALGORITHM_OF.get(code)
    if algorithm is None or ALGORITHMS[algorithm] != width or pad or reserved or any_size > 1:
        raise _corrupt(name, f"unknown table (algorithm {code}, width {width})")
    if not 0 < count < 1 << 32 or distinct > count or blocks != -(-count // _NAMES_PER_BLOCK):
        raise _corrupt(name, f"{algorithm}: inconsistent counts")
    expected = {"digests": count * width, "sizes": 4 * count, "order": 4 * count,
                "prefix": 4 * (_PREFIX_SLOTS + 1), "size_offsets": 4 * (_SIZE_BUCKETS + 1),
                "size_values": 4 * distinct, "block_offsets": 8 * (blocks + 1), "blocks": None}
    sections = {}
    for section, offset, length in zip(SECTIONS, places[0::2], places[1::2]):
        if offset % 8 or offset < data_start or offset + length > len(buffer) or \
                expected[section] not in (None, length):
            raise _corrupt(name, f"{algorithm}: section {section} is out of place")
        sections[section] = (offset, length)
    table = MappedTable(buffer, view, algorithm, width, count, bool(any_size), sections)
    prefix = _check_ascending(name, f"{algorithm} prefix table", table.offsets, count)
    table.starts = array("Q", (table.base + index * width for index in prefix))  # 0.5 MB, private
    _check_ascending(name, f"{algorithm} size table", table.size_offsets, distinct)
    _check_ascending(name, f"{algorithm} name blocks", table.block_offsets, sections["blocks"][1])
    return table


def _check_ascending(name: str, what: str, offsets: memoryview, last: int) -> list[int]:
    values = offsets.tolist()
    if values[0] != 0 or values[-1] != last or any(a > b for a, b in zip(values, values[1:])):
        raise _corrupt(name, f"{what} out of order")
    return values


def open_index(path: str) -> tuple[str, dict[str, MappedTable]]:
    """Map a compiled index read-only and check it (``parse_index``); the map lives as long as the
    tables do. Random access is advised: a look-up touches one page of digests, not its neighbours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise HashListError(f"cannot read hash list {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HashListError(f"compiled hash index {path} is not a regular file")
        if st.st_size < HEADER.size:
            raise _corrupt(path, "no compiled index header")
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        return parse_index(mapped, path, lambda offset, length: os.pread(fd, length, offset))
    except OSError as exc:
        raise HashListError(f"cannot read compiled hash index {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def compile_lists(sources: Sequence[str], output: str) -> dict:
    """``elkscan db hashes``: parse the hash lists ``sources`` and write them as one index at
    ``output``; says how many signatures of each algorithm, the lines skipped, and the file's SHA-256.
    A source that is a compiled index already, or holds no valid line, is an ElkscanError."""
    builder = HashListBuilder()
    try:
        for path in sources:
            if is_compiled(path):
                raise ElkscanError(f"{path} is already a compiled hash index: pass the lists it was "
                                   "compiled from")
            builder.add_file(path)
        pending = builder.take_pending()
        counts = {algorithm: len(table.sizes) for algorithm, table in pending.items()}
        sha256 = write_index(pending, output)
    except HashListError as exc:
        raise ElkscanError(str(exc)) from None
    return {"signatures": counts, "skipped": builder.problems, "sha256": sha256}


def _align(offset: int) -> int:
    return -(-offset // 8) * 8


def write_index(pending: Mapping[str, _Pending], output: str, mode: int = 0o644) -> str:
    """Write the parsed signatures as a compiled index at ``output``, atomically (a temporary file in
    the same directory, fsync, rename, fsync of the directory); returns the file's SHA-256 (hex).

    Sorting goes one first-byte bucket at a time, each written where it belongs, so the build holds
    the parsed signatures and one bucket's keys, never a second sorted copy."""
    if not pending:
        raise HashListError("no hash signature to compile")
    directory = os.path.dirname(os.path.abspath(output))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", dir=directory)
    try:
        os.fchmod(fd, mode)
        _write_tables(fd, pending)
        size = os.fstat(fd).st_size
        os.pwrite(fd, _file_digest(lambda offset, length: os.pread(fd, length, offset), size), _DIGEST_AT)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, output)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    release_free_memory()
    import hashlib

    hasher = hashlib.sha256()
    with open(output, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _write_tables(fd: int, pending: Mapping[str, _Pending]) -> None:
    entries, offset = [], _align(HEADER.size + len(pending) * ENTRY.size)
    for algorithm, table in pending.items():
        table.seal()
        buckets = table.sorted_buckets()
        count, width = len(table.sizes), table.width
        by_size = distinct_sizes(table.sizes)
        size_offsets = array("Q", [0])  # Q while summing; written as I
        for values in by_size:
            size_offsets.append(size_offsets[-1] + len(values))
        block_offsets = array("Q", [0])
        for block in table.blocks:
            block_offsets.append(block_offsets[-1] + len(block))
        lengths = {"digests": count * width, "sizes": 4 * count, "order": 4 * count,
                   "prefix": 4 * (_PREFIX_SLOTS + 1), "size_offsets": 4 * (_SIZE_BUCKETS + 1),
                   "size_values": 4 * size_offsets[-1], "block_offsets": 8 * len(block_offsets),
                   "blocks": block_offsets[-1]}
        places = {}
        for section in SECTIONS:
            places[section] = (offset, lengths[section])
            offset = _align(offset + lengths[section])
        entries.append((algorithm, table, buckets, by_size, size_offsets, block_offsets, places))
    os.ftruncate(fd, offset)
    directory = b""
    total = 0
    for algorithm, table, buckets, by_size, size_offsets, block_offsets, places in entries:
        count, width = len(table.sizes), table.width
        prefix = _write_sorted(fd, table, buckets, places)
        os.pwrite(fd, prefix.tobytes(), places["prefix"][0])
        os.pwrite(fd, array("I", size_offsets).tobytes(), places["size_offsets"][0])
        at = places["size_values"][0]
        for values in by_size:
            os.pwrite(fd, values.tobytes(), at)
            at += 4 * len(values)
        os.pwrite(fd, block_offsets.tobytes(), places["block_offsets"][0])
        at = places["blocks"][0]
        for block in table.blocks:
            os.pwrite(fd, block, at)
            at += len(block)
        directory += ENTRY.pack(_CODES[algorithm], width, table.any_size, 0, 0, count, size_offsets[-1],
                                len(table.blocks), *(value for section in SECTIONS for value in places[section]))
        total += count
    header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER.size, len(entries), 0, offset, total, bytes(56), bytes(32))
    os.pwrite(fd, header + directory, 0)


def _write_sorted(fd: int, table: _Pending, buckets, places: Mapping[str, tuple[int, int]]) -> array:
    """Stream the sorted digests, their sizes and signature numbers to their sections; returns the
    prefix table (entry index where each 16-bit prefix starts)."""
    width, digests, sizes = table.width, table.digests, table.sizes
    counts = array("I", bytes(4 * _PREFIX_SLOTS))
    done = 0
    for first, numbers in enumerate(buckets):
        chunk = b"".join(digests[n * width:(n + 1) * width] for n in numbers)
        os.pwrite(fd, chunk, places["digests"][0] + done * width)
        os.pwrite(fd, array("I", (sizes[n] for n in numbers)).tobytes(), places["sizes"][0] + 4 * done)
        os.pwrite(fd, numbers.tobytes(), places["order"][0] + 4 * done)
        for second, seen in Counter(chunk[1::width]).items():
            counts[first << 8 | second] = seen
        done += len(numbers)
    prefix = array("I", [0])
    for seen in counts:
        prefix.append(prefix[-1] + seen)
    return prefix
