"""The rule database (docs/elkeid-protocol.md section 7): which archive to load, loading it into the
engines, and the 6050 update (download from mirrors, verify the ``.sign``, reload without a restart).

An archive is named as Elkeid names it: the last path segment of its first mirror URL, plus ``.zip``
(``archive_db_default_<version>.zip`` when no URL names it). The archive in use is remembered in
``<db_dir>/archive_db.json`` (written by the package build and by every successful update), so a restart
loads the archive the last update installed, under its own name (Elkeid kept the old name, which broke
the next load). Once every engine has taken its rules, the extracted files are removed: only the
encrypted archive stays on disk, as in Elkeid.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

from attrs import evolve, frozen

from elkscan_core.bundle import BundleError, open_bundle

log = logging.getLogger("elkscan.elkeid.db")

STATE_FILE = "archive_db.json"
DEFAULT_PASSWORD = "clamav_default_passwd"
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class DatabaseError(Exception):
    """A database could not be fetched, verified or loaded; the message says which and why."""


@frozen
class DatabaseSpec:
    """Which archive (``<db_dir>/<name>.zip``), its version, password and SHA-256, and where to fetch it."""

    version: str = ""
    sha256: str = ""
    passwd: str = DEFAULT_PASSWORD
    name: str = ""  # "" names archive_db_default_<version>
    urls: tuple[str, ...] = ()

    @classmethod
    def from_task(cls, data: Any, base: Optional[DatabaseSpec] = None) -> DatabaseSpec:
        """Override ``base`` with what a 6050 task or DETAIL says, Elkeid's way: the archive is named after
        the first mirror URL, else after ``dbname``; a new version without either takes the default name."""
        if not isinstance(data, dict):
            raise DatabaseError(f"expected a JSON object, got {type(data).__name__}")
        spec = base or cls()
        changes: dict[str, Any] = {k: str(data[k]) for k in ("version", "sha256", "passwd")
                                   if data.get(k) not in (None, "")}
        urls = data.get("url") or []
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
            raise DatabaseError(f"url must be a list of mirror URLs, got {urls!r}")
        if urls:
            changes.update(urls=tuple(urls), name=urls[0].rstrip("/").rsplit("/", 1)[-1])
        elif data.get("dbname") not in (None, ""):
            changes["name"] = str(data["dbname"])
        elif changes.get("version", spec.version) != spec.version:
            changes["name"] = ""
        spec = evolve(spec, **changes)
        spec.check()
        return spec

    @classmethod
    def from_state(cls, data: Any, base: DatabaseSpec) -> DatabaseSpec:
        """What ``archive_db.json`` remembers (an older file's ``dbname`` is the middle of the default name)."""
        if not isinstance(data, dict):
            raise DatabaseError(f"{STATE_FILE} does not hold a JSON object")
        changes = {k: str(data[k]) for k in ("version", "sha256", "passwd") if data.get(k) not in (None, "")}
        archive = str(data.get("archive") or "")
        if not archive and data.get("dbname") not in (None, "", "default"):
            archive = f"archive_db_{data['dbname']}_{changes.get('version', base.version)}.zip"
        changes["name"] = archive.removesuffix(".zip")
        urls = data.get("url")
        if isinstance(urls, list) and urls and all(isinstance(u, str) and u for u in urls):
            changes["urls"] = tuple(urls)
        spec = evolve(base, **changes)
        spec.check()
        return spec

    def check(self) -> None:
        for name in ("version", "name"):
            value = getattr(self, name)
            if value and (not _NAME_PART.match(value) or ".." in value):
                raise DatabaseError(f"{'archive name' if name == 'name' else name} {value!r} is not a plain "
                                    "name (letters, digits, . _ -)")
        if self.sha256 and not _HEX64.match(self.sha256.lower()):
            raise DatabaseError(f"sha256 {self.sha256!r} is not 64 hex digits")

    def archive(self, db_dir: str) -> str:
        return os.path.join(db_dir, f"{self.name or f'archive_db_default_{self.version}'}.zip")


def read_state(db_dir: str) -> Optional[dict]:
    path = os.path.join(db_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DatabaseError(f"{path} is unreadable ({exc}); delete it to use the configured database") from None


def write_state(db_dir: str, spec: DatabaseSpec) -> None:
    """Remember the archive in use (atomically), for the next start."""
    path = os.path.join(db_dir, STATE_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": spec.version, "sha256": spec.sha256, "passwd": spec.passwd,
                   "archive": os.path.basename(spec.archive(db_dir)), "url": list(spec.urls)}, f)
    os.replace(tmp, path)


class Database:
    """Loads archives into the session's engines, all of them or none. Extracted files live only while
    the engines take them; the archive in use is remembered, to take its rules again when a switch to
    another one must be undone."""

    def __init__(self, session, db_dir: str, extract_dir: str) -> None:
        self.session = session
        self.db_dir, self.extract_dir = db_dir, extract_dir
        self.spec: Optional[DatabaseSpec] = None  # the archive in use (None: the engines' own rules)
        self.path = ""  # where it is
        self.version = ""

    def load(self, spec: DatabaseSpec, path: Optional[str] = None) -> str:
        """Open ``spec``'s archive (or the one at ``path``) and switch every engine to it; the version
        loaded. On any failure every engine is back on the rules it had."""
        path = path or spec.archive(self.db_dir)
        if not os.path.exists(path):
            raise DatabaseError(f"rule database {path} does not exist")
        with self._extracted(spec, path) as bundle:
            self._switch(bundle.rules)
        self.spec, self.path = spec, path
        self.version = bundle.version or spec.version
        return self.version

    @contextlib.contextmanager
    def _extracted(self, spec: DatabaseSpec, path: str) -> Iterator[Any]:
        """The archive, checked and extracted into a fresh private directory that is removed on leaving
        (the engines hold the rules in memory by then; a managed clamd keeps its own copy)."""
        os.makedirs(self.extract_dir, mode=0o700, exist_ok=True)
        dest = tempfile.mkdtemp(prefix=f"{spec.version}-", dir=self.extract_dir)
        try:
            try:
                bundle = open_bundle(path, password=spec.passwd, version=spec.version or None,
                                     sha256=spec.sha256 or None, dest=dest)
            except BundleError as exc:
                raise DatabaseError(f"{path}: {exc}") from None
            yield bundle
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _switch(self, rules: Mapping[str, Sequence[str]]) -> None:
        """Every engine on ``rules``; if one refuses them, those already switched go back to the rules
        in use (extracted again from their archive), so no engine judges with rules the others lack."""
        switched = []
        for engine in list(self.session.engines):
            try:
                engine.reload(rules)
            except Exception as exc:
                refused = f"{engine.id}: {type(exc).__name__}: {exc}"
                break
            switched.append(engine)
        else:
            return
        now = f"rule database {self.version}" if self.spec else "their own rules"
        stuck = self._restore(switched)
        if stuck:
            raise DatabaseError(f"not every engine took the new rules ({refused}), and going back to {now} "
                                f"failed too ({'; '.join(stuck)}): those engines keep the new rules until a "
                                "restart, which loads the database in use")
        raise DatabaseError(f"not every engine took the new rules ({refused}); every engine is back on {now}")

    def _restore(self, engines: Sequence[Any]) -> list[str]:
        """``engines`` back on the rules in use; what failed."""
        if self.spec is None:
            return self._reload(engines, {})
        try:
            with self._extracted(self.spec, self.path) as bundle:
                return self._reload(engines, bundle.rules)
        except DatabaseError as exc:
            return [f"rule database {self.version}: {exc}"]

    @staticmethod
    def _reload(engines: Sequence[Any], rules: Mapping[str, Sequence[str]]) -> list[str]:
        stuck = []
        for engine in reversed(engines):
            try:
                engine.reload(rules)
            except Exception as exc:
                stuck.append(f"{engine.id}: {type(exc).__name__}: {exc}")
        return stuck

    def update(self, spec: DatabaseSpec, *, timeout: float, limit: int) -> str:
        """6050 (and a DETAIL archive that is not there): fetch ``<url>.zip`` and ``<url>.sign`` from each
        mirror until one verifies, load it, and only then store it under its name and remember it. The
        version now in use. The archive in use, named again with its version and SHA-256, is not fetched
        again (as Elkeid)."""
        if not spec.version:
            raise DatabaseError("the update names no version")
        if (self.spec is not None and (spec.version, spec.sha256.lower()) == (self.version, self.spec.sha256.lower())
                and os.path.exists(self.path)):
            log.info("rule database %s (sha256 %s) is already in use; not fetched again", spec.version, spec.sha256)
            return self.version
        archive, sign = fetch_verified(spec.urls, spec.sha256, timeout=timeout, limit=limit)
        spec = evolve(spec, sha256=sign)
        os.makedirs(self.db_dir, exist_ok=True)
        path = spec.archive(self.db_dir)
        tmp = f"{path}.{os.getpid()}.part"
        try:
            with open(tmp, "wb") as f:
                f.write(archive)
            version = self.load(spec, tmp)
            os.replace(tmp, path)  # the archive in use keeps its name until a new one is running
            self.path = path
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        write_state(self.db_dir, spec)
        return version

def download(url: str, *, timeout: float, limit: int) -> bytes:
    """GET ``url`` (http or https only), at most ``limit`` bytes, all of it within ``timeout`` seconds.
    The deadline bounds the whole transfer (connection, headers, redirects, body), not each read: a
    mirror that drips a byte a second cannot hold the update, and every later one, for days."""
    if not url.lower().startswith(("http://", "https://")):
        raise DatabaseError(f"{url}: only http and https URLs are fetched")
    watch = _Deadline(timeout)
    data = bytearray()
    try:
        with watch.opener().open(url, timeout=timeout) as response:
            while len(data) <= limit:
                chunk = response.read1(min(1 << 16, limit + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
    except urllib.error.HTTPError as exc:
        if not watch.expired:
            raise DatabaseError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        if not watch.expired:
            raise DatabaseError(f"{url}: {getattr(exc, 'reason', None) or exc}") from None
    finally:
        watch.cancel()
    if watch.expired:
        raise DatabaseError(f"{url}: not complete after {timeout:g} s ({len(data)} bytes received); "
                            "download_timeout bounds the whole download")
    if len(data) > limit:
        raise DatabaseError(f"{url}: larger than the {limit}-byte limit")
    return bytes(data)


class _Deadline:
    """Shuts every connection of one download when its time is up, which ends any read in progress
    (a TLS handshake and headers included)."""

    def __init__(self, timeout: float) -> None:
        self.expired = False
        self._watched: list[socket.socket] = []  # duplicates: they stay valid when TLS takes the socket over
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._watched:
                _shut(sock)

    def _opened(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._watched.append(sock.dup())
            if self.expired:
                _shut(sock)
        return sock

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._watched:
                sock.close()
            self._watched.clear()

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener (redirects checked as usual) whose connections this deadline watches."""
        watch = self

        def watched(connection_class):
            class Watched(connection_class):
                def __init__(self, *args, **kwargs) -> None:
                    super().__init__(*args, **kwargs)
                    create = self._create_connection  # how http.client makes its TCP connection
                    self._create_connection = lambda *a, **k: watch._opened(create(*a, **k))
            return Watched

        class HTTPHandler(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(watched(http.client.HTTPConnection), req)

        class HTTPSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

        return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def fetch_verified(urls: Iterable[str], expected: str = "", *, timeout: float, limit: int) -> tuple[bytes, str]:
    """(archive bytes, its SHA-256) from the first mirror whose ``.sign`` matches the archive (and the
    task's ``sha256`` when it names one). DatabaseError lists why each mirror failed."""
    problems = []
    for base in urls:
        try:
            archive = download(f"{base}.zip", timeout=timeout, limit=limit)
            sign = download(f"{base}.sign", timeout=timeout, limit=1024).decode("ascii", "replace").strip().lower()
            if not _HEX64.match(sign):
                raise DatabaseError(f"{base}.sign does not hold a hex SHA-256")
            actual = hashlib.sha256(archive).hexdigest()
            if actual != sign:
                raise DatabaseError(f"{base}.zip has SHA-256 {actual}, its .sign says {sign}")
            if expected and actual != expected.lower():
                raise DatabaseError(f"{base}.zip has SHA-256 {actual}, the task expects {expected.lower()}")
            return archive, actual
        except DatabaseError as exc:
            log.warning("database mirror failed: %s", exc)
            problems.append(str(exc))
    if not problems:
        raise DatabaseError("the update names no mirror URL")
    raise DatabaseError("no mirror gave a verified database: " + " | ".join(problems))
