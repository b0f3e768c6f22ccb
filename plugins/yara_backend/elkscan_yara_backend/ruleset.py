"""Find, compile and cache YARA rule sets.

Each rule file is compiled in its own namespace (public rule sets reuse rule names across files). The
compiled set is saved under the state directory keyed by the digest of every source file, the yara
version and the external variables, so a restart with unchanged rules loads in milliseconds.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

from attrs import frozen

from elkscan_core import ComponentError

log = logging.getLogger("elkscan.yara")

BUILTIN = "builtin"
RULE_SUFFIXES = (".yar", ".yara")
#: External variables that public rule sets (Loki, THOR, signature-base) use; defined empty at compile
#: time and filled in per file when the rules refer to them.
EXTERNALS = ("filename", "filepath", "extension", "filetype", "owner")
_SYNTAX = re.compile(r"^(?P<file>.*)\((?P<line>\d+)\): (?P<message>.*)$", re.S)
# A rule's condition: what follows ``condition:`` up to the brace that closes the rule (a condition
# holds no braces of its own).
_CONDITION = re.compile(rb"\bcondition\s*:(.*?)}", re.S)
_EXTERNAL = re.compile(rb"\b(" + b"|".join(name.encode() for name in EXTERNALS) + rb")\b")


def builtin_rules() -> list[str]:
    """The project's own default rules, shipped inside this package."""
    folder = Path(str(files("elkscan_yara_backend.rules")))
    return sorted(str(p) for p in folder.iterdir() if p.suffix in RULE_SUFFIXES)


def expand(specs: Iterable[str], resolve=lambda p: p) -> list[str]:
    """Rule files named by ``specs``: files, directories (their .yar/.yara files, recursively), globs,
    or ``builtin``. A spec that names nothing is an error: a scan without its rules is no scan."""
    found: list[str] = []
    for spec in specs:
        if spec == BUILTIN:
            found.extend(builtin_rules())
            continue
        path = resolve(spec)
        if os.path.isdir(path):
            matches = sorted(str(p) for p in Path(path).rglob("*") if p.suffix in RULE_SUFFIXES
                             and p.is_file())
        elif glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            matches = [path] if os.path.isfile(path) else []
        if not matches:
            raise ComponentError(f"rules: {spec!r} names no rule file (looked for {path})")
        found.extend(matches)
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


@frozen
class CompiledRules:
    rules: object  # yara.Rules
    digest: str
    files: tuple[str, ...]
    externals: frozenset[str]  # the external variables some condition refers to
    count: int


def _digest(yara, paths: list[str]) -> tuple[str, frozenset[str]]:
    """The rule set's identity, and the external variables its conditions use (filling them in costs
    time on every file, so only those are computed)."""
    sha = hashlib.sha256(f"yara {yara.__version__} externals {EXTERNALS}".encode())
    used: set[str] = set()
    for path in paths:
        data = Path(path).read_bytes()
        sha.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        for condition in _CONDITION.findall(data):
            used.update(name.decode() for name in _EXTERNAL.findall(condition))
    return sha.hexdigest(), frozenset(used)


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
    digest, externals = _digest(yara, paths)
    cached = Path(cache_dir, f"{digest}.yarc") if cache_dir else None
    rules = None
    if cached is not None and cached.exists():
        try:
            rules = yara.load(str(cached))
        except yara.Error as exc:
            log.warning("compiled-rule cache %s is unusable (%s); recompiling", cached, exc)
    if rules is None:
        rules = _compile(yara, paths, skip_broken)
        if cached is not None:
            _save(rules, cached)
    return CompiledRules(rules, digest, tuple(paths), externals, sum(1 for _ in rules))


def _save(rules, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        rules.save(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.info("compiled rules not cached in %s: %s", path.parent, exc)
