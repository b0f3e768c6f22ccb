"""The rules state directory: the bundles ``elkscan rules update`` made, which one is in use, the one
before it, and the last good copy of each source.

::

    <state>/rules/                 0700, ours (elkscan_core.trust)
      state.json                   the current and the previous bundle: version, sources, what was set aside
      bundles/<version>.zip|.sign  the bundles themselves (elkscan db's format)
      active/<version>/            each kept bundle extracted (open_bundle: its .sign checked)
      current -> active/<version>  what scans use: rules: [builtin, <state>/rules/current]
      sources/<name>/last/         the last copy of a source that was fetched whole
      lock                         one update or rollback at a time
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from elkscan_core.bundle import BundleError, open_bundle, read_sign, sign_path_for
from elkscan_core.errors import ElkscanError
from elkscan_core.trust import UntrustedError, check_trusted

_STATE_MAX = 64 * 1024 * 1024


class StoreError(ElkscanError):
    """The rules state directory cannot be used, or holds nothing to roll back to."""


class Store:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def ensure(self) -> None:
        """Create the directory (0700) and refuse one that another user could change."""
        existing = self.path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        self._trusted(existing)
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self._trusted(self.path)
        if stat.S_IMODE(os.lstat(self.path).st_mode) & 0o077:
            os.chmod(self.path, 0o700)
        for name in ("bundles", "active", "sources", "tmp"):
            os.makedirs(os.path.join(self.path, name), mode=0o700, exist_ok=True)

    def _trusted(self, path: str) -> None:
        try:
            check_trusted(path, "rules state directory")
        except UntrustedError as exc:
            raise StoreError(str(exc)) from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"another 'elkscan rules' is updating {self.path}; try again when it is "
                                 "done") from None
            yield
        finally:
            os.close(fd)

    # -- state.json ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        path = os.path.join(self.path, "state.json")
        if not os.path.lexists(path):
            return {}
        self._trusted(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as handle:
                data = json.loads(handle.read(_STATE_MAX))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} cannot be read ({exc}); remove it and run 'elkscan rules update'") from None
        if not isinstance(data, dict):
            raise StoreError(f"{path} is not a rules state file; remove it and run 'elkscan rules update'")
        return data

    def save_state(self, state: dict[str, Any]) -> None:
        self.write_json(os.path.join(self.path, "state.json"), state)

    @staticmethod
    def write_json(path: str, data: Any) -> None:
        tmp = f"{path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)

    # -- bundles ------------------------------------------------------------------------------

    def bundle_path(self, version: str) -> str:
        return os.path.join(self.path, "bundles", f"{version}.zip")

    def activate(self, version: str, password: str) -> str:
        """Extract the bundle ``version`` (checked against its .sign) if it is not yet, and point
        ``current`` at it; return the extracted directory."""
        bundle = self.bundle_path(version)
        if not os.path.isfile(bundle):
            raise StoreError(f"bundle {bundle} is gone; run 'elkscan rules update'")
        directory = os.path.join(self.path, "active", version)
        if not os.path.isdir(directory):
            tmp = os.path.join(self.path, "tmp", f"active-{version}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                open_bundle(bundle, password=password, version=version, sha256=read_sign(sign_path_for(bundle)),
                            dest=tmp)
            except BundleError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.rename(tmp, directory)
        link = os.path.join(self.path, "current")
        tmp_link = f"{link}.tmp.{os.getpid()}"
        if os.path.lexists(tmp_link):
            os.unlink(tmp_link)
        os.symlink(os.path.join("active", version), tmp_link)
        os.replace(tmp_link, link)  # a scan starting now sees the old set or the new one, whole
        return directory

    def prune(self, keep: set[str]) -> None:
        """Remove bundles and their extracted copies that are neither current nor previous."""
        for name in os.listdir(os.path.join(self.path, "bundles")):
            version = name.rsplit(".", 1)[0]
            if version not in keep:
                os.unlink(os.path.join(self.path, "bundles", name))
        for version in os.listdir(os.path.join(self.path, "active")):
            if version not in keep:
                shutil.rmtree(os.path.join(self.path, "active", version), ignore_errors=True)

    # -- sources ------------------------------------------------------------------------------

    def source_dir(self, name: str) -> str:
        path = os.path.join(self.path, "sources", name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def keep_source(self, name: str, tree: str, meta: dict[str, Any]) -> str:
        """Make ``tree`` the source's last good copy; return where it now is."""
        base = self.source_dir(name)
        last = os.path.join(base, "last")
        old = os.path.join(base, f"old.{os.getpid()}")
        if os.path.isdir(last):
            os.rename(last, old)
        os.rename(tree, last)
        shutil.rmtree(old, ignore_errors=True)
        self.write_json(os.path.join(base, "meta.json"), meta)
        return last

    def last_source(self, name: str) -> tuple[str, dict[str, Any]] | None:
        base = os.path.join(self.path, "sources", name)
        last, meta = os.path.join(base, "last"), os.path.join(base, "meta.json")
        if not (os.path.isdir(last) and os.path.isfile(meta)):
            return None
        try:
            with open(meta, encoding="utf-8") as handle:
                return last, json.load(handle)
        except (OSError, ValueError):
            return None
