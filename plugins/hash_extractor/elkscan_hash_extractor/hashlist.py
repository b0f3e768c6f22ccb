"""Hash lists: whole-file digest signatures, loaded into a compact in-memory index.

Accepted lines (blank lines and lines starting with ``#`` are skipped):

- elkscan's hash list (docs/bundles.md): ``<algo>:<hex digest>:<size or *>:<name>``, algo ``md5``,
  ``sha1`` or ``sha256``;
- ClamAV ``.hdb`` / ``.hsb``: ``<hex digest>:<size or *>:<name>[:<flevel>...]``, the algorithm told by
  the digest's length (32 MD5, 40 SHA-1, 64 SHA-256).

The index keeps, per algorithm, every digest in one sorted byte string (a 16-bit prefix table narrows
a look-up to a few entries, found by ``bytes.find`` at C speed), sizes and signature numbers in
``array``s of 32-bit unsigned integers, the distinct sizes in sorted arrays (so a file whose size no
signature has is never hashed), and the names zlib-compressed in blocks of 64 in file order,
decompressed only on a match. A million MD5 signatures take about 35 MB (see bench/README.md).
``compiled.py`` lays the same tables out in a file that processes map and share.
"""

from __future__ import annotations

import bisect
import ctypes
import zlib
from array import array
from collections.abc import Iterable, Iterator

#: Digest widths in bytes, by hashlib name.
ALGORITHMS = {"md5": 16, "sha1": 20, "sha256": 32}
_BY_HEX_LENGTH = {2 * width: name for name, width in ALGORITHMS.items()}
#: Size value of a signature that matches a file of any size (``*``).
ANY_SIZE = 0xFFFFFFFF
_NAMES_PER_BLOCK = 64
_PREFIX_SLOTS = 1 << 16
_SIZE_BUCKETS = 256


class HashListError(ValueError):
    """A hash list that cannot be used at all (unreadable, or without one valid line)."""


class _Table:
    """Every signature of one algorithm: sorted digests, their sizes, and names by signature number."""

    __slots__ = ("width", "digests", "sizes", "order", "offsets", "size_buckets", "any_size", "blocks",
                 "count", "lists", "starts")

    def __init__(self, width: int, digests: bytearray, sizes: array, order: array, blocks: list[bytes],
                 any_size: bool, lists: list[tuple[int, str]] = ()) -> None:
        self.width = width
        self.digests = digests      # sorted, ``width`` bytes each
        self.sizes = sizes          # size of each sorted entry, or ANY_SIZE
        self.order = order          # signature number (in file order) of each sorted entry
        self.blocks = blocks        # names in file order, zlib-compressed in blocks
        self.count = len(sizes)
        self.any_size = any_size
        offsets = array("I", bytes(4 * (_PREFIX_SLOTS + 1)))
        for start in range(0, len(digests), width):
            offsets[(digests[start] << 8 | digests[start + 1]) + 1] += width
        for slot in range(1, _PREFIX_SLOTS + 1):
            offsets[slot] += offsets[slot - 1]
        self.offsets = offsets  # digests starting with bytes p are digests[offsets[p]:offsets[p + 1]]
        self.size_buckets = distinct_sizes(sizes)
        self.lists = [path for _, path in lists]  # the file each run of signature numbers came from
        self.starts = [start for start, _ in lists]

    def may_have(self, size: int) -> bool:
        """Could a file of ``size`` bytes match any signature here? (No hashing when not.)"""
        if self.any_size:
            return True
        sizes = self.size_buckets[size % _SIZE_BUCKETS]
        index = bisect.bisect_left(sizes, size)
        return index < len(sizes) and sizes[index] == size

    def find(self, digest: bytes, size: int | None) -> list[str]:
        """Names of the signatures with this digest whose size is ``size`` or any (every size when
        ``size`` is None: not known)."""
        return [self.name(number) for number in self.numbers(digest, size)]

    def numbers(self, digest: bytes, size: int | None) -> list[int]:
        """Signature numbers (in file order) of the signatures ``find`` names."""
        slot = digest[0] << 8 | digest[1]
        offsets = self.offsets
        position = self.digests.find(digest, offsets[slot], offsets[slot + 1])
        if position < 0:  # the common case, kept short
            return []
        return self._numbers_from(position, digest, size)

    def _numbers_from(self, position: int, digest: bytes, size: int | None) -> list[int]:
        width, blob, end = self.width, self.digests, self.offsets[(digest[0] << 8 | digest[1]) + 1]
        while position >= 0 and position % width:  # an unaligned hit spans two entries: not one
            position = blob.find(digest, position + 1, end)
        numbers = []
        index = position // width
        while position >= 0 and index < self.count and blob[index * width:(index + 1) * width] == digest:
            if size is None or self.sizes[index] in (size, ANY_SIZE):
                numbers.append(self.order[index])
            index += 1
        return numbers

    def list_of(self, number: int) -> str:
        """The hash-list file signature ``number`` came from."""
        return self.lists[bisect.bisect_right(self.starts, number) - 1] if self.lists else ""

    def name(self, number: int) -> str:
        block = zlib.decompress(self.blocks[number // _NAMES_PER_BLOCK])
        return block.split(b"\n")[number % _NAMES_PER_BLOCK].decode("utf-8", "replace")

    def memory(self) -> int:
        """Bytes held by the table's buffers (what the 40 MB target is about)."""
        arrays = [self.sizes, self.order, self.offsets, *self.size_buckets]
        return (len(self.digests) + sum(a.itemsize * len(a) for a in arrays)
                + sum(len(block) for block in self.blocks))


def distinct_sizes(sizes: Iterable[int]) -> list[array]:
    """The distinct sizes (``*`` left out), sorted, split by their low byte: exact, searched by C
    bisect, and built without ever holding all sizes as Python integers at once."""
    buckets: list[array] = [array("I") for _ in range(_SIZE_BUCKETS)]
    for size in sizes:
        if size != ANY_SIZE:
            buckets[size % _SIZE_BUCKETS].append(size)
    return [array("I", sorted(set(bucket))) for bucket in buckets]


class HashIndex:
    """Read-only look-ups over the tables of all loaded lists; safe to share between threads.

    ``tables`` holds, per algorithm, one table per source: the one built from text lists and one per
    compiled index file (``compiled.py``), which answers from its memory map."""

    def __init__(self, tables: dict[str, list], digest: str = "") -> None:
        self.tables = tables
        self.digest = digest  # SHA-256 of the lists' contents: the engine's version

    def __len__(self) -> int:
        return sum(table.count for tables in self.tables.values() for table in tables)

    def algorithms_for(self, size: int) -> list[str]:
        """The algorithms worth computing for a file of ``size`` bytes (empty: do not hash it)."""
        return [name for name, tables in self.tables.items() if any(t.may_have(size) for t in tables)]

    def lookup(self, algorithm: str, digest: bytes, size: int | None) -> list[str]:
        """Names of the signatures of ``algorithm`` with this raw digest and ``size`` (or any size: ``*``,
        and every signature when ``size`` is None)."""
        tables = self.tables.get(algorithm, ())
        if len(tables) == 1:
            return tables[0].find(digest, size)
        return [name for table in tables for name in table.find(digest, size)]

    def matches(self, algorithm: str, digest: bytes, size: int | None) -> list[tuple[str, str]]:
        """``lookup``'s signatures with the list file each came from: (name, list)."""
        return [(table.name(number), table.list_of(number)) for table in self.tables.get(algorithm, ())
                for number in table.numbers(digest, size)]

    def memory(self) -> int:
        """Bytes of heap the tables hold (a compiled index's mapped file is not counted)."""
        return sum(table.memory() for tables in self.tables.values() for table in tables)

    def mapped(self) -> int:
        """Bytes of compiled index files mapped (shared with every process that maps them)."""
        return sum(getattr(table, "mapped", 0) for tables in self.tables.values() for table in tables)


class _Pending:
    """Signatures of one algorithm as parsed, before sorting; names are compressed as they come."""

    __slots__ = ("width", "digests", "sizes", "blocks", "names", "any_size", "lists")

    def __init__(self, width: int) -> None:
        self.width = width
        self.digests = bytearray()
        self.sizes = array("I")
        self.blocks: list[bytes] = []
        self.names: list[bytes] = []
        self.any_size = False
        self.lists: list[tuple[int, str]] = []  # (first signature number, the file it and those after came from)

    def add(self, digest: bytes, size: int, name: bytes, path: str = "") -> None:
        if not self.lists or self.lists[-1][1] != path:
            self.lists.append((len(self.sizes), path))
        self.digests += digest
        self.sizes.append(size)
        self.any_size = self.any_size or size == ANY_SIZE
        self.names.append(name)
        if len(self.names) == _NAMES_PER_BLOCK:
            self.seal()

    def seal(self) -> None:
        """Compress the names not yet in a block (the last block may hold fewer than 64)."""
        if self.names:
            self.blocks.append(zlib.compress(b"\n".join(self.names), 9))
            self.names = []

    def sorted_buckets(self) -> Iterator[array]:
        """Signature numbers in digest order, one first-byte bucket at a time, so only one bucket's
        sort keys exist at once (the compiled writer streams them to its file the same way)."""
        self.seal()
        width, digests = self.width, self.digests
        buckets: list[array] = [array("I") for _ in range(256)]
        for number in range(len(self.sizes)):
            buckets[digests[number * width]].append(number)
        for first in range(256):
            bucket, buckets[first] = buckets[first], array("I")
            yield array("I", sorted(bucket, key=lambda n: digests[n * width:(n + 1) * width]))

    def table(self) -> _Table:
        width, digests, sizes = self.width, self.digests, self.sizes
        out_digests, out_sizes, order = bytearray(), array("I"), array("I")
        for numbers in self.sorted_buckets():
            for number in numbers:
                out_digests += digests[number * width:(number + 1) * width]
                out_sizes.append(sizes[number])
            order.extend(numbers)
        return _Table(width, out_digests, out_sizes, order, self.blocks, self.any_size, self.lists)


class HashListBuilder:
    """Parses hash-list files into a ``HashIndex``, collecting what it had to skip and why."""

    def __init__(self) -> None:
        import hashlib  # here, not at import: it loads OpenSSL (docs/performance.md)

        self._pending: dict[str, _Pending] = {}
        self._fingerprint = hashlib.sha256()
        #: ``(path, line number, reason)`` of every line skipped as malformed.
        self.problems: list[tuple[str, int, str]] = []

    def add_file(self, path: str) -> int:
        """Parse one file; returns the number of signatures it gave.

        Raises HashListError when the file cannot be read, or has lines but not one valid signature
        (probably not a hash list at all); a file with some bad lines keeps its good ones.
        """
        added, bad = 0, []
        try:
            with open(path, "rb") as stream:
                for number, raw in enumerate(stream, 1):
                    self._fingerprint.update(raw)
                    line = raw.strip()
                    if not line or line.startswith(b"#"):
                        continue
                    try:
                        algorithm, digest, size, name = parse_line(line)
                    except ValueError as exc:
                        bad.append((path, number, str(exc)))
                        continue
                    pending = self._pending.get(algorithm)
                    if pending is None:
                        pending = self._pending[algorithm] = _Pending(ALGORITHMS[algorithm])
                    pending.add(digest, size, name, path)
                    added += 1
        except OSError as exc:
            raise HashListError(f"cannot read hash list {path}: {exc.strerror or exc}") from exc
        if bad and not added:
            _, number, reason = bad[0]
            raise HashListError(f"{path} holds no valid hash signature (line {number}: {reason}); expected "
                                "lines like 'md5:<32 hex digits>:<size or *>:<name>' or ClamAV .hdb/.hsb "
                                "lines '<hex digest>:<size or *>:<name>'")
        self.problems.extend(bad)
        return added

    def add_files(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.add_file(path)

    def build(self) -> HashIndex:
        tables = {name: [pending.table()] for name, pending in sorted(self._pending.items())}
        self._pending.clear()
        release_free_memory()
        return HashIndex(tables, self._fingerprint.hexdigest())

    def take_pending(self) -> dict[str, _Pending]:
        """The parsed signatures by algorithm, handed over (``compiled.write_index`` sorts them)."""
        pending, self._pending = dict(sorted(self._pending.items())), {}
        return pending

    @property
    def fingerprint(self) -> str:
        return self._fingerprint.hexdigest()


def release_free_memory() -> None:
    """Hand the heap the sort used back to the system (glibc keeps it otherwise): the scanner runs for
    months inside a small memory cgroup, and a rule update must not leave it tens of MB larger."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def parse_line(line: bytes) -> tuple[str, bytes, int, bytes]:
    """One signature line -> (algorithm, raw digest, size or ANY_SIZE, name); ValueError says why not."""
    fields = line.split(b":")
    head = fields[0].lower()
    if head in (b"md5", b"sha1", b"sha256"):  # elkscan: algo:digest:size:name (the name may hold ':')
        if len(fields) < 4:
            raise ValueError("expected <algo>:<hex digest>:<size or *>:<name>")
        algorithm = head.decode()
        hex_digest, size_field, name = fields[1], fields[2], b":".join(fields[3:])
        if len(hex_digest) != 2 * ALGORITHMS[algorithm]:
            raise ValueError(f"a {algorithm} digest has {2 * ALGORITHMS[algorithm]} hex digits, "
                             f"got {len(hex_digest)}")
    else:  # ClamAV .hdb/.hsb: digest:size:name[:flevel[:flevel]]
        if len(fields) < 3:
            raise ValueError("expected <hex digest>:<size or *>:<name> (ClamAV .hdb/.hsb) or "
                             "<algo>:<hex digest>:<size or *>:<name>")
        hex_digest, size_field, name = fields[0], fields[1], fields[2]
        if len(hex_digest) not in _BY_HEX_LENGTH:
            raise ValueError(f"a digest of {len(hex_digest)} hex digits is neither MD5 (32), SHA-1 (40) "
                             "nor SHA-256 (64)")
        algorithm = _BY_HEX_LENGTH[len(hex_digest)]
    try:
        digest = bytes.fromhex(hex_digest.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        digest = b""
    if len(digest) != ALGORITHMS[algorithm]:  # fromhex also skips spaces: check the width
        raise ValueError(f"digest {hex_digest[:80].decode('ascii', 'replace')!r} is not hexadecimal")
    name = name.strip()
    if not name:
        raise ValueError("the signature has no name")
    return algorithm, digest, parse_size(size_field), name


def parse_size(field: bytes) -> int:
    if field.strip() == b"*":
        return ANY_SIZE
    if not field.strip().isdigit():
        raise ValueError(f"size {field[:40].decode('ascii', 'replace')!r} is neither a number of bytes nor *")
    size = int(field)
    if size >= ANY_SIZE:
        raise ValueError(f"size {size} is beyond the 4 GiB files a hash list can describe")
    return size
