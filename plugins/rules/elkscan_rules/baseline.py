"""The benign baseline: files of this host that no rule may match.

Package-verified files (the ``pkgverify`` plugin's index of dpkg's or rpm's digests, each file's content
checked against it) are sampled within bounds, in a fixed pseudo-random order, round-robin over program,
library, shared-data and configuration directories, so that a sample mixes executables, libraries,
scripts and text. Paths an operator names (``baseline.paths``) are taken whole, first. Each file is
read again and its digest checked when it is scanned, so a file changed since was not what was vetted
against and is left out.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator

from attrs import frozen

from elkscan_core.errors import ElkscanError

from .config import Baseline
from .fetch import read_regular

#: Where package files are sampled from, one bucket each.
ROOTS = ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec", "/usr/share", "/etc")
_MAX_LISTED = 400_000  # entries looked at in all roots
_ORDER_KEY = b"elkscan-baseline"


class BaselineError(ElkscanError):
    """The baseline cannot be made (no package database, nothing to sample)."""


@frozen
class BenignFile:
    """A baseline file: its path, the package that ships it ("" for an operator's path), and the digest
    its content must still have."""

    path: str
    package: str
    algorithm: str
    digest: bytes
    size: int

    def read(self) -> bytes | None:
        """The file's content, or None when it is no longer the file that was sampled."""
        data = _read(self.path, self.size)
        if data is None or hashlib.new(self.algorithm, data).digest() != self.digest:
            return None
        return data


def _read(path: str, cap: int) -> bytes | None:
    data = read_regular(path, cap)
    return data if data is not None and len(data) <= cap else None


def package_index():
    """pkgverify's index of this host's package database (dpkg, else rpm)."""
    try:
        from elkscan_pkgverify.dpkg import DpkgDatabase
        from elkscan_pkgverify.index import Aliases, IndexBuilder
        from elkscan_pkgverify.rpm import RpmDatabase
    except ImportError:
        raise BaselineError("baseline.packages needs the pkgverify plugin (pip install elkscan-pkgverify), "
                            "or set baseline: {packages: false, paths: [...]}") from None
    import shutil

    if os.path.exists("/var/lib/dpkg/status"):
        database = DpkgDatabase("/var/lib/dpkg")
    elif shutil.which("rpm", path="/usr/bin:/bin"):
        database = RpmDatabase(None)
    else:
        raise BaselineError("no package database (neither dpkg nor rpm) for the baseline; set baseline: "
                            "{packages: false, paths: [...]}")
    builder = IndexBuilder(Aliases.of_root())
    try:
        database.load(builder)
    except (ElkscanError, OSError) as exc:
        raise BaselineError(f"the package database cannot be read for the baseline: {exc}") from None
    return builder.build()


def sample(baseline: Baseline) -> list[BenignFile]:
    """The baseline's files, within ``max_files`` and ``max_bytes``."""
    chosen: list[BenignFile] = []
    budget = [baseline.max_files, baseline.max_bytes]

    def take(item: BenignFile) -> bool:
        if budget[0] <= 0 or item.size > budget[1]:
            return False
        chosen.append(item)
        budget[0] -= 1
        budget[1] -= item.size
        return True

    for root in baseline.paths:
        for path in _files(root):
            data = _read(path, baseline.max_file_size)
            if data:
                take(BenignFile(path, "", "sha256", hashlib.sha256(data).digest(), len(data)))
    if baseline.packages:
        index = package_index()
        buckets = [_ordered(root) for root in ROOTS]
        seen = set()
        while buckets and budget[0] > 0 and budget[1] > 0:
            for bucket in list(buckets):
                item = _next_verified(bucket, index, baseline.max_file_size, seen)
                if item is None:
                    buckets.remove(bucket)
                else:
                    take(item)
    if not chosen:
        raise BaselineError("the benign baseline is empty: no package-verified file was found and no "
                            "baseline.paths were given")
    return chosen


def _files(root: str) -> Iterator[str]:
    if os.path.isfile(root):
        yield root
        return
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(directory, name)


def _ordered(root: str) -> Iterator[str]:
    """The regular files under ``root`` in a fixed order that looks random (the same on every run, so a
    vetting is repeatable)."""
    found: list[tuple[bytes, str]] = []
    for directory, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            found.append((hashlib.blake2b(os.fsencode(path), digest_size=8, key=_ORDER_KEY).digest(), path))
            if len(found) >= _MAX_LISTED // len(ROOTS):
                break
        if len(found) >= _MAX_LISTED // len(ROOTS):
            break
    found.sort()
    return iter([path for _, path in found])


def _next_verified(bucket: Iterator[str], index, max_size: int, seen: set) -> BenignFile | None:
    for path in bucket:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= max_size or (st.st_dev, st.st_ino) in seen:
            continue
        shipped = index.lookup(path)
        if not shipped:
            continue
        data = _read(path, max_size)
        if data is None:
            continue
        for package, digest in shipped:
            if hashlib.new(package.algorithm, data).digest() == digest:
                seen.add((st.st_dev, st.st_ino))
                return BenignFile(path, f"{package.name} {package.version}".strip(), package.algorithm, digest,
                                  len(data))
    return None
