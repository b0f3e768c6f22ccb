"""The vault: a private directory of quarantined files, each defanged and described by a manifest entry.

Layout: ``<id>.data`` holds the file's bytes XOR'ed with a random key of the item (nothing in it runs,
matches a signature or can be served as what it was; mode 0600), ``<id>.json`` its manifest entry
(original path, owner, mode, timestamps, hashes, detections, the key). The entry is written last and
renamed into place, so an item exists once both are complete. The directory is 0700 and must pass
``elkscan_core.trust.check_trusted``: a restore runs as root on what the entries say.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import attrs
from attrs import frozen

from elkscan_core import Detection, ElkscanError
from elkscan_core.text import escaped_bytes, has_surrogates, lossy, raw_bytes
from elkscan_core.trust import check_trusted

from .fileops import NotQuarantined, open_parent, rename_noreplace
from .judged import CHUNK, Judged

ID = re.compile(r"[0-9a-f]{16}\Z")
_KEY_SIZE = 32  # CHUNK is a multiple of it, so chunks start on the key's first byte
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: How each manifest field is written in JSON (annotations are strings here).
_JSON_TYPES = {"float": (int, float), "int": int, "str": str, "list[dict[str, str]]": list}


class VaultError(ElkscanError):
    """The vault cannot be used, or an item cannot be restored; one line that says why and what to do."""


def xor(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """``data`` XOR the key repeated from ``offset``: the same call defangs and restores."""
    start = offset % len(key)
    stream = (key[start:] + key * (len(data) // len(key) + 1))[:len(data)]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(len(data), "little")


def _name_of(table: Any, number: int) -> str:
    try:
        return table(number)[0]
    except KeyError:
        return ""


@frozen
class Entry:
    """One quarantined file, as its manifest entry records it. Paths are kept as the hex of their exact
    bytes (a name need not be UTF-8)."""

    id: str = attrs.field(validator=attrs.validators.matches_re(ID))
    quarantined_at: float
    host: str
    path_hex: str  # the path as the scan reported it
    real_path_hex: str  # the canonical path of the name that was removed: where a restore puts it back
    uid: int
    gid: int
    user: str
    group: str
    mode: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    dev: int
    ino: int
    nlink: int
    sha256: str
    md5: str
    detections: list[dict[str, str]]
    record_id: str
    key: str

    @property
    def path(self) -> str:
        return os.fsdecode(bytes.fromhex(self.path_hex))

    @property
    def real_path(self) -> bytes:
        return bytes.fromhex(self.real_path_hex)

    def dumps(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode()

    @classmethod
    def loads(cls, data: bytes) -> Entry:
        """Parse an entry; VaultError for anything that is not one as this module writes them."""
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict) or set(fields) != {f.name for f in attrs.fields(cls)}:
                raise ValueError("not an entry")
            for f in attrs.fields(cls):
                value = fields[f.name]
                if not isinstance(value, _JSON_TYPES[f.type]) or isinstance(value, bool):
                    raise ValueError(f"{f.name} is not a {f.type}")
            if not all(isinstance(d, dict) and all(isinstance(v, str) for v in d.values())
                       for d in fields["detections"]):
                raise ValueError("detections are not a list of names")
            entry = cls(**fields)
            bytes.fromhex(entry.path_hex), bytes.fromhex(entry.real_path_hex), bytes.fromhex(entry.key)
        except (ValueError, TypeError, RecursionError) as exc:
            raise VaultError(f"damaged manifest entry: {str(exc)[:200]}") from None
        if not entry.key:
            raise VaultError("damaged manifest entry: no key")
        return entry

    def public(self) -> dict[str, Any]:
        """The entry for ``list -f jsonl``: paths as text (``path_bytes`` escaped when not UTF-8), no key."""
        fields = {k: v for k, v in attrs.asdict(self).items() if k not in ("path_hex", "real_path_hex", "key")}
        for name, raw in (("path", bytes.fromhex(self.path_hex)), ("real_path", self.real_path)):
            text = os.fsdecode(raw)
            fields[name] = lossy(text)
            if has_surrogates(text):
                fields[f"{name}_bytes"] = escaped_bytes(raw)
        return fields


class Vault:
    """An open vault directory. ``lock()`` serialises changes between a running sink and the command."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def open(cls, path: str, create: bool = False) -> Vault:
        """Open (or create, 0700) the vault; VaultError unless it is trusted and private."""
        if create and not os.path.lexists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        check_trusted(path, "quarantine vault")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VaultError(f"no quarantine vault at {path} (nothing was quarantined there; --vault "
                             "names another)") from None
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            os.close(fd)
            raise VaultError(f"quarantine vault {path} has mode {mode:04o}; it must be private to its "
                             f"owner (chmod 700 {path})")
        return cls(path, fd)

    def close(self) -> None:
        os.close(self.fd)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    # -- in ------------------------------------------------------------------------------------

    def put(self, src: int, st: os.stat_result, judged: Judged, *, path: str, real_path: str, host: str,
            detections: Sequence[Detection], record_id: str) -> Entry:
        """Copy the open file ``src`` in, defanged, and write its entry; NotQuarantined when the content is
        not what was judged (nothing is left in the vault then)."""
        item = secrets.token_hex(8)
        key = secrets.token_bytes(_KEY_SIZE)
        sha256, md5 = hashlib.sha256(), hashlib.md5()
        out = os.open(f"{item}.data", _CREATE, 0o600, dir_fd=self.fd)
        try:
            offset = 0
            while True:
                chunk = os.pread(src, CHUNK, offset)
                if not chunk:
                    break
                sha256.update(chunk)
                md5.update(chunk)
                _write_all(out, xor(chunk, key, offset))
                offset += len(chunk)
            os.fsync(out)
            after = os.fstat(src)
            if sha256.hexdigest() != judged.sha256 or offset != judged.size or after.st_mtime_ns != st.st_mtime_ns:
                raise NotQuarantined(f"{path}: its content is not what was judged (changed in place since "
                                     "the scan); left alone")
            entry = Entry(
                id=item, quarantined_at=time.time(), host=host, path_hex=raw_bytes(path).hex(),
                real_path_hex=raw_bytes(real_path).hex(), uid=st.st_uid, gid=st.st_gid,
                user=_name_of(pwd.getpwuid, st.st_uid), group=_name_of(grp.getgrgid, st.st_gid),
                mode=st.st_mode & 0o7777, size=st.st_size, atime_ns=judged.atime_ns, mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns, dev=st.st_dev, ino=st.st_ino, nlink=st.st_nlink,
                sha256=sha256.hexdigest(), md5=md5.hexdigest(),
                detections=[{"engine": d.engine, "signature": d.signature, "class": d.class_} for d in detections],
                record_id=record_id, key=key.hex())
            self._write_entry(entry)
        except BaseException:
            os.close(out)
            self._unlink(f"{item}.data")
            raise
        os.close(out)
        return entry

    def _write_entry(self, entry: Entry) -> None:
        temporary = f".{entry.id}.json.tmp"
        fd = os.open(temporary, _CREATE, 0o600, dir_fd=self.fd)
        try:
            _write_all(fd, entry.dumps())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, f"{entry.id}.json", src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    # -- out -----------------------------------------------------------------------------------

    def entries(self) -> tuple[list[Entry], list[str]]:
        """Every item, oldest first, and a line for each entry that cannot be read."""
        items, problems = [], []
        for name in sorted(os.listdir(self.fd)):
            if not (name.endswith(".json") and ID.match(name[:-5])):
                continue
            try:
                items.append(self.get(name[:-5]))
            except VaultError as exc:
                problems.append(f"{name}: {exc}")
        return sorted(items, key=lambda e: e.quarantined_at), problems

    def get(self, item: str) -> Entry:
        if not ID.match(item):
            raise VaultError(f"{item!r} is not an item id (16 hex digits, as 'elkscan quarantine list' shows)")
        try:
            fd = os.open(f"{item}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            raise VaultError(f"no item {item} in the quarantine vault {self.path}") from None
        with os.fdopen(fd, "rb") as handle:
            entry = Entry.loads(handle.read(1 << 20))
        if entry.id != item:
            raise VaultError(f"{item}.json: damaged manifest entry: it describes {entry.id}")
        return entry

    def restore(self, item: str, to: Optional[bytes] = None) -> bytes:
        """Put the item back, identical (bytes, owner, mode, access and modification times), where it was
        or at ``to``; never over an existing file, never through a link. Returns the path; the item
        leaves the vault."""
        entry = self.get(item)
        dest = to if to is not None else entry.real_path
        try:
            dir_fd, name = open_parent(dest, follow=to is not None)
        except OSError as exc:
            raise VaultError(f"cannot restore to {os.fsdecode(dest)}: {exc.strerror} on the way to its "
                             "directory (one is missing, or was replaced by a link); restore it with --to PATH"
                             ) from None
        try:
            self._restore_into(entry, dir_fd, name, dest)
        finally:
            os.close(dir_fd)
        self.drop(item)
        return dest

    def _restore_into(self, entry: Entry, dir_fd: int, name: bytes, dest: bytes) -> None:
        temporary = f".elkscan-restore-{secrets.token_hex(8)}"
        key = bytes.fromhex(entry.key)
        src = os.open(f"{entry.id}.data", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            out = os.open(temporary, _CREATE, 0o600, dir_fd=dir_fd)
        except BaseException:
            os.close(src)
            raise
        placed = False
        try:
            digest, offset = hashlib.sha256(), 0
            while True:
                chunk = os.pread(src, CHUNK, offset)
                if not chunk:
                    break
                plain = xor(chunk, key, offset)
                digest.update(plain)
                _write_all(out, plain)
                offset += len(chunk)
            if digest.hexdigest() != entry.sha256 or offset != entry.size:
                raise VaultError(f"item {entry.id} is damaged: its content is not the SHA-256 recorded")
            try:
                os.fchown(out, entry.uid, entry.gid)
            except PermissionError:
                raise VaultError(f"item {entry.id} belongs to uid {entry.uid}, gid {entry.gid}; giving it "
                                 "back to them needs root") from None
            os.fchmod(out, entry.mode & 0o7777)  # after chown, which clears set-id bits
            os.utime(out, ns=(entry.atime_ns, entry.mtime_ns))
            os.fsync(out)
            try:
                rename_noreplace(dir_fd, temporary, dir_fd, name)
            except FileExistsError:
                raise VaultError(f"{os.fsdecode(dest)} exists; elkscan does not overwrite it: move it away, "
                                 "or restore with --to PATH") from None
            placed = True
        finally:
            os.close(out)
            os.close(src)
            if not placed:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=dir_fd)

    # -- removal -------------------------------------------------------------------------------

    def drop(self, item: str) -> None:
        """Remove an item: its entry first (then it no longer exists), then its data."""
        self._unlink(f"{item}.json")
        self._unlink(f"{item}.data")

    def purge(self, items: Sequence[str] = (), older_than: Optional[float] = None, everything: bool = False) -> int:
        """Remove the named items, those quarantined more than ``older_than`` seconds ago, or all (with
        what an interrupted quarantine left); returns how many items went."""
        entries, _ = self.entries()
        for item in items:
            self.get(item)  # VaultError for an unknown id, before anything is removed
        now = time.time()
        chosen = set(items) | {e.id for e in entries if everything or (
            older_than is not None and now - e.quarantined_at > older_than)}
        for item in sorted(chosen):
            self.drop(item)
        if everything:
            for name in os.listdir(self.fd):
                self._unlink(name)
        return len(chosen)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
