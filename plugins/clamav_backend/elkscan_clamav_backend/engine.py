"""The ``clamav`` engine: each file judged by clamd, through the descriptor the scanner holds."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Optional

import attrs
from attrs import frozen

from elkscan_core import (EICAR, Canary, ComponentError, Detection, Duration, ElkscanError, Engine, Size,
                          Subject)
from elkscan_core.bundle import CLAMAV_SUFFIXES, DEFAULT_PASSWORD, BundleError, open_bundle, rule_kind
from elkscan_core.model import NotScanned
from elkscan_core.trust import check_trusted, check_trusted_tree
from elkscan_core.units import MiB

from .canary import CANARY_FILE, eicar_canary, private_canary
from .daemon import ManagedClamd, clamd_version, find_binary, render_config
from .protocol import (LIMIT_ALERT, Address, ClamdClient, ClamdError, ClamdInterrupted, ClamdUnavailable,
                       Reply, UntrustedPeer)

MODES = ("auto", "fildes", "instream", "path")
#: clamd's limit names -> the option that sets each one.
_LIMIT_OPTIONS = {"MaxFileSize": "max_file_size", "MaxScanSize": "max_scan_size",
                  "MaxScanTime": "max_scan_time", "MaxRecursion": "max_recursion", "MaxFiles": "max_files"}
#: Limits whose alert the same bytes, database and limits always give; MaxScanTime depends on the load
#: (a file over it is an error, judged again next time, as a timeout is).
_SIZE_LIMITS = frozenset({"MaxFileSize", "MaxScanSize", "MaxFiles", "MaxRecursion"})
_EXTERNAL_VERSION_TTL = 60.0
#: ``parse:`` names -> the clamd.conf key that turns that parser on, and the clamd version that knows it.
PARSERS = {"pe": ("ScanPE", (0, 0)), "elf": ("ScanELF", (0, 0)), "ole2": ("ScanOLE2", (0, 0)),
           "pdf": ("ScanPDF", (0, 0)), "swf": ("ScanSWF", (0, 0)), "html": ("ScanHTML", (0, 0)),
           "xmldocs": ("ScanXMLDOCS", (0, 0)), "hwp3": ("ScanHWP3", (0, 0)), "mail": ("ScanMail", (0, 0)),
           "archive": ("ScanArchive", (0, 0)), "image": ("ScanImage", (1, 0)), "onenote": ("ScanOneNote", (1, 1))}
#: What ``heuristics: false`` turns off: clamd's heuristic alerts (libclamav's scan option ``heuristic``).
HEURISTIC_KEYS = ("HeuristicAlerts", "AlertBrokenExecutables", "AlertBrokenMedia", "AlertEncrypted",
                  "AlertEncryptedArchive", "AlertEncryptedDoc", "AlertOLE2Macros", "AlertPhishingSSLMismatch",
                  "AlertPhishingCloak", "AlertPartitionIntersection")


def _address(value: Optional[str]) -> Optional[str]:
    if value is not None:
        Address.parse(value)
    return value


def _check_parse(_instance, _attribute, value: Optional[list[str]]) -> None:
    unknown = sorted(set(value or ()) - set(PARSERS))
    if unknown:
        raise ValueError(f"unknown file type(s) {', '.join(unknown)}; choose from {', '.join(PARSERS)}")


@frozen
class ClamavConfig:
    """Options of ``use: clamav`` (see plugins/clamav_backend/README.md)."""

    socket: Optional[str] = attrs.field(default=None, converter=_address)
    managed: Optional[bool] = None
    database: Optional[str] = None
    password: str = DEFAULT_PASSWORD
    bundle_version: Optional[str] = None
    bundle_sha256: Optional[str] = None
    clamd: str = "clamd"
    runtime_dir: Optional[str] = None
    mode: str = attrs.field(default="auto", validator=attrs.validators.in_(MODES))
    allmatch: bool = False
    max_file_size: Size = Size(18 * MiB)
    max_scan_size: Size = Size(25 * MiB)
    max_scan_time: Duration = Duration(5)
    max_recursion: int = 17
    max_files: int = 10000
    parse: Optional[list[str]] = attrs.field(default=None, validator=_check_parse)
    heuristics: bool = True
    threads: int = 4
    timeout: Duration = Duration(30)
    startup_timeout: Duration = Duration(300)
    restart_timeout: Duration = Duration(30)
    peer_user: Optional[str] = None
    trust_network: bool = False

    def __attrs_post_init__(self) -> None:
        if self.socket and self.managed:
            raise ValueError("give either socket: (a running clamd) or managed: true (elkscan starts its "
                             "own), not both")
        if self.socket and self.database:
            raise ValueError("database: applies only to a managed clamd; a clamd reached through socket: "
                             "loads its own database")
        if self.peer_user is not None and not (self.socket and Address.parse(self.socket).is_unix):
            raise ValueError("peer_user: names the user of a clamd reached through socket: /path; a managed "
                             "clamd runs as elkscan's own user, and a TCP peer cannot be checked")
        if self.trust_network and not (self.socket and not Address.parse(self.socket).is_unix):
            raise ValueError("trust_network: applies only to socket: HOST:PORT")
        if self.managed is False and not self.socket:
            raise ValueError("managed: false needs socket: <path or host:port> of a running clamd")
        if self.allmatch and self.mode not in ("auto", "path"):
            raise ValueError(f"allmatch needs mode: path (clamd has ALLMATCHSCAN only for paths), "
                             f"not mode: {self.mode}")
        if self.threads < 1:
            raise ValueError("threads: needs at least 1")
        if self.socket and (self.parse is not None or not self.heuristics):
            raise ValueError("parse: and heuristics: configure a managed clamd; a clamd reached through "
                             "socket: reads its own clamd.conf")

    @property
    def is_managed(self) -> bool:
        return not self.socket


def default_signatures() -> list[str]:
    """The project's own ClamAV signature files (package data)."""
    folder = files("elkscan_clamav_backend.signatures")
    return sorted(str(p) for p in folder.iterdir() if rule_kind(p.name) == "clamav")


def digest_files(paths: Sequence[str]) -> str:
    """A SHA-256 over the names and contents of rule files: the rule part of ``version()``."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=os.path.basename):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _os_error(exc: OSError) -> str:
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


class ClamavEngine(Engine):
    """Asks clamd about each file: FILDES on a Unix socket, INSTREAM over TCP, or SCAN by path."""

    id = "clamav"
    Config = ClamavConfig
    unpacks_archives = True

    def __init__(self, config: ClamavConfig, session) -> None:
        super().__init__(config, session)
        # Larger files are not sent at all (as Elkeid's engine skips them), rather than refused by clamd.
        self.max_file_size = config.max_file_size
        # One call may wait for a restart and scan twice; the runner's deadline is only the backstop.
        self.call_timeout = 2 * config.timeout + config.restart_timeout + 5
        self.daemon: ManagedClamd | None = None
        self.client: ClamdClient | None = None
        self.mode = config.mode
        self._runtime: str | None = None
        self._rules_digest = ""
        self._options = ""  # the part of version() for parse: and heuristics: (clean verdicts depend on them)
        self._limits_text = ""  # limits(): a managed clamd's scan settings; '' for an external clamd's
        self._version = ""
        self._version_at = 0.0
        self._reload_lock = threading.Lock()
        self._peers: dict[int, str] = {}
        self._canary, self._canary_rule = private_canary()
        self._configured: list[str] = []  # the database files the configuration names
        self._on_bundle = False  # whether a reload replaced them

    # -- start and stop ------------------------------------------------------------------------

    def check(self) -> None:
        """What ``start`` would use, with no clamd started: an existing clamd's socket (there, or TCP
        allowed) and peer user; a managed clamd's binary (found, trusted), its runtime directory (when
        it exists) and its database (found, trusted, a bundle verified in a scratch directory)."""
        if not self.config.is_managed:
            self._external_address()
            self._peer_uids()
            return
        clamd = self.config.clamd
        binary = find_binary(self.session.resolve_path(clamd) if "/" in clamd else clamd)
        if binary is None:
            raise ComponentError(f"clamd is not installed ({clamd} not found): install the Debian package "
                                 "'clamav-daemon', or point the clamav engine at a running clamd with "
                                 "'socket:'")
        check_trusted(binary, "clamd binary")
        runtime_dir = self.config.runtime_dir and self.session.resolve_path(self.config.runtime_dir)
        if runtime_dir and os.path.exists(runtime_dir):
            check_trusted(runtime_dir, "clamd's runtime directory")
        with tempfile.TemporaryDirectory(prefix="elkscan-check-") as scratch:
            self._runtime = scratch  # where a bundle is extracted, as start would
            try:
                self._database_files()
            except OSError as exc:
                raise ComponentError(f"cannot read the database: {_os_error(exc)}") from None
            finally:
                self._runtime = None

    def start(self) -> None:
        try:
            if self.config.is_managed:
                self._start_managed()
            else:
                self._reach_external()
            if self.mode == "auto":
                self.mode = ("path" if self.config.allmatch else
                             "fildes" if self.client.address.is_unix else "instream")
            self._refresh_version()
            if self.daemon is None:  # a managed clamd passes its canary at every start, in the supervisor
                eicar_canary().check(self.client)
        except BaseException as exc:
            self.close()  # nothing started stays behind: no clamd, no runtime directory
            if isinstance(exc, (ClamdError, ClamdUnavailable, ElkscanError)):
                raise ComponentError(str(exc)) from None
            if isinstance(exc, OSError):
                raise ComponentError(f"cannot start: {_os_error(exc)}") from None
            raise

    def _reach_external(self) -> None:
        address = self._external_address()
        self._peers = self._peer_uids()
        self.client = ClamdClient(address, self.config.timeout, cancelled=self.session.stopping.is_set,
                                  check_peer=self._check_external_peer)
        try:
            self.client.ping()
        except ClamdUnavailable as exc:
            raise ComponentError(f"{exc}; is clamd running? (or use managed: true)") from None

    def _external_address(self) -> Address:
        """An existing clamd's address, once allowed: a Unix socket that is there, or TCP when safe."""
        address = Address.parse(self.config.socket)
        if address.is_unix:
            address = Address(path=self.session.resolve_path(address.path))
        elif self.mode == "fildes":
            raise ComponentError(f"mode: fildes passes descriptors over a Unix socket; clamd at {address} is "
                                 "reached over TCP (use mode: instream, or auto)")
        elif os.geteuid() == 0 and not self.config.trust_network:
            raise ComponentError(f"clamd at {address} is reached over TCP, which nothing authenticates: any "
                                 "local user who binds that port while clamd restarts would decide every "
                                 "verdict of this scan running as root. Use clamd's Unix socket (LocalSocket), "
                                 "or set trust_network: true to accept that risk")
        if address.is_unix and not os.path.exists(address.path):
            raise ComponentError(f"no clamd socket at {address.path}: start clamd (Debian package "
                                 "'clamav-daemon'), fix socket:, or use managed: true")
        if address.is_unix and not stat.S_ISSOCK(os.stat(address.path).st_mode):
            raise ComponentError(f"{address.path} is not a socket: socket: names clamd's LocalSocket")
        return address

    def _peer_uids(self) -> dict[int, str]:
        """Who may answer on an external clamd's Unix socket: root, this user, and clamd's own user
        (``peer_user``; by default Debian's ``clamav``, when that user exists)."""
        peers = {0: "root", os.geteuid(): "this user"}
        name = self.config.peer_user
        if name is not None and name.isdigit():
            peers.setdefault(int(name), f"uid {name}")
            return peers
        try:
            peers.setdefault(pwd.getpwnam(name or "clamav").pw_uid, name or "clamav")
        except KeyError:
            if name is not None:
                raise ComponentError(f"peer_user: there is no user {name!r} on this host") from None
        return peers

    def _check_external_peer(self, pid: int, uid: int) -> None:
        if uid not in self._peers:
            raise UntrustedPeer(f"{self.client.address} is answered by uid {uid} (pid {pid}), not by "
                                f"{' or '.join(dict.fromkeys(self._peers.values()))}: another program may be "
                                "answering in clamd's place, so its verdicts are refused (if clamd runs as "
                                "that user, name it with peer_user:)")

    def _start_managed(self) -> None:
        parent = self.session.resolve_path(self.config.runtime_dir) if self.config.runtime_dir else None
        try:
            if parent:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            self._runtime = tempfile.mkdtemp(prefix="elkscan-clamd-", dir=parent)
        except OSError as exc:
            where = parent or tempfile.gettempdir()
            raise ComponentError(f"cannot create clamd's runtime directory in {where}: {exc.strerror or exc} "
                                 "(set runtime_dir: to a directory elkscan can write)") from None
        check_trusted(self._runtime, "clamd's runtime directory")
        clamd = self.config.clamd
        binary = find_binary(self.session.resolve_path(clamd) if "/" in clamd else clamd)
        if binary:  # a missing one is reported by the daemon, with how to install it
            check_trusted(binary, "clamd binary")
        database_dir = os.path.join(self._runtime, "db")
        os.mkdir(database_dir, 0o700)
        rule_files = self._configured = self._database_files()
        self._install(rule_files, database_dir)
        self._rules_digest = digest_files(rule_files)
        version = clamd_version(binary) if binary and self.config.parse is not None else (0, 0)
        self.daemon = ManagedClamd(binary or clamd, self._runtime, database_dir, self._limits(version),
                                   startup_timeout=self.config.startup_timeout, timeout=self.config.timeout,
                                   database_label=self._database_label(), verify=self._canary.check,
                                   cancelled=self.session.stopping.is_set)
        self._limits_text = render_config(self.daemon.scan_settings).strip().replace("\n", "; ")
        if self.config.parse is not None or not self.config.heuristics:
            chosen = f"parse {','.join(sorted(self.config.parse or ()))} heuristics {self.config.heuristics}"
            self._options = f" options {hashlib.sha256(chosen.encode()).hexdigest()[:12]}"
        self.daemon.start()
        self.client = self.daemon.client

    def _install(self, paths: Sequence[str], directory: str) -> None:
        """Put rule files into clamd's private database directory (hard links where possible), with the
        canary signature next to them."""
        for path in paths:
            target = os.path.join(directory, os.path.basename(path))
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(os.path.join(directory, CANARY_FILE), flags, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self._canary_rule)

    def _limits(self, clamd_version: tuple[int, int]) -> dict[str, object]:
        """The clamd.conf settings the options make: limits, and which parsers and alerts are on (only
        keys this clamd knows: an unknown key stops clamd)."""
        c = self.config
        settings: dict[str, object] = {
            "MaxFileSize": c.max_file_size, "MaxScanSize": c.max_scan_size, "StreamMaxLength": c.max_file_size,
            "MaxScanTime": int(c.max_scan_time * 1000), "MaxRecursion": c.max_recursion, "MaxFiles": c.max_files,
            "MaxThreads": c.threads}
        if c.parse is not None:
            settings.update({key: name in c.parse for name, (key, since) in PARSERS.items()
                             if clamd_version >= since})
        if not c.heuristics:
            settings.update(dict.fromkeys(HEURISTIC_KEYS, False))
        return settings

    def _database_label(self) -> str:
        if self.config.database is None:
            return "the project's own signatures"
        return self.session.resolve_path(self.config.database)

    def _database_files(self) -> list[str]:
        """The ClamAV files to load: the project's own signatures, a directory's, or a bundle's."""
        if self.config.database is None:
            return default_signatures()
        path = self.session.resolve_path(self.config.database)
        if not os.path.exists(path):
            raise ComponentError(f"database {path} does not exist (database: names a directory of ClamAV "
                                 "databases, a database file, or a rule bundle .zip)")
        if os.path.isdir(path):
            check_trusted_tree(path, "ClamAV database directory")
            # A database directory is loaded as clamd would load it, YARA files included; in a
            # bundle, YARA files are the yara engine's.
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if rule_kind(name) in ("clamav", "yara") and os.path.isfile(os.path.join(path, name)))
            if not found:
                raise ComponentError(f"no ClamAV database files ({' '.join(CLAMAV_SUFFIXES[:6])} ...) in "
                                     f"{path}")
            return found
        check_trusted(path, "ClamAV database")
        if path.lower().endswith(".zip"):
            try:
                bundle = open_bundle(path, password=self.config.password, version=self.config.bundle_version,
                                     sha256=self.config.bundle_sha256,
                                     dest=os.path.join(self._runtime, "bundle"))
            except BundleError as exc:
                raise ComponentError(str(exc)) from None
            if not bundle.rules.get("clamav"):
                raise ComponentError(f"rule bundle {path} (version {bundle.version}) holds no ClamAV files")
            return list(bundle.rules["clamav"])
        if os.path.isfile(path) and rule_kind(path) == "clamav":
            return [path]
        raise ComponentError(f"database {path} is neither a directory of ClamAV databases, a ClamAV "
                             "database file, nor a rule bundle (.zip)")

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    @property
    def canary(self) -> Optional[Canary]:
        """What the session's periodic canary gives this engine through ``scan()``: a managed clamd the
        buffer its own database must report, an existing clamd EICAR. By path (``mode: path``) clamd
        cannot read a file held in memory: its start and reload canaries are all it gets."""
        if self.mode == "path":
            return None
        if self.daemon is None:
            return EICAR
        own = self._canary
        return Canary(own.data, own.what, (own.signature, f"{own.signature}.UNOFFICIAL"))

    # -- scanning ------------------------------------------------------------------------------

    def scan(self, subject: Subject) -> list[Detection]:
        reply = self._with_retry(lambda: self._ask(subject))
        if reply.limits and not reply.signatures:
            names = list(dict.fromkeys(limit[len(LIMIT_ALERT):] for limit in reply.limits))
            if _SIZE_LIMITS.issuperset(names):  # not read whole, and never will be under these limits
                raise NotScanned(f"above clamav's {', '.join(_LIMIT_OPTIONS[n] for n in names)}" if self.daemon
                                 else f"above clamd's {', '.join(names)}", deterministic=True)
            options = ", ".join(_LIMIT_OPTIONS.get(n, n) for n in names)
            where = "the clamav engine's" if self.daemon else "clamd's own configuration's"
            raise ClamdError(f"clamd did not scan the whole file: its {', '.join(names)} limit was exceeded "
                             f"(raise {options} in {where} options to scan it)")
        meta = {"limits_exceeded": list(reply.limits)} if reply.limits else None
        # ALLMATCHSCAN reports a signature once per layer it matched (raw, normalised text): once is enough.
        return [Detection.from_signature(self.id, signature, meta=meta)
                for signature in dict.fromkeys(reply.signatures)]

    def _ask(self, subject: Subject) -> Reply:
        if self.mode == "fildes":
            return self.client.scan_fd(subject.fd)
        if self.mode == "instream":
            return self.client.scan_stream(subject.fd)
        return self.client.scan_path(self._path_of(subject), self.config.allmatch)

    @staticmethod
    def _path_of(subject: Subject) -> str:
        """The real path of the opened file, checked to still be that file (clamd skips symlinks)."""
        real = os.path.realpath(subject.path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise ClamdError(f"cannot scan by path: {real}: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != (subject.stat.st_dev, subject.stat.st_ino):
            raise ClamdError(f"{subject.path} was replaced after it was opened; not scanned by path "
                             "(mode: fildes scans the opened file)")
        if "\0" in real:
            raise ClamdError("a path with a NUL byte cannot be scanned by path")
        return real

    def _with_retry(self, attempt):
        """Run a clamd call; if clamd was lost, wait for it (a managed one is being restarted, and must
        pass its canary) and try once more; a second failure is reported, so no file is passed over
        silently."""
        daemon = self.daemon
        generation = daemon.generation if daemon else 0
        try:
            return attempt()
        except ClamdUnavailable as first:
            if daemon is not None and not daemon.wait_ready(generation, self.config.restart_timeout):
                if daemon.cancelled():
                    raise ClamdInterrupted(f"{first}; elkscan is stopping, so it did not wait for clamd "
                                           "to come back") from None
                raise ClamdUnavailable(f"{first}; clamd has not come back within "
                                       f"{self.config.restart_timeout:g}s"
                                       + (f" ({daemon.last_error})" if daemon.last_error else "")) from None
        try:
            return attempt()
        except ClamdUnavailable as second:
            raise ClamdUnavailable(f"clamd failed twice on this file: {second}") from None

    # -- versions and rules ----------------------------------------------------------------------

    def _refresh_version(self) -> None:
        try:
            answer = self.client.version()
        except ClamdUnavailable:
            if self._version:
                return
            raise
        rules = f" rules {self._rules_digest[:16]}" if self._rules_digest else ""
        self._version, self._version_at = f"{answer}{rules}{self._options}", time.monotonic()

    def version(self) -> str:
        """clamd's VERSION (engine and, for freshclam's databases, their version) and, for a managed
        clamd, a digest of the rule files it loaded and of ``parse:`` and ``heuristics:`` when set."""
        if self.daemon is None and time.monotonic() - self._version_at > _EXTERNAL_VERSION_TTL:
            self._refresh_version()
        return self._version

    def limits(self) -> str:
        """A managed clamd's scan settings (limits, parsers, alerts), which decide the files it cannot
        scan whole; '' for an external clamd, whose clamd.conf elkscan cannot know: what it leaves
        unread is then never cached."""
        return self._limits_text

    def describe(self) -> str:
        if self.daemon is None:
            return f"clamav: clamd at {self.client.address} ({self._version}), mode {self.mode}"
        database = "a rule bundle" if self._on_bundle else self._database_label()
        return (f"clamav: managed clamd at {self.client.address} ({self._version}), mode {self.mode}, "
                f"database {database}")

    def reload(self, rules: Mapping[str, Sequence[str]]) -> None:
        """Load a bundle's ClamAV files into the managed clamd (RELOAD); the old rules stay if clamd
        rejects the new ones or fails its canaries with them. Rules without ClamAV files put it back on
        its configured database (how an Elkeid update that another engine refused is undone)."""
        clamav_files = list(rules.get("clamav", ()))
        if not clamav_files:
            if not self._on_bundle:
                return
            clamav_files = self._configured
        if self.daemon is None:
            raise RuntimeError(f"the clamav engine uses an external clamd at {self.config.socket}, which "
                               "loads its own database; update that database (freshclam) instead")
        with self._reload_lock:
            live = self.daemon.database_dir
            staged, previous = f"{live}.next", f"{live}.previous"
            shutil.rmtree(staged, ignore_errors=True)
            os.mkdir(staged, 0o700)
            self._install(clamav_files, staged)
            os.rename(live, previous)
            os.rename(staged, live)
            try:
                self.daemon.reload(self.config.startup_timeout)
            except (RuntimeError, ClamdError, ClamdUnavailable):
                shutil.rmtree(live)
                os.rename(previous, live)  # what clamd still runs is what a restart must load
                raise
            try:
                self._canary.check(self.client)
            except (ClamdError, ClamdUnavailable) as exc:
                shutil.rmtree(live)
                os.rename(previous, live)
                self.daemon.reload(self.config.startup_timeout)  # back to the rules that judged
                raise RuntimeError(f"clamd judges wrongly with the new database ({exc}); the old one is "
                                   "loaded again") from None
            shutil.rmtree(previous)
            self._on_bundle = clamav_files is not self._configured
            self._rules_digest = digest_files(clamav_files)
            self._refresh_version()
