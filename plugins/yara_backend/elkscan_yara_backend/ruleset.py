"""Find, compile and cache YARA rule sets.

Each rule file is compiled in its own namespace (public rule sets reuse rule names across files). The
compiled set is saved under the state directory keyed by the digest of every source file, the yara
version and the external variables, so a restart with unchanged rules loads in milliseconds. Digests
are BLAKE2b (256 bits) from CPython's own implementation: three times faster than its SHA-256 (8 ms of
a start-up for Elastic's 248 files and their 1.3 MB compiled set), without loading OpenSSL.

Rules decide what is called clean, so every rule file and directory must be one that only root or the
user running elkscan can change (``elkscan_core.trust``). The cache is used only in such a directory, and
a compiled file only when its digest is the one elkscan recorded beside it when it wrote the file: the
name is a digest anyone can compute, so it proves nothing.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from attrs import frozen

from elkscan_core import ComponentError
from elkscan_core.builtin_hashes import blake2b
from elkscan_core.trust import UntrustedError, check_trusted, check_trusted_tree

log = logging.getLogger("elkscan.yara")

BUILTIN = "builtin"
RULE_SUFFIXES = (".yar", ".yara")
#: External variables that public rule sets (Loki, THOR, signature-base) use; defined empty at compile
#: time and filled in per file when the rules refer to them.
EXTERNALS = ("filename", "filepath", "extension", "filetype", "owner")
_SYNTAX = re.compile(r"^(?P<file>.*)\((?P<line>\d+)\): (?P<message>.*)$", re.S)
# A quoted string (rule strings, metadata, string literals in conditions), on one line, escapes included.
_QUOTED = re.compile(rb'"(?:[^"\\\n]|\\.)*"')
_EXTERNAL_NAMES = tuple(name.encode() for name in EXTERNALS)
_EXTERNAL = re.compile(rb"\b(" + b"|".join(_EXTERNAL_NAMES) + rb")\b")
_INCLUDE = re.compile(rb'^[ \t]*include[ \t]+"([^"\n]+)"', re.M)
_MAX_RULE_FILES = 100_000
#: A rule set whose files all changed longer ago than this has its identity recorded beside the compiled
#: rules; one changed more recently could change again within the same timestamp (filesystems that keep
#: whole seconds), unseen, so it is read and hashed every time until it settles.
SETTLED_NS = 2_000_000_000


def builtin_rules() -> list[str]:
    """The project's own default rules, shipped inside this package."""
    from importlib.resources import files  # here: a scan of other rules does without its imports

    folder = Path(str(files("elkscan_yara_backend.rules")))
    return sorted(str(p) for p in folder.iterdir() if p.suffix in RULE_SUFFIXES)


def expand(specs: Iterable[str], resolve=lambda p: p) -> list[str]:
    """Rule files named by ``specs``: files, directories (their .yar/.yara files, recursively), globs,
    or ``builtin``. A spec that names nothing is an error: a scan without its rules is no scan. So is
    one that another user could change (``builtin`` is not checked: it ships inside this package, whose
    code is exactly as trustworthy)."""
    found: list[str] = []
    parents: set[str] = set()  # directories above rule files found trusted: each is checked once
    for spec in specs:
        if spec == BUILTIN:
            found.extend(builtin_rules())
            continue
        path = resolve(spec)
        if os.path.isdir(path):
            _check(check_trusted_tree, path, "rules directory")
            matches = sorted(str(p) for p in Path(path).rglob("*") if p.suffix in RULE_SUFFIXES
                             and p.is_file())
        elif glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            matches = [path] if os.path.isfile(path) else []
        if not matches:
            raise ComponentError(f"rules: {spec!r} names no rule file (looked for {path})")
        for match in matches:
            _check(check_trusted, match, "rule file", parents)
        found.extend(matches)
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


def _check(check, path: str, what: str, *args) -> None:
    try:
        check(path, what, *args)
    except UntrustedError as exc:
        raise ComponentError(str(exc)) from None


@frozen
class CompiledRules:
    rules: object  # yara.Rules
    digest: str
    files: tuple[str, ...]
    externals: frozenset[str]  # the external variables some condition refers to

    @property
    def count(self) -> int:
        """How many rules: counted when asked (``-v``), since yara-python makes an object of each rule
        to be counted (1 ms a start-up for 900 rules)."""
        return sum(1 for _ in self.rules)


def with_includes(paths: list[str], stats: dict[str, os.stat_result] | None = None
                  ) -> Iterator[tuple[str, bytes]]:
    """Each rule file's path and content, then those of the files it ``include``s (as yara resolves
    them: relative to the including file), each once: they are part of the rule set too, so they are
    trust-checked and change its digest. ``stats`` gets each file's status, taken before it is read."""
    seen: set[str] = set()
    pending = list(reversed(paths))
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        if len(seen) > _MAX_RULE_FILES:
            raise ComponentError(f"rules: more than {_MAX_RULE_FILES} rule files with their includes")
        with open(path, "rb", buffering=0) as handle:  # unbuffered: one read, half the time of read_bytes
            if stats is not None:
                stats[path] = os.fstat(handle.fileno())
            data = handle.readall()
        yield path, data
        for name in reversed(_INCLUDE.findall(data) if b"include" in data else ()):  # `in`: 10x faster
            included = os.path.normpath(os.path.join(os.path.dirname(path), os.fsdecode(name)))
            if not os.path.isfile(included):
                continue  # yara reports the missing include when it compiles
            _check(check_trusted, included, "included rule file")
            pending.append(included)


def _digest(yara, paths: list[str], stats: dict[str, os.stat_result] | None = None
            ) -> tuple[str, frozenset[str]]:
    """The rule set's identity, and the external variables its conditions use (filling them in costs
    time on every file, so only those are computed)."""
    identity = _hash(f"yara {yara.__version__} externals {EXTERNALS}".encode())
    used: set[str] = set()
    for path, data in with_includes(paths, stats):
        identity.update(path.encode() + b"\0" + _hash(data).digest())
        used.update(externals_in(data))
    return identity.hexdigest(), frozenset(used)


def _hash(data: bytes):
    return blake2b(data, digest_size=32)


def externals_in(data: bytes) -> set[str]:
    """The external variables a rule file refers to. Any mention outside quotes counts: finding one too
    many costs a little time on each file, one too few would leave a variable empty and its rule blind."""
    if not any(name in data for name in _EXTERNAL_NAMES):  # most files: a plain search says no at once
        return set()
    return {name.decode() for name in _EXTERNAL.findall(_QUOTED.sub(b'""', data))}


def describe_syntax_error(exc: Exception) -> str:
    match = _SYNTAX.match(str(exc))
    if match:
        return f"{match['file']}, line {match['line']}: {match['message']}"
    return str(exc)


def _compile(yara, paths: list[str], skip_broken: bool) -> object:
    externals = {name: "" for name in EXTERNALS}
    try:
        return yara.compile(filepaths={p: p for p in paths}, externals=externals)
    except yara.Error as exc:
        if not skip_broken:
            raise ComponentError(f"rule file does not compile: {describe_syntax_error(exc)} "
                                 "(fix it, or set on_error: skip)") from None
    good = []
    for path in paths:
        try:
            yara.compile(filepath=path, externals=externals)
            good.append(path)
        except yara.Error as exc:
            log.warning("skipping rule file that does not compile: %s", describe_syntax_error(exc))
    if not good:
        raise ComponentError("no rule file compiles")
    return yara.compile(filepaths={p: p for p in good}, externals=externals)


def load(specs: Iterable[str], *, cache_dir: str | None, skip_broken: bool = False,
         resolve=lambda p: p) -> CompiledRules:
    """Compile (or load from the cache) the rules named by ``specs``."""
    import yara

    paths = expand(specs, resolve)
    usable = bool(cache_dir) and _usable_cache(cache_dir)
    digest, externals = _identity(yara, paths, cache_dir) if usable else _digest(yara, paths)
    cached = Path(cache_dir, f"{digest}.yarc") if usable else None
    rules = _load_cached(yara, cached) if cached is not None else None
    if rules is None:
        rules = _compile(yara, paths, skip_broken)
        if cached is not None:
            _save(rules, cached)
    return CompiledRules(rules, digest, tuple(paths), externals)


def _identity(yara, paths: list[str], cache_dir: str) -> tuple[str, frozenset[str]]:
    """``_digest(yara, paths)``, or the one recorded in the cache directory when no rule file has changed
    since: each file's device, inode, size, modification and change times are recorded with it (a change
    time moves on every write and only the clock's owner, root, can set it back), so an unchanged set is
    known without reading and hashing every file (5 ms of a start-up for Elastic's 248 files)."""
    record = Path(cache_dir, _hash("\0".join([yara.__version__, *EXTERNALS, *paths]).encode()).hexdigest()
                  + ".files")
    known = _recorded(record, paths)
    if known is not None:
        return known
    stats: dict[str, os.stat_result] = {}
    digest, externals = _digest(yara, paths, stats)
    settled = time.time_ns() - SETTLED_NS
    if all(st.st_ctime_ns < settled and st.st_mtime_ns < settled for st in stats.values()):
        files = [[path, *_signature(st)] for path, st in stats.items()]
        content = json.dumps({"digest": digest, "externals": sorted(externals), "files": files})
        try:
            _write_new(record, content.encode())
        except OSError as exc:
            log.info("rule set identity not recorded in %s: %s", cache_dir, exc)
    return digest, externals


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _recorded(record: Path, paths: list[str]) -> tuple[str, frozenset[str]] | None:
    """The digest and externals in ``record`` (ours, never through a link), if every file it lists (the
    rule files, then what they include) is unchanged; the included ones are trust-checked again."""
    content = _read_ours(record)
    if content is None:
        return None
    try:
        saved = json.loads(content)
        files = saved["files"]
        if [entry[0] for entry in files[:len(paths)]] != paths:
            return None
        for path, *signature in files:
            if not isinstance(path, str) or _signature(os.stat(path)) != signature:  # an int: a descriptor
                return None
        digest, externals = saved["digest"], saved["externals"]
        if not isinstance(digest, str) or not all(isinstance(name, str) for name in externals):
            return None
    except (ValueError, TypeError, KeyError, IndexError, OSError):
        return None  # damaged, or a file gone: read and hashed again
    for path, *_ in files[len(paths):]:
        _check(check_trusted, path, "included rule file")
    return digest, frozenset(externals)


def _usable_cache(cache_dir: str) -> bool:
    """Create the cache directory (0700) if needed; False, with a warning, when another user could
    change it: a planted compiled file would decide every verdict."""
    existing = os.path.abspath(cache_dir)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    try:
        check_trusted(existing, "compiled-rule cache")  # never create directories where others write
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        check_trusted(cache_dir, "compiled-rule cache")
    except UntrustedError as exc:
        log.warning("%s; compiling the rules in memory instead", exc)
        return False
    except OSError as exc:
        log.warning("compiled-rule cache %s cannot be created (%s); compiling the rules in memory",
                    cache_dir, exc.strerror)
        return False
    return True


def _sidecar(cached: Path) -> Path:
    """Where the digest of a compiled file that elkscan wrote is kept."""
    return cached.with_name(cached.name + ".blake2b")


def _read_ours(path: Path) -> bytes | None:
    """A regular file's content, if root or this user owns it and no one else can write it; never
    through a symbolic link. None when it is missing or fails those tests."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with open(fd, "rb") as handle:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid())
                or st.st_mode & 0o022):
            return None
        return handle.read()


def _load_cached(yara, cached: Path):
    """The compiled rules in ``cached``, only if its content is what elkscan saved there."""
    data = _read_ours(cached)
    if data is None:
        return None
    recorded = _read_ours(_sidecar(cached))
    if recorded is None or recorded.strip().decode("ascii", "replace") != _hash(data).hexdigest():
        log.warning("compiled-rule cache %s was not written by elkscan (its digest is not the one "
                    "recorded); recompiling", cached)
        return None
    try:
        return _load_bytes(yara, data)  # the very bytes checked, not the name again
    except yara.Error as exc:
        log.warning("compiled-rule cache %s is unusable (%s); recompiling", cached, exc)
        return None


def _load_bytes(yara, data: bytes):
    """``yara.load`` of ``data``, by the path of a memfd holding it: given a file object, yara-python
    reads it a few bytes per Python call (8 ms for 900 rules, 1 ms by path). A file object when /proc
    is not mounted."""
    if not os.path.isdir("/proc/self/fd"):
        return yara.load(file=io.BytesIO(data))
    fd = os.memfd_create("elkscan-rules", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return yara.load(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _save(rules, cached: Path) -> None:
    """Save the compiled rules, then their digest beside them; each file is new (0600, never through
    a link) and renamed into place, so a reader sees a complete file."""
    buffer = io.BytesIO()
    rules.save(file=buffer)
    data = buffer.getvalue()
    try:
        _write_new(cached, data)
        _write_new(_sidecar(cached), _hash(data).hexdigest().encode() + b"\n")
    except OSError as exc:
        log.info("compiled rules not cached in %s: %s", cached.parent, exc)


def _write_new(path: Path, data: bytes) -> None:
    import tempfile  # here: only a cache miss writes

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, 0600
    try:
        with open(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
