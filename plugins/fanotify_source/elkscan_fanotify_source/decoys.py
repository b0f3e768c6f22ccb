"""Anti-ransomware decoys: six ordinary-looking office files (``documents.py``) in each login user's home.

As Elkeid: for every passwd user whose shell ends in ``sh`` and whose home is under one of the
configured homes (``/root``, ``/home``), ``<home>/elkeid_targets/0_elkeid_hids_anti_ransom.<ext>``
for csv, png, txt, xls, doc and pdf, owned by the user. Everything placed is listed in a manifest in
the session's state directory, so turning the decoys off (even after a restart) removes exactly what
was made here and nothing else. Paths inside a user's home are opened without following symlinks,
so a user cannot point root's writes elsewhere.

Root deletes what the manifest lists, so the manifest is read and written only where no other user
can change it (``elkscan_core.trust``), and a listed file is deleted only while it is still the decoy
placed: a regular file in a decoy directory, with the owner and the SHA-256 recorded when it was made.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator

from attrs import frozen

from elkscan_core.paths import under
from elkscan_core.trust import UntrustedError, check_trusted

from . import documents

log = logging.getLogger("elkscan.fanotify")

DECOY_DIR = "elkeid_targets"
DECOY_STEM = "0_elkeid_hids_anti_ransom"


@functools.lru_cache(maxsize=None)
def _made() -> tuple[dict[str, bytes], dict[str, str]]:
    """Decoy file name -> content, and -> its SHA-256 (made once, when first needed: about a second)."""
    contents = {f"{DECOY_STEM}.{ext}": data for ext, data in documents.contents().items()}
    return contents, {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


def __getattr__(name: str):
    """``CONTENTS`` (decoy file name -> content) and ``SHA256`` (-> its SHA-256), made on first use."""
    if name == "CONTENTS":
        return _made()[0]
    if name == "SHA256":
        return _made()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MAX_DECOY_SIZE = 1 << 20  # above any decoy (documents.py keeps them under it): a larger file is not one


@frozen
class Made:
    """A decoy as placed: removal deletes the file only while it still has this content and owner."""

    sha256: str
    uid: int


class NotADecoy(Exception):
    """A listed path no longer holds the decoy placed there (the message says what it holds)."""


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


def parse_manifest(data: bytes) -> tuple[dict[str, Made], set[str]]:
    """The decoy files and directories a manifest lists; ValueError when it is damaged."""
    try:
        document = json.loads(data)
        if not (isinstance(document["files"], list) and isinstance(document["dirs"], list)):
            raise TypeError
        files = {entry["path"]: Made(entry["sha256"], entry["uid"]) for entry in document["files"]}
        dirs = set(document["dirs"])
    except (TypeError, KeyError, RecursionError) as exc:
        raise ValueError(f"not a decoy manifest ({type(exc).__name__})") from None
    for path, made in files.items():
        if not (isinstance(path, str) and path.startswith("/") and isinstance(made.sha256, str)
                and type(made.uid) is int):
            raise ValueError(f"a malformed entry for {str(path)[:80]!r}")
    if not all(isinstance(path, str) and path.startswith("/") for path in dirs):
        raise ValueError("a directory that is not an absolute path")
    return files, dirs


def _remove_decoy(path: str, made: Made) -> None:
    """Delete ``path`` if it is still the decoy placed there; raise NotADecoy, and delete nothing,
    when it is anything else (a link, another file, changed content). Nothing is followed through a
    symbolic link: the file is looked up relative to its directory, opened with ``O_NOFOLLOW``. (What
    is unlinked is a name in the decoy directory, which its owner could remove anyway.)"""
    directory, name = os.path.split(path)
    if os.path.basename(directory) != DECOY_DIR or not name.startswith(DECOY_STEM + "."):
        raise NotADecoy("is not where elkscan places decoys")
    not_regular = "is not a regular file (a link or another kind of file took the decoy's place)"
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotADecoy("is in a directory that a link or a file replaced") from None
        raise
    try:
        if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise NotADecoy(not_regular)  # never opened: a FIFO, a device, a link
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            content = os.read(fd, _MAX_DECOY_SIZE + 1) if st.st_size <= _MAX_DECOY_SIZE else b""
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotADecoy(not_regular)  # swapped since the look-up
        if st.st_uid != made.uid:
            raise NotADecoy(f"is owned by uid {st.st_uid}, not by uid {made.uid} as the decoy placed")
        if hashlib.sha256(content).hexdigest() != made.sha256:
            raise NotADecoy("no longer holds the decoy's content")
        os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


class Decoys:
    """Places, resets and removes decoys; remembers what it made in ``manifest``."""

    def __init__(self, passwd: str, homes: Iterable[str], manifest: str) -> None:
        self.passwd, self.homes, self.manifest = passwd, tuple(homes), os.path.abspath(manifest)
        self.files: dict[str, Made] = {}
        self.dirs: set[str] = set()
        self._load()

    def _load(self) -> None:
        """Take over what an earlier run made, from a manifest only root or this user could write."""
        if not os.path.lexists(self.manifest):
            return
        try:
            check_trusted(self.manifest, "decoy manifest")
            fd = os.open(self.manifest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as handle:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError("not a regular file")
                self.files, self.dirs = parse_manifest(handle.read())
        except UntrustedError as exc:
            log.warning("%s; refused: the decoys it lists are not removed", exc)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else exc
            log.warning("decoy manifest %s cannot be used (%s); the decoys it lists are not removed",
                        self.manifest, reason)

    @contextlib.contextmanager
    def _state_dir(self) -> Iterator[int]:
        """The manifest's directory, opened, once checked (and, if missing, created 0700 where no other
        user can change it): the manifest is written only where no one else could rewrite it."""
        directory = os.path.dirname(self.manifest)
        existing = directory
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if existing != directory:
            check_trusted(existing, "state directory")
            os.makedirs(directory, mode=0o700, exist_ok=True)
        check_trusted(directory, "state directory")
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield dir_fd
        finally:
            os.close(dir_fd)

    def _save(self) -> list[str]:
        """Write the manifest (0600, by rename; removed when empty); a problem is returned, never raised."""
        name = os.path.basename(self.manifest)
        temporary = name + ".new"
        try:
            if not (self.files or self.dirs):
                if os.path.lexists(self.manifest):
                    with self._state_dir() as dir_fd:
                        os.unlink(name, dir_fd=dir_fd)
                return []
            document = {"files": [{"path": path, "sha256": made.sha256, "uid": made.uid}
                                  for path, made in sorted(self.files.items())],
                        "dirs": sorted(self.dirs)}
            with self._state_dir() as dir_fd:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary, dir_fd=dir_fd)
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dir_fd)
                with open(fd, "w", encoding="utf-8") as handle:
                    json.dump(document, handle)
                os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except UntrustedError as exc:
            if not (self.files or self.dirs):
                return []  # nothing to record, and nothing is deleted there
            return [f"not recording the decoys: {exc}; a restart will not know to remove them"]
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
            contents, digests = _made()
            for name, content in contents.items():
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
                self.files[path] = Made(digests[name], user.uid)
                try:
                    os.write(fd, content)
                    os.fchown(fd, user.uid, user.gid)
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)
        return directory

    def remove(self) -> list[str]:
        """Delete every decoy file (still as placed) and directory (when empty) made here; problems."""
        problems = []
        for path, made in sorted(self.files.items()):
            try:
                _remove_decoy(path, made)
            except FileNotFoundError:
                pass
            except NotADecoy as exc:
                problems.append(f"{path} {exc}: left alone")  # and forgotten: it is not ours any more
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror}")
                continue
            del self.files[path]
        for path in sorted(self.dirs):
            try:
                if os.path.basename(path) == DECOY_DIR:
                    os.rmdir(path)  # only when empty; a link in its place is not followed (ENOTDIR)
                else:
                    problems.append(f"{path} is not where elkscan places decoys: left alone")
            except FileNotFoundError:
                pass
            except NotADirectoryError:
                problems.append(f"{path} was replaced by a link or a file: left alone")
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror} (kept)")
                continue
            self.dirs.discard(path)
        return problems + self._save()

    @staticmethod
    def unchanged(name: str, sha256: str) -> bool:
        """True when a decoy still holds exactly what was written (opened for writing, not changed)."""
        return _made()[1].get(name) == sha256
