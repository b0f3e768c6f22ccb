"""Anti-ransomware decoys: six harmless files of the project's own making in each login user's home.

As Elkeid: for every passwd user whose shell ends in ``sh`` and whose home is under one of the
configured homes (``/root``, ``/home``), ``<home>/elkeid_targets/0_elkeid_hids_anti_ransom.<ext>``
for csv, png, txt, xls, doc and pdf, owned by the user. Everything placed is listed in a manifest in
the session's state directory, so turning the decoys off (even after a restart) removes exactly what
was made here and nothing else. Paths inside a user's home are opened without following symlinks,
so a user cannot point root's writes elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable

from attrs import frozen

from elkscan_core.paths import under

DECOY_DIR = "elkeid_targets"
DECOY_STEM = "0_elkeid_hids_anti_ransom"
NOTE = "elkscan anti-ransomware decoy: leave this file alone; writing to it raises an alarm."


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pixels = b"".join(b"\0" + b"".join(bytes((x * 16, y * 16, 160)) for x in range(16)) for y in range(16))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))


def _pdf() -> bytes:
    text = f"BT /F1 12 Tf 72 720 Td ({NOTE}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _contents() -> dict[str, bytes]:
    rows = [("quarter", "region", "revenue"), ("Q1", "north", "120400"), ("Q2", "south", "98100"),
            ("Q3", "east", "143250"), ("Q4", "west", "110975")]
    cells = "".join("<Row>" + "".join(f'<Cell><Data ss:Type="String">{v}</Data></Cell>' for v in row)
                    + "</Row>" for row in rows)
    return {
        "csv": ("\n".join(",".join(row) for row in rows) + f"\n# {NOTE}\n").encode(),
        "png": _png(),
        "txt": f"Quarterly figures and contacts.\n{NOTE}\n".encode(),
        "xls": ('<?xml version="1.0"?>\n<Workbook xmlns="urn:schemas-microsoft-com:office:spreadsheet" '
                'xmlns:ss="urn:schemas-microsoft-com:office:spreadsheet"><Worksheet ss:Name="figures">'
                f"<Table>{cells}</Table></Worksheet></Workbook>\n<!-- {NOTE} -->\n").encode(),
        "doc": ("{\\rtf1\\ansi\\deff0{\\fonttbl{\\f0 Times New Roman;}}\\f0\\fs24 Quarterly figures.\\par "
                f"{NOTE}\\par }}\n").encode(),
        "pdf": _pdf(),
    }


#: decoy file name -> its content
CONTENTS: dict[str, bytes] = {f"{DECOY_STEM}.{ext}": data for ext, data in _contents().items()}
SHA256: dict[str, str] = {name: hashlib.sha256(data).hexdigest() for name, data in CONTENTS.items()}


@frozen
class User:
    name: str
    uid: int
    gid: int
    home: str


def login_users(passwd: str, homes: Iterable[str]) -> list[User]:
    """Users of a passwd-style file whose shell ends in ``sh`` and whose home is under ``homes``."""
    homes = tuple(homes)
    users = []
    with open(passwd, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.rstrip("\n").split(":")
            if len(fields) < 7 or not fields[6].endswith("sh"):
                continue
            try:
                uid, gid = int(fields[2]), int(fields[3])
            except ValueError:
                continue
            home = fields[5]
            if home.startswith("/") and any(under(home, root) for root in homes):
                users.append(User(fields[0], uid, gid, home))
    return users


def _unlink_in(path: str) -> None:
    """Unlink ``path`` without following a symlink that replaced its directory."""
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.unlink(os.path.basename(path), dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


class Decoys:
    """Places, resets and removes decoys; remembers what it made in ``manifest``."""

    def __init__(self, passwd: str, homes: Iterable[str], manifest: str) -> None:
        self.passwd, self.homes, self.manifest = passwd, tuple(homes), manifest
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        self._load()

    def _load(self) -> None:
        try:
            with open(self.manifest, encoding="utf-8") as handle:
                data = json.load(handle)
            self.files, self.dirs = set(data.get("files", ())), set(data.get("dirs", ()))
        except (OSError, ValueError):
            pass

    def _save(self) -> list[str]:
        """Write the manifest (remove it when empty); a problem is returned, never raised."""
        try:
            if not (self.files or self.dirs):
                if os.path.exists(self.manifest):
                    os.unlink(self.manifest)
                return []
            os.makedirs(os.path.dirname(self.manifest) or ".", mode=0o700, exist_ok=True)
            temporary = self.manifest + ".new"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump({"files": sorted(self.files), "dirs": sorted(self.dirs)}, handle)
            os.replace(temporary, self.manifest)
        except OSError as exc:
            return [f"cannot record the decoys in {self.manifest}: {exc.strerror} (check state_dir); "
                    "a restart will not know to remove them"]
        return []

    def place(self) -> tuple[list[str], list[str]]:
        """Create (or restore) every user's decoys; returns (decoy directories, problems)."""
        placed, problems = [], []
        try:
            users = login_users(self.passwd, self.homes)
        except OSError as exc:
            return [], [f"cannot read the user list {self.passwd}: {exc.strerror} (set anti_ransom.passwd)"]
        for user in users:
            if not os.path.isdir(user.home):
                continue  # an account whose home was never created has nothing to protect
            try:
                placed.append(self._place_for(user))
            except OSError as exc:
                problems.append(f"{user.name}: {user.home}/{DECOY_DIR}: {exc.strerror or exc}")
        problems.extend(self._save())
        return placed, problems

    def _place_for(self, user: User) -> str:
        home_fd = os.open(user.home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            directory = os.path.join(os.path.realpath(f"/proc/self/fd/{home_fd}"), DECOY_DIR)
            try:
                os.mkdir(DECOY_DIR, 0o755, dir_fd=home_fd)
                self.dirs.add(directory)
            except FileExistsError:
                pass
            dir_fd = os.open(DECOY_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=home_fd)
        finally:
            os.close(home_fd)
        try:
            if directory in self.dirs:
                os.fchown(dir_fd, user.uid, user.gid)
            elif os.fstat(dir_fd).st_uid not in (0, user.uid):
                raise OSError(0, "exists and belongs to someone else; left alone")
            for name, content in CONTENTS.items():
                path = os.path.join(directory, name)
                if path in self.files:  # restore by replacing: never write through what is there now
                    try:                # (it may have become a hard link to another file)
                        os.unlink(name, dir_fd=dir_fd)
                    except FileNotFoundError:
                        pass
                try:
                    fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_CREAT | os.O_EXCL,
                                 0o644, dir_fd=dir_fd)
                except FileExistsError:
                    continue  # someone else's file of that name: never touched
                self.files.add(path)
                try:
                    os.write(fd, content)
                    os.fchown(fd, user.uid, user.gid)
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)
        return directory

    def remove(self) -> list[str]:
        """Delete every decoy file and directory made here (directories only when empty); problems."""
        problems = []
        for path in sorted(self.files):
            try:
                _unlink_in(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror}")
                continue
            self.files.discard(path)
        for path in sorted(self.dirs):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror} (kept)")
                continue
            self.dirs.discard(path)
        return problems + self._save()

    @staticmethod
    def unchanged(name: str, sha256: str) -> bool:
        """True when a decoy still holds exactly what was written (opened for writing, not changed)."""
        return SHA256.get(name) == sha256
