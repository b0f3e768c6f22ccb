"""Extract a downloaded rule archive (zip, tar, tar.gz/.bz2/.xz) into a private directory, safely.

The bytes come from the network. As rule bundles are (``elkscan_core.bundle``, same ``Limits``): nothing
is written before every entry is checked: a relative path with no ``..``, ``.`` or empty component, no
backslash or NUL, each name at most 255 bytes; a regular file or a directory (a link, hard link, device
or FIFO refuses the archive); at most ``max_entries`` entries and ``max_total_size`` bytes; no zip entry
that expands more than ``max_ratio``:1, nor the whole archive. A compressed tar is read through a cap, so
a decompression bomb stops at the cap. Files are created ``O_EXCL|O_NOFOLLOW`` 0600 in directories made
0700 under a new directory, and a failure removes what was written.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import zipfile

from attrs import frozen

from elkscan_core.bundle import NAME_MAX, Limits
from elkscan_core.errors import ElkscanError

_PATH_MAX = 4096
_TAR_HEADER = 512


class ArchiveError(ElkscanError):
    """An archive that is refused or cannot be read; the message names it and why."""


@frozen
class Entry:
    name: str
    size: int
    compressed: int
    is_dir: bool


def kind_of(head: bytes) -> str:
    """``zip``, ``gz``, ``bz2``, ``xz``, ``tar`` or ``file`` (anything else: a single rule file)."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    return "file"


def safe_name(name: str) -> bool:
    """A relative path that stays inside the directory it is extracted into."""
    if not name or len(name) > _PATH_MAX or "\0" in name or "\\" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    return all(part not in ("", ".", "..") and len(part.encode("utf-8", "surrogateescape")) <= NAME_MAX
               for part in parts)


def check_entries(what: str, entries: list[Entry], limits: Limits, archive_size: int) -> None:
    """Raise ArchiveError unless the entries are safe to extract within ``limits``."""
    if len(entries) > limits.max_entries:
        raise ArchiveError(f"{what} has more than {limits.max_entries} entries; refusing it")
    seen: set[str] = set()
    total = 0
    for entry in entries:
        if not safe_name(entry.name):
            raise ArchiveError(f"{what} holds an unsafe entry {entry.name[:200]!r} (an absolute path, '..', "
                               "or a name no filesystem takes); refusing it")
        if entry.name in seen:
            raise ArchiveError(f"{what} holds {entry.name[:200]!r} twice; refusing it")
        seen.add(entry.name)
        total += entry.size
        if total > limits.max_total_size:
            raise ArchiveError(f"{what} would extract to more than {limits.max_total_size} bytes; refusing it")
        if entry.size > limits.max_ratio * max(entry.compressed, 1):
            raise ArchiveError(f"{what}: entry {entry.name[:200]!r} expands {entry.size} bytes from "
                               f"{entry.compressed} (more than {limits.max_ratio:g}:1), a zip bomb; refusing it")
    if total > limits.max_ratio * max(archive_size, 1):
        raise ArchiveError(f"{what} expands to {total} bytes from {archive_size} (more than "
                           f"{limits.max_ratio:g}:1), a bomb; refusing it")


def extract(path: str, dest: str, what: str, limits: Limits = Limits(), links: str = "refuse") -> list[str]:
    """Extract the archive at ``path`` into ``dest`` (must not exist; created 0700) and return the
    relative names of the files written. ``links="skip"`` leaves links and special files out instead of
    refusing the archive (``git archive`` of a repository that holds a link)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(512)
    kind = kind_of(head)
    os.mkdir(dest, 0o700)
    written: list[str] = []
    try:
        if kind == "zip":
            _zip(path, dest, what, limits, size, written, links == "skip")
        elif kind == "file":
            raise ArchiveError(f"{what} is not an archive")
        else:
            _tar(path, kind, dest, what, limits, size, written, links == "skip")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return written


def _zip(path: str, dest: str, what: str, limits: Limits, size: int, written: list[str], skip: bool) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:  # hostile bytes: whatever the parser raises means a damaged archive
        raise ArchiveError(f"{what} is truncated or not a zip archive ({exc})") from None
    with archive:
        infos, entries = [], []
        for info in archive.infolist()[:limits.max_entries + 1]:
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded, a plain file
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                if skip:
                    continue
                raise ArchiveError(f"{what} holds {info.filename[:200]!r}, a link or special file; refusing it")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"{what} holds an encrypted entry {info.filename[:200]!r}; refusing it")
            infos.append(info)
            entries.append(Entry(info.filename.rstrip("/") if info.is_dir() else info.filename,
                                 info.file_size, info.compress_size, info.is_dir()))
        check_entries(what, entries, limits, size)
        for info, entry in zip(infos, entries):
            if entry.is_dir:
                os.close(_makedirs(dest, entry.name))
                continue
            try:
                with archive.open(info) as stream:
                    data = stream.read(info.file_size + 1)
            except Exception as exc:
                raise ArchiveError(f"{what} is corrupt at {entry.name[:200]!r} ({exc})") from None
            if len(data) != info.file_size:
                raise ArchiveError(f"{what}: entry {entry.name[:200]!r} is not the size it declares; refusing it")
            _write(dest, entry.name, data, written)


class _Capped(io.RawIOBase):
    """A decompressed stream that fails past ``cap`` bytes: a bomb stops there."""

    def __init__(self, stream, cap: int, what: str) -> None:
        self.stream, self.cap, self.what, self.count = stream, cap, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        self.count += len(data)
        if self.count > self.cap:
            raise ArchiveError(f"{self.what} decompresses to more than {self.cap} bytes, a bomb or more than "
                               "the size cap; refusing it")
        buffer[:len(data)] = data
        return len(data)


_OPENERS = {"gz": lambda raw: gzip.GzipFile(fileobj=raw), "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}


def _members(path: str, kind: str, what: str, limits: Limits, size: int):
    """Iterate (member, tarfile) over a tar, decompressed through the cap."""
    raw = open(path, "rb")
    stream = raw if kind == "tar" else _OPENERS[kind](raw)
    overhead = _TAR_HEADER * 4 * (limits.max_entries + 1) + 20 * _TAR_HEADER
    cap = int(min(limits.max_total_size, limits.max_ratio * max(size, 1))) + overhead
    capped = io.BufferedReader(_Capped(stream, cap, what), 1 << 16)
    try:
        with tarfile.open(fileobj=capped, mode="r|") as archive:
            for member in archive:
                yield member, archive
    finally:
        stream.close()
        raw.close()


def _tar(path: str, kind: str, dest: str, what: str, limits: Limits, size: int, written: list[str],
         skip: bool) -> None:
    try:
        entries = []
        for member, _ in _members(path, kind, what, limits, size):
            if len(entries) > limits.max_entries:
                break
            if member.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                continue
            if not (member.isreg() or member.isdir()):
                if skip:
                    continue
                raise ArchiveError(f"{what} holds {member.name[:200]!r}, a link or special file; refusing it")
            name = _tar_name(member)
            if not name:
                continue
            entries.append(Entry(name, member.size, member.size, member.isdir()))
        check_entries(what, entries, limits, size)
        wanted = {entry.name: entry for entry in entries}
        for member, archive in _members(path, kind, what, limits, size):
            name = _tar_name(member)
            entry = wanted.get(name)
            if (entry is None or not (member.isreg() or member.isdir()) or entry.size != member.size
                    or entry.is_dir != member.isdir()):
                continue  # pax headers; anything else was refused in the first pass
            if entry.is_dir:
                os.close(_makedirs(dest, name))
                continue
            stream = archive.extractfile(member)
            data = stream.read(member.size + 1) if stream is not None else b""
            if len(data) != member.size:
                raise ArchiveError(f"{what} is truncated at {name[:200]!r}")
            _write(dest, name, data, written)
    except ArchiveError:
        raise
    except Exception as exc:  # tarfile, gzip, bz2, lzma on hostile bytes
        raise ArchiveError(f"{what} is truncated or not a readable tar archive ({type(exc).__name__}: "
                           f"{exc})") from None


def _tar_name(member: tarfile.TarInfo) -> str:
    """The member's name without a leading ``./`` (``tar -C dir .`` writes them); "" for ``.`` itself."""
    name = member.name.rstrip("/") if member.isdir() else member.name
    while name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name


def _makedirs(dest: str, name: str) -> int:
    """Open (creating 0700) each directory of ``name`` under ``dest`` without following a link;
    return the last one's descriptor (closed by the caller)."""
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    for part in name.split("/"):
        try:
            os.mkdir(part, 0o700, dir_fd=fd)
        except FileExistsError:
            pass
        try:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            raise ArchiveError(f"cannot create directory {name[:200]!r}: {exc.strerror}") from None
        os.close(fd)
        fd = next_fd
    return fd


def _write(dest: str, name: str, data: bytes, written: list[str]) -> None:
    parent, _, base = name.rpartition("/")
    dir_fd = _makedirs(dest, parent) if parent else os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as exc:
        raise ArchiveError(f"cannot write {name[:200]!r}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    written.append(name)
