"""The rules config: which sources ``elkscan rules update`` fetches and how it vets them (docs/rules.md).

The file decides which rules elkscan will trust, so it must be ours (``elkscan_core.trust``). It is read
as YAML nodes, so every error names ``file:line`` of the value at fault.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Optional

import attrs
import yaml
from attrs import frozen

from elkscan_core.errors import ConfigError
from elkscan_core.trust import check_trusted
from elkscan_core.units import MiB, Duration, Size, shown

#: Public rule sets a source can name with ``preset:``; a source may still set ``git``/``url``/``ref``/
#: ``path`` itself (a mirror, a pinned commit).
PRESETS: dict[str, dict[str, str]] = {
    "signature-base": {"git": "https://github.com/Neo23x0/signature-base.git", "path": "yara"},
    "yara-forge": {"url": "https://github.com/YARAHQ/yara-forge/releases/latest/download/"
                          "yara-forge-rules-core.zip"},
    "elastic": {"git": "https://github.com/elastic/protections-artifacts.git", "path": "yara/rules"},
}
KINDS = ("git", "url", "dir", "freshclam")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_NODES = 10_000  # a config lists a few sources; an alias bomb is refused, not walked
_MAX_DEPTH = 16


@frozen
class SourceSpec:
    """One source: ``kind`` is git, url, dir or freshclam; ``location`` its repository, URL or
    directory; ``ref`` a pinned git ref; ``path`` the subdirectory holding its rules; ``sha256`` the
    download's expected digest; ``where`` its place in the config file, for messages."""

    name: str
    kind: str
    location: str = ""
    ref: str = ""
    path: str = ""
    sha256: str = ""
    preset: str = ""
    where: str = ""


@frozen
class Baseline:
    """The benign files rules must not match: package-verified files of this host, sampled within
    the bounds, and ``paths`` an operator vouches for."""

    packages: bool = True
    paths: tuple[str, ...] = ()
    max_files: int = 1000
    max_bytes: int = 128 * MiB
    max_file_size: int = 8 * MiB


@frozen
class Vetting:
    """``budget``: CPU seconds a rule may cost per MiB of the profiling sample; ``profile_bytes``: the
    sample's size; ``timeout``: yara's limit on one scan while profiling."""

    budget: float = 0.005
    profile_bytes: int = 16 * MiB
    timeout: float = 10.0
    baseline: Baseline = Baseline()


@frozen
class Limits:
    """Bounds on what a source may cost: a download's size and time, git's time, rule files."""

    download_size: int = 256 * MiB
    download_timeout: float = 600.0
    git_timeout: float = 900.0
    max_files: int = 20_000
    max_file_size: int = 16 * MiB


@frozen
class RulesConfig:
    sources: tuple[SourceSpec, ...]
    vetting: Vetting = Vetting()
    limits: Limits = Limits()
    state_dir: Optional[str] = None
    password_env: str = ""
    origin: str = "<rules config>"


class _Reader:
    """Typed values out of YAML nodes, each error with ``file:line``."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.nodes = 0

    def where(self, node: yaml.Node) -> str:
        return f"{self.origin}:{node.start_mark.line + 1}"

    def fail(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError(message, self.where(node), "see docs/rules.md")

    def count(self, node: yaml.Node, depth: int) -> None:
        self.nodes += 1
        if self.nodes > _MAX_NODES or depth > _MAX_DEPTH:
            raise self.fail(node, "the config is nested too deeply or too large (YAML aliases?)")
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.count(key, depth + 1)
                self.count(value, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self.count(item, depth + 1)

    def mapping(self, node: yaml.Node, what: str, known: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        found: dict[str, yaml.Node] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name not in known:
                raise self.fail(key, f"unknown key {shown(name)} in {what} (known: {', '.join(known)})")
            if name in found:
                raise self.fail(key, f"{name!r} is given twice in {what}")
            found[name] = value
        return found

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        try:
            return yaml.SafeLoader("").construct_object(node)  # the scalar's YAML type (int, bool, str)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            raise self.fail(node, f"{what}: {' '.join(str(getattr(exc, 'problem', exc)).split())}") from None

    def text(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node, what)
        if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
            raise self.fail(node, f"{what} must be a non-empty string, got {shown(value)}")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            raise self.fail(node, f"{what} must be true or false, got {shown(value)}")
        return value

    def count_of(self, node: yaml.Node, what: str, low: int = 1) -> int:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10**9:
            raise self.fail(node, f"{what} must be a whole number from {low}, got {shown(value)}")
        return value

    def size(self, node: yaml.Node, what: str) -> int:
        try:
            value = Size.parse(self.scalar(node, what))
        except ValueError as exc:
            raise self.fail(node, f"{what}: {exc}") from None
        if value <= 0:
            raise self.fail(node, f"{what} must be more than 0")
        return int(value)

    def duration(self, node: yaml.Node, what: str) -> float:
        try:
            value = Duration.parse(self.scalar(node, what))
        except ValueError as exc:
            raise self.fail(node, f"{what}: {exc}") from None
        if not value > 0 or math.isinf(value):
            raise self.fail(node, f"{what} must be more than 0")
        return float(value)

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return tuple(self.text(item, f"{what} item") for item in node.value)


def load_config(path: str | os.PathLike) -> RulesConfig:
    """Read and check a rules config; refused when another user could change it."""
    path = os.fspath(path)
    if os.path.lexists(path):
        check_trusted(path, "rules config")
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as exc:
        raise ConfigError(f"cannot read the rules config: {exc.strerror}", path) from None
    base = os.path.dirname(os.path.abspath(path))
    return parse_config(data, path, base)


def parse_config(data: bytes, origin: str = "<rules config>", base_dir: str = ".") -> RulesConfig:
    """Check a rules config's bytes; ``ConfigError`` with ``origin:line`` on anything wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
                          origin) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"invalid YAML: {exc.reason} (character {exc.character:#x} at offset "
                          f"{exc.position})", origin) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"{origin}:{mark.line + 1}" if mark else origin
        problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
        raise ConfigError(f"invalid YAML: {problem}", place, "fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", origin) from None
    if root is None:
        raise ConfigError("the rules config is empty; it needs a list of sources", origin,
                          "see docs/rules.md")
    reader = _Reader(origin)
    reader.count(root, 0)
    top = reader.mapping(root, "the rules config", ("sources", "vetting", "limits", "state_dir",
                                                    "password_env"))
    if "sources" not in top:
        raise reader.fail(root, "the rules config needs 'sources:', a list of rule sources")
    node = top["sources"]
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise reader.fail(node, "sources must be a non-empty list")
    sources = [_source(reader, item, base_dir) for item in node.value]
    seen: dict[str, SourceSpec] = {}
    for source in sources:
        if source.name in seen:
            raise ConfigError(f"source name {source.name!r} is used twice (also at "
                              f"{seen[source.name].where})", source.where)
        seen[source.name] = source
    options: dict[str, Any] = {"sources": tuple(sources), "origin": origin}
    if "vetting" in top:
        options["vetting"] = _vetting(reader, top["vetting"], base_dir)
    if "limits" in top:
        options["limits"] = _limits(reader, top["limits"])
    if "state_dir" in top:
        options["state_dir"] = os.path.join(base_dir, reader.text(top["state_dir"], "state_dir"))
    if "password_env" in top:
        options["password_env"] = reader.text(top["password_env"], "password_env")
    return RulesConfig(**options)


_SOURCE_KEYS = ("name", "preset", "git", "url", "dir", "freshclam", "ref", "path", "sha256")


def _source(reader: _Reader, node: yaml.Node, base_dir: str) -> SourceSpec:
    keys = reader.mapping(node, "a source", _SOURCE_KEYS)
    where = reader.where(node)
    if "name" not in keys:
        raise reader.fail(node, "a source needs a name (letters, digits, '.', '_', '-'; it names its "
                                "directory and its rules)")
    name = reader.text(keys["name"], "name")
    if not _NAME.fullmatch(name):
        raise reader.fail(keys["name"], f"source name {shown(name)} must be lower-case letters, digits, "
                                        "'.', '_' or '-', at most 64, starting with a letter or digit")
    fields: dict[str, str] = {}
    preset = ""
    if "preset" in keys:
        preset = reader.text(keys["preset"], "preset")
        if preset not in PRESETS:
            raise reader.fail(keys["preset"], f"unknown preset {shown(preset)} (known: {', '.join(PRESETS)})")
        fields.update(PRESETS[preset])
    given = [kind for kind in KINDS if kind in keys]
    if len(given) > 1 or (preset and given and given[0] not in fields):
        raise reader.fail(node, f"source {name!r} names more than one kind ({', '.join(given)}"
                                f"{', preset ' + preset if preset else ''}); give one of "
                                f"{', '.join(KINDS)} or a preset")
    for kind in given:
        if kind == "freshclam":  # true, or the URL of a private mirror
            value = reader.scalar(keys[kind], "freshclam")
            if value is True:
                fields["freshclam"] = ""
            elif isinstance(value, str) and value:
                _check_url(reader, keys[kind], value)
                fields["freshclam"] = value
            else:
                raise reader.fail(keys[kind], "freshclam is true or a mirror's URL; to leave ClamAV's "
                                              "database out, leave the source out")
        else:
            fields[kind] = reader.text(keys[kind], kind)
    kind = next((k for k in KINDS if k in fields), "")
    if not kind:
        raise reader.fail(node, f"source {name!r} needs one of {', '.join(KINDS)} or a preset "
                                f"({', '.join(PRESETS)})")
    location = fields[kind]
    if kind == "dir":
        location = os.path.normpath(os.path.join(base_dir, location))
    elif kind == "url":
        _check_url(reader, keys.get("url", node), location)
    ref = reader.text(keys["ref"], "ref") if "ref" in keys else ""
    if ref and (kind != "git" or ref.startswith("-") or not re.fullmatch(r"[\w./+@^~-]+", ref)):
        raise reader.fail(keys["ref"], "ref is a git branch, tag or commit (of a git source)")
    path = reader.text(keys["path"], "path") if "path" in keys else fields.get("path", "")
    if path and (kind == "freshclam" or os.path.isabs(path) or ".." in path.split("/")):
        raise reader.fail(keys.get("path", node), "path is a directory inside the source, relative, "
                                                  "without '..'")
    sha256 = reader.text(keys["sha256"], "sha256").lower() if "sha256" in keys else ""
    if sha256 and (kind != "url" or not _SHA256.fullmatch(sha256)):
        raise reader.fail(keys["sha256"], "sha256 is the 64 hex digits a url source's download must have")
    return SourceSpec(name=name, kind=kind, location=location, ref=ref, path=path.strip("/"),
                      sha256=sha256, preset=preset, where=where)


def _check_url(reader: _Reader, node: yaml.Node, url: str) -> None:
    from .fetch import check_url

    try:
        check_url(url)
    except ValueError as exc:
        raise reader.fail(node, str(exc)) from None


def _vetting(reader: _Reader, node: yaml.Node, base_dir: str) -> Vetting:
    keys = reader.mapping(node, "vetting", ("budget", "profile_bytes", "timeout", "baseline"))
    options: dict[str, Any] = {}
    if "budget" in keys:
        options["budget"] = reader.duration(keys["budget"], "vetting.budget")
    if "profile_bytes" in keys:
        options["profile_bytes"] = reader.size(keys["profile_bytes"], "vetting.profile_bytes")
    if "timeout" in keys:
        options["timeout"] = max(1.0, reader.duration(keys["timeout"], "vetting.timeout"))
    if "baseline" in keys:
        options["baseline"] = _baseline(reader, keys["baseline"], base_dir)
    return Vetting(**options)


def _baseline(reader: _Reader, node: yaml.Node, base_dir: str) -> Baseline:
    keys = reader.mapping(node, "vetting.baseline", ("packages", "paths", "max_files", "max_bytes",
                                                     "max_file_size"))
    options: dict[str, Any] = {}
    if "packages" in keys:
        options["packages"] = reader.boolean(keys["packages"], "baseline.packages")
    if "paths" in keys:
        options["paths"] = tuple(os.path.normpath(os.path.join(base_dir, p))
                                 for p in reader.strings(keys["paths"], "baseline.paths"))
    if "max_files" in keys:
        options["max_files"] = reader.count_of(keys["max_files"], "baseline.max_files")
    for key in ("max_bytes", "max_file_size"):
        if key in keys:
            options[key] = reader.size(keys[key], f"baseline.{key}")
    return Baseline(**options)


def _limits(reader: _Reader, node: yaml.Node) -> Limits:
    keys = reader.mapping(node, "limits", tuple(f.name for f in attrs.fields(Limits)))
    options: dict[str, Any] = {}
    for key, value in keys.items():
        if key.endswith("_timeout"):
            options[key] = reader.duration(value, f"limits.{key}")
        elif key == "max_files":
            options[key] = reader.count_of(value, "limits.max_files")
        else:
            options[key] = reader.size(value, f"limits.{key}")
    return Limits(**options)
