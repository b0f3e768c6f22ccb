"""The package index: for every file an installed package owns, which package and the digest it ships.

It must hold a whole distribution (``/usr`` alone has about 100,000 files) in little memory: a path is
kept as a 64-bit BLAKE2b hash of its canonical form, keyed with a secret drawn for each index, in one
sorted ``array``; beside it, per entry, the owning package's number and the digest (all digests padded
to the widest algorithm in use). That is 28 bytes a file for MD5 (dpkg). A look-up is a C bisect.

Since the key is secret, nobody can choose a path whose hash meets a packaged one; by chance, one
look-up in about 10^14 compares a file with another path's digest.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import os
from array import array

from attrs import frozen

#: Digest widths in bytes, by hashlib name.
ALGORITHMS = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}


@frozen
class Package:
    """An installed package, as a finding names it."""

    name: str
    version: str = ""
    arch: str = ""
    algorithm: str = "md5"


class Aliases:
    """Top-level directories that are symbolic links to other directories (usr-merge: ``/bin`` ->
    ``usr/bin``). A path through one is looked up under the directory it points to, so a package's
    ``bin/ls`` and a scan's ``/usr/bin/ls`` (or the other way round) are one file."""

    def __init__(self, mapping: dict[bytes, bytes]) -> None:
        self.mapping = mapping  # b"/bin/" -> b"/usr/bin/"

    @classmethod
    def of_root(cls) -> Aliases:
        mapping = {}
        for entry in os.scandir("/"):
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if target not in ("/", entry.path) and os.path.isdir(target):
                    mapping[os.fsencode(entry.path) + b"/"] = os.fsencode(target) + b"/"
        return cls(mapping)

    def canonical(self, path: bytes) -> bytes:
        end = path.find(b"/", 1)
        if end > 0:
            target = self.mapping.get(path[:end + 1])
            if target is not None:
                return target + path[end + 1:]
        return path


class PackageIndex:
    """Read-only look-ups, safe to share between threads; built by ``IndexBuilder``."""

    def __init__(self, keys: array, owners: array, digests: bytes, width: int, packages: list[Package],
                 salt: bytes, aliases: Aliases, digest: str) -> None:
        self.keys, self.owners, self.digests, self.width = keys, owners, digests, width
        self.packages, self.salt, self.aliases = packages, salt, aliases
        self.digest = digest  # SHA-256 of the database as read: the engine's version

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, path: str) -> list[tuple[Package, bytes]]:
        """The packages that ship the file at ``path`` (absolute), each with the digest it ships."""
        key = _key(self.salt, self.aliases.canonical(os.fsencode(path)))
        keys, position, found = self.keys, bisect.bisect_left(self.keys, key), []
        while position < len(keys) and keys[position] == key:
            package = self.packages[self.owners[position]]
            start = position * self.width
            found.append((package, self.digests[start:start + ALGORITHMS[package.algorithm]]))
            position += 1
        return found

    def memory(self) -> int:
        """Bytes held by the entries (what the memory measurement in the README is about)."""
        return len(self.keys) * self.keys.itemsize + len(self.owners) * self.owners.itemsize + len(self.digests)


def _key(salt: bytes, canonical: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8, key=salt).digest(), "little")


class IndexBuilder:
    """Collects packages and their files as a database reader finds them, then sorts them into a
    ``PackageIndex``. Paths given to ``add`` and ``exempt`` are absolute, as the files lie on disk."""

    def __init__(self, aliases: Aliases) -> None:
        self.aliases = aliases
        self.salt = os.urandom(16)
        self.packages: list[Package] = []
        self.fingerprint = hashlib.sha256(repr(sorted(aliases.mapping.items())).encode())
        self._keys = array("Q")
        self._owners = array("I")
        self._digests = bytearray()
        self._width = 16
        self._exempt: set[int] = set()
        #: ``(where, reason)`` of every entry skipped as malformed.
        self.problems: list[tuple[str, str]] = []

    def read(self, data: bytes) -> bytes:
        """Note bytes of the database that the index is built from (they make its version)."""
        self.fingerprint.update(len(data).to_bytes(8, "little"))
        self.fingerprint.update(data)
        return data

    def package(self, package: Package) -> int:
        self.packages.append(package)
        return len(self.packages) - 1

    def exempt(self, path: bytes) -> None:
        """A file never judged (a conffile: its owner expects it to be edited)."""
        self._exempt.add(_key(self.salt, self.aliases.canonical(path)))

    def add(self, number: int, path: bytes, digest: bytes) -> None:
        key = _key(self.salt, self.aliases.canonical(path))
        if len(digest) > self._width:  # a wider algorithm: pad what is stored so far
            old, self._width = self._width, len(digest)
            self._digests = bytearray(b"".join(self._digests[i:i + old].ljust(self._width, b"\0")
                                               for i in range(0, len(self._digests), old)))
        self._keys.append(key)
        self._owners.append(number)
        self._digests += digest.ljust(self._width, b"\0")

    def build(self) -> PackageIndex:
        """Sort the entries by key; a file listed again for an exempt path is dropped here too."""
        keys, owners, digests, width = self._keys, self._owners, self._digests, self._width
        order = sorted((i for i in range(len(keys)) if keys[i] not in self._exempt), key=keys.__getitem__)
        sorted_digests = bytearray(len(order) * width)
        for slot, i in enumerate(order):
            sorted_digests[slot * width:(slot + 1) * width] = digests[i * width:(i + 1) * width]
        index = PackageIndex(array("Q", (keys[i] for i in order)), array("I", (owners[i] for i in order)),
                             bytes(sorted_digests), width, self.packages, self.salt, self.aliases,
                             self.fingerprint.hexdigest())
        self._keys, self._owners, self._digests = array("Q"), array("I"), bytearray()
        del keys, owners, digests, order, sorted_digests
        _release_free_memory()
        return index


def _release_free_memory() -> None:
    """Hand the heap the build used back to the system (glibc keeps it otherwise): the scanner runs for
    months in a small memory cgroup, and reading the database again must not leave it larger."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
