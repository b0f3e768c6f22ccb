"""Fetch one rule source into a new private directory: a git repository (the ``git`` command, never its
hooks or submodules), an https download (an archive or one rule file, bounded in size and time), a local
directory, or ClamAV's database through ``freshclam``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from attrs import frozen

from elkscan_core.bundle import CLAMAV_SUFFIXES, YARA_SUFFIXES, Limits as ArchiveLimits
from elkscan_core.errors import ElkscanError
from elkscan_core.trust import UntrustedError, check_trusted, check_trusted_tree

from .archive import ArchiveError, extract, kind_of
from .config import Limits, SourceSpec

#: What git may run and read: no hooks, no fsmonitor, no submodules, only the https, ssh and file
#: transports (never ``ext::``, which runs a command), no configuration but ours.
GIT_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "protocol.allow=never",
              "-c", "protocol.https.allow=always", "-c", "protocol.ssh.allow=always", "-c",
              "protocol.file.allow=always", "-c", "protocol.http.allow=always",
              "-c", "submodule.recurse=false", "-c", "fetch.recurseSubmodules=false", "-c",
              "transfer.fsckObjects=true")
_PASSED_ENV = ("PATH", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY",
               "SSL_CERT_FILE", "SSL_CERT_DIR", "GIT_SSL_CAINFO")


class FetchError(ElkscanError):
    """A source could not be fetched; the message names it."""


@frozen
class Fetched:
    """Where the source's files are now, and what identifies this copy (a commit, a digest)."""

    tree: str
    version: str
    detail: str = ""


def check_url(url: str) -> None:
    """ValueError unless ``url`` is https, or http to this host (a local mirror, the tests)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _loopback(parts.hostname):
        return
    raise ValueError(f"url {url[:200]!r} must be https:// (plain http only to this host)")


def check_git_location(location: str, name: str) -> None:
    """A repository over https, ssh, a local path or file://; plain http only to this host; never an
    option nor a transport that runs a command (``ext::``)."""
    scheme = urllib.parse.urlsplit(location).scheme
    if location.startswith("-") or "::" in location.split("/", 1)[0] or scheme not in (
            "", "https", "ssh", "file", "http"):
        raise FetchError(f"source {name}: git location {location[:200]!r} is not an https, ssh or local "
                         "repository")
    if scheme == "http":
        try:
            check_url(location)
        except ValueError as exc:
            raise FetchError(f"source {name}: {exc}") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch(spec: SourceSpec, source_dir: str, work: str, limits: Limits) -> Fetched:
    """Fetch ``spec`` into ``work`` (a new private directory); ``source_dir`` keeps what lasts between
    updates (a git source's repository)."""
    if spec.kind == "git":
        return _git(spec, source_dir, work, limits)
    if spec.kind == "url":
        return _url(spec, work, limits)
    if spec.kind == "dir":
        return _dir(spec, work, limits)
    return _freshclam(spec, work, limits)


def _subdir(tree: str, spec: SourceSpec) -> str:
    path = os.path.join(tree, spec.path) if spec.path else tree
    if not os.path.isdir(path) or os.path.islink(path):
        raise FetchError(f"source {spec.name}: no directory {spec.path!r} in what was fetched")
    return path


def _archive_limits(limits: Limits) -> ArchiveLimits:
    return ArchiveLimits(max_entries=max(limits.max_files * 5, 10_000), max_total_size=limits.download_size * 4)


# -- git ----------------------------------------------------------------------------------------


def _git_env(home: str) -> dict[str, str]:
    env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
    env.update({"HOME": home, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
                "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "SSH_ASKPASS": "/bin/false",
                "GIT_PROTOCOL_FROM_USER": "0", "LC_ALL": "C"})
    env.setdefault("PATH", "/usr/bin:/bin")
    return env


def _run(argv: list[str], timeout: float, what: str, env: dict[str, str] | None = None,
         stdout=subprocess.PIPE, cwd: str | None = None) -> str:
    """Run a command in its own process group, killed whole when it outlives ``timeout``."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                                   env=env, cwd=cwd, start_new_session=True)
    except OSError as exc:
        raise FetchError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise FetchError(f"{what}: {os.path.basename(argv[0])} did not finish within {timeout:g}s") from None
    if process.returncode:
        said = (err or b"").decode(errors="replace") or (out or b"").decode(errors="replace")
        errors = [line for line in said.splitlines() if "ERROR" in line or "fatal" in line] or said.splitlines()
        message = " ".join(" ".join(errors[-3:]).split())[-400:]
        raise FetchError(f"{what}: {os.path.basename(argv[0])} failed: {message or process.returncode}")
    return out.decode(errors="replace") if out else ""


def _git(spec: SourceSpec, source_dir: str, work: str, limits: Limits) -> Fetched:
    location = spec.location
    check_git_location(location, spec.name)
    what = f"source {spec.name} (git {location})"
    repo = os.path.join(source_dir, "repo.git")
    env = _git_env(work)
    deadline = time.monotonic() + limits.git_timeout
    git = ["git", *GIT_CONFIG, f"--git-dir={repo}"]
    if not os.path.isdir(repo):
        _run(["git", *GIT_CONFIG, "init", "--quiet", "--bare", "--template=", repo], 60, what, env)
    ref = spec.ref or "HEAD"
    fetch = [*git, "fetch", "--quiet", "--no-tags", "--no-recurse-submodules", "--no-write-fetch-head"]
    target = "refs/elkscan/fetched"
    try:
        _run([*fetch, "--depth=1", "--", location, f"+{ref}:{target}"], _left(deadline, what), what, env)
    except FetchError:
        if not spec.ref:
            raise
        # a commit that is no branch or tag: fetch the history and look for it there
        _run([*fetch, "--", location, "+refs/heads/*:refs/elkscan/heads/*", "+refs/tags/*:refs/elkscan/tags/*"],
             _left(deadline, what), what, env)
        _run([*git, "update-ref", target, f"{ref}^{{commit}}"], 60, what, env)
    commit = _run([*git, "rev-parse", "--verify", f"{target}^{{commit}}"], 60, what, env).strip()
    tar_path = os.path.join(work, "tree.tar")
    argv = [*git, "archive", "--format=tar", commit]
    if spec.path:
        argv += ["--", spec.path]
    with open(tar_path, "xb") as handle:
        _run(argv, _left(deadline, what), what, env, stdout=handle)
    if os.path.getsize(tar_path) > limits.download_size * 4:
        raise FetchError(f"{what}: more than {limits.download_size * 4} bytes of files")
    tree = os.path.join(work, "tree")
    try:
        extract(tar_path, tree, what, _archive_limits(limits), links="skip")
    except ArchiveError as exc:
        raise FetchError(str(exc)) from None
    finally:
        os.unlink(tar_path)
    return Fetched(_subdir(tree, spec), commit, f"{location} {spec.ref or 'HEAD'}")


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"{what}: out of time (limits.git_timeout)")
    return left


# -- https --------------------------------------------------------------------------------------


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to where a source's URL may point itself (never down to plain http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check_url(newurl)
        except ValueError as exc:
            raise urllib.error.URLError(f"redirected to {newurl[:200]!r}: {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: str, max_size: int, timeout: float, what: str) -> str:
    """Download ``url`` into the new file ``dest`` (0600) within ``max_size`` bytes and ``timeout``
    seconds for the whole transfer; return its SHA-256."""
    try:
        check_url(url)
    except ValueError as exc:
        raise FetchError(f"{what}: {exc}") from None
    opener = urllib.request.build_opener(_Redirects)
    deadline = time.monotonic() + timeout
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "elkscan-rules"})
    try:
        with opener.open(request, timeout=min(timeout, 60)) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_size:
                raise FetchError(f"{what}: the download is {declared} bytes, more than limits.download_size "
                                 f"({max_size})")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                total = 0
                while True:
                    if time.monotonic() > deadline:
                        raise FetchError(f"{what}: the download took longer than {timeout:g}s "
                                         "(limits.download_timeout)")
                    chunk = response.read(1 << 16)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_size:
                        raise FetchError(f"{what}: the download is larger than limits.download_size ({max_size})")
                    digest.update(chunk)
                    handle.write(chunk)
    except FetchError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = (f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError)
                  else getattr(exc, "reason", None) or exc)
        raise FetchError(f"{what}: cannot download: {reason}") from None
    return digest.hexdigest()


def _url(spec: SourceSpec, work: str, limits: Limits) -> Fetched:
    what = f"source {spec.name} ({spec.location})"
    path = os.path.join(work, "download")
    sha = download(spec.location, path, limits.download_size, limits.download_timeout, what)
    if spec.sha256 and sha != spec.sha256:
        raise FetchError(f"{what}: the download has SHA-256 {sha}, the config expects {spec.sha256}")
    tree = os.path.join(work, "tree")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if kind_of(head) == "file":
        name = os.path.basename(urllib.parse.urlsplit(spec.location).path)
        if not name.lower().endswith(YARA_SUFFIXES):
            raise FetchError(f"{what}: neither an archive (zip, tar, tar.gz/bz2/xz) nor a YARA file "
                             "(.yar, .yara)")
        os.mkdir(tree, 0o700)
        os.rename(path, os.path.join(tree, name))
    else:
        try:
            extract(path, tree, what, _archive_limits(limits))
        except ArchiveError as exc:
            raise FetchError(str(exc)) from None
        finally:
            if os.path.exists(path):
                os.unlink(path)
    return Fetched(_subdir(tree, spec), sha, spec.location)


# -- local directory ----------------------------------------------------------------------------


def _dir(spec: SourceSpec, work: str, limits: Limits) -> Fetched:
    """Copy the directory's rule files (its content is then fixed for vetting and the bundle); it must
    be ours, as any rules directory (``elkscan_core.trust``)."""
    root = os.path.join(spec.location, spec.path) if spec.path else spec.location
    what = f"source {spec.name} ({root})"
    if not os.path.isdir(root):
        raise FetchError(f"{what}: no such directory")
    try:
        check_trusted_tree(root, "rules source directory")
    except UntrustedError as exc:
        raise FetchError(str(exc)) from None
    tree = os.path.join(work, "tree")
    os.mkdir(tree, 0o700)
    digest, count = hashlib.sha256(), 0
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(YARA_SUFFIXES + CLAMAV_SUFFIXES):
                continue
            source = os.path.join(directory, name)
            relative = os.path.relpath(source, root)
            count += 1
            if count > limits.max_files:
                raise FetchError(f"{what}: more than limits.max_files ({limits.max_files}) rule files")
            data = read_regular(source, limits.max_file_size)
            if data is None:
                continue  # a link or special file: not a rule file of this directory
            target = os.path.join(tree, relative)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            digest.update(relative.encode() + b"\0" + hashlib.sha256(data).digest())
    return Fetched(tree, digest.hexdigest(), root)


def read_regular(path: str, cap: int) -> bytes | None:
    """Up to ``cap + 1`` bytes of a regular file, opened without following a link (None: not one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return handle.read(cap + 1)


# -- freshclam ----------------------------------------------------------------------------------


def _freshclam(spec: SourceSpec, work: str, limits: Limits) -> Fetched:
    """ClamAV's database: ``freshclam`` downloads it into a private directory (from ``spec.location``
    as a private mirror when given), ``sigtool --unpack`` opens each database for the bundle."""
    what = f"source {spec.name} (freshclam)"
    freshclam, sigtool = shutil.which("freshclam"), shutil.which("sigtool")
    if not freshclam or not sigtool:
        raise FetchError(f"{what}: freshclam and sigtool are not installed (apt-get install clamav)")
    database = os.path.join(work, "database")
    os.mkdir(database, 0o700)
    lines = [f"DatabaseDirectory {database}", "Foreground yes", "LogTime no", "Checks 0",
             f"DatabaseOwner {_user()}", "ConnectTimeout 30", f"ReceiveTimeout {int(limits.download_timeout)}"]
    if spec.location:
        lines += [f"PrivateMirror {spec.location}", "DNSDatabaseInfo no", "ScriptedUpdates no"]
    else:
        lines += ["DatabaseMirror database.clamav.net"]
    conf = os.path.join(work, "freshclam.conf")
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    _run([freshclam, f"--config-file={conf}", "--stdout", "--no-warnings"], limits.download_timeout, what,
         env={"PATH": "/usr/bin:/bin", "HOME": work, "LC_ALL": "C"})
    tree = os.path.join(work, "tree")
    os.mkdir(tree, 0o700)
    versions = []
    for name in sorted(os.listdir(database)):
        if not name.endswith((".cvd", ".cld")):
            continue
        info = _run([sigtool, f"--info={os.path.join(database, name)}"], 120, what)
        version = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                        if line.startswith("Version:")), "?")
        versions.append(f"{name.rsplit('.', 1)[0]}-{version}")
        unpacked = os.path.join(tree, name.rsplit(".", 1)[0])
        os.mkdir(unpacked, 0o700)
        _run([sigtool, f"--unpack={os.path.join(database, name)}"], 600, what, cwd=unpacked)
    if not versions:
        raise FetchError(f"{what}: freshclam fetched no database")
    return Fetched(tree, " ".join(versions), spec.location)


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def new_workdir(parent: str, prefix: str) -> str:
    """A new private directory under ``parent`` (ours, checked)."""
    try:
        check_trusted(parent, "rules state directory")
    except UntrustedError as exc:
        raise FetchError(str(exc)) from None
    return tempfile.mkdtemp(prefix=prefix, dir=parent)
