"""dpkg's database (``/var/lib/dpkg``): which installed package ships which file, and its MD5.

- ``status``, and the journal in ``updates/`` that dpkg merges into it: the packages, their state,
  version, architecture and ``Conffiles:`` (never judged: their owner expects them to be edited).
  Only packages whose files are all unpacked count (``installed``, ``unpacked``, ``half-configured``,
  ``triggers-*``, with the flag ``ok``); a half-installed one's files are not what its list says.
- ``info/<package>.md5sums`` (``<package>:<arch>.md5sums`` for ``Multi-Arch: same``): one
  ``<md5>  <path relative to />`` line per file (directories, links and conffiles have none).
- ``diversions``: ``<from>``, ``<to>``, ``<package>`` line triples: every package but the one that
  diverts (all of them for a local diversion, ``:``) has its ``<from>`` at ``<to>`` on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from elkscan_core.trust import check_trusted

from .files import lock_held, open_dir, read_trusted, state
from .index import IndexBuilder, Package

#: Package states whose files are all on disk as the package's list says.
UNPACKED = frozenset({b"unpacked", b"half-configured", b"triggers-awaited", b"triggers-pending", b"installed"})


def parse_stanzas(data: bytes) -> Iterator[dict[bytes, bytes]]:
    """Deb822 paragraphs: field names lowercased; a continuation line (starting with a space or a tab)
    is kept, after a newline, in the value of the field above it."""
    fields: dict[bytes, bytes] = {}
    name = b""
    for line in data.split(b"\n"):
        if not line.strip():
            if fields:
                yield fields
            fields, name = {}, b""
        elif line[:1] in (b" ", b"\t"):
            if name:
                fields[name] += b"\n" + line[1:]
        else:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            fields[name] = value.strip()
    if fields:
        yield fields


def conffiles(value: bytes) -> Iterator[bytes]:
    """The paths of a ``Conffiles:`` field: `` <path> <md5>[ obsolete| remove-on-upgrade]`` lines."""
    for line in value.split(b"\n"):
        words = line.strip().rsplit(b" ", 2)
        if len(words) == 3 and words[2] in (b"obsolete", b"remove-on-upgrade"):
            words = words[:2]
        elif len(words) == 3:
            words = [words[0] + b" " + words[1], words[2]]
        if len(words) == 2 and words[0].startswith(b"/"):
            yield words[0]


def parse_md5sums(data: bytes, problems: list[str]) -> Iterator[tuple[bytes, bytes]]:
    """``(absolute path, MD5)`` of each line ``<32 hex digits>  <path>``; a line that is not one is
    named in ``problems`` and skipped."""
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line:
            continue
        path = line[34:].lstrip(b"/")
        try:
            digest = bytes.fromhex(line[:32].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            digest = b""
        if len(digest) != 16 or line[32:34] not in (b"  ", b" *") or not path:
            problems.append(f"line {number}: expected '<md5>  <path>'")
            continue
        yield b"/" + path, digest


def parse_diversions(data: bytes, problems: list[str]) -> dict[bytes, tuple[bytes, bytes]]:
    """``from -> (to, package)``; package ``:`` is a local diversion (every package is diverted)."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    if len(lines) % 3:
        problems.append(f"{len(lines)} lines, not triples of from, to and package: the last "
                        f"{len(lines) % 3} ignored")
    return {lines[i]: (lines[i + 1], lines[i + 2]) for i in range(0, len(lines) - 2, 3)}


class DpkgDatabase:
    """dpkg's admin directory, read into an ``IndexBuilder``."""

    manager = "dpkg"

    def __init__(self, admin_dir: str = "/var/lib/dpkg") -> None:
        self.admin_dir = admin_dir
        self.paths = [os.path.join(admin_dir, name) for name in ("status", "updates", "info", "diversions")]

    def check(self) -> None:
        """Refuse a database another user could change (UntrustedError): it decides what is called a
        vendor's file, and what a modified one."""
        check_trusted(self.admin_dir, "dpkg database")
        for path in self.paths:
            if os.path.lexists(path):
                check_trusted(path, "dpkg database")

    def state(self) -> tuple:
        return state(*self.paths)

    def busy(self) -> bool:
        return lock_held(os.path.join(self.admin_dir, "lock"))

    def load(self, builder: IndexBuilder) -> None:
        self.check()
        admin = open_dir(self.admin_dir)
        if admin is None:
            raise FileNotFoundError(f"no dpkg database at {self.admin_dir}")
        try:
            packages = self._packages(admin, builder)
            problems: list[str] = []
            diversions = parse_diversions(builder.read(read_trusted(admin, "diversions", "dpkg database") or b""),
                                          problems)
            builder.problems.extend(("diversions", p) for p in problems)
            info = open_dir("info", admin)
            if info is None:
                raise FileNotFoundError(f"no info directory in the dpkg database {self.admin_dir}")
            try:
                for fields in packages:
                    self._add_package(info, fields, diversions, builder)
            finally:
                os.close(info)
        finally:
            os.close(admin)

    @staticmethod
    def _packages(admin: int, builder: IndexBuilder) -> list[dict[bytes, bytes]]:
        """The stanzas of ``status`` with the journal's newer ones in their place; those unpacked."""
        status = read_trusted(admin, "status", "dpkg database")
        if status is None:
            raise FileNotFoundError("the dpkg database has no status file")
        current = {(f.get(b"package"), f.get(b"architecture")): f for f in parse_stanzas(builder.read(status))}
        updates = open_dir("updates", admin)
        if updates is not None:
            try:
                for name in sorted((n for n in os.listdir(updates) if n.isdigit()), key=int):
                    journal = read_trusted(updates, name, "dpkg database journal") or b""
                    for fields in parse_stanzas(builder.read(journal)):
                        current[(fields.get(b"package"), fields.get(b"architecture"))] = fields
            finally:
                os.close(updates)
        unpacked = []
        for fields in current.values():
            words = fields.get(b"status", b"").split()
            if fields.get(b"package") and len(words) == 3 and words[1] == b"ok" and words[2] in UNPACKED:
                unpacked.append(fields)
        return unpacked

    @staticmethod
    def _add_package(info: int, fields: dict[bytes, bytes], diversions: dict[bytes, tuple[bytes, bytes]],
                     builder: IndexBuilder) -> None:
        name, arch = fields[b"package"], fields.get(b"architecture", b"")
        qualified = name + b":" + arch
        for path in conffiles(fields.get(b"conffiles", b"")):
            builder.exempt(path)
            if path in diversions:
                builder.exempt(diversions[path][0])
        names = [qualified, name] if fields.get(b"multi-arch") == b"same" else [name, qualified]
        data = None
        for candidate in names:
            data = read_trusted(info, candidate + b".md5sums", "dpkg database")
            if data is not None:
                break
        if not data:
            return  # a package of directories and links only, or one built without md5sums
        number = builder.package(Package(name.decode("utf-8", "replace"),
                                         fields.get(b"version", b"").decode("utf-8", "replace"),
                                         arch.decode("utf-8", "replace"), "md5"))
        problems: list[str] = []
        for path, digest in parse_md5sums(builder.read(data), problems):
            diverted = diversions.get(path)
            if diverted is not None and diverted[1] != name:
                path = diverted[0]
            builder.add(number, path, digest)
        builder.problems.extend((f"info/{candidate.decode('utf-8', 'replace')}.md5sums", p) for p in problems)
