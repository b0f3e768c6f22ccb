"""Pipeline YAML -> a validated, typed ``Pipeline``.

Every error names its place in the YAML (``engines[1].with.timeout``) and says what to do. Component
options are validated by the component's own attrs ``Config`` class when the session is built
(``configure_component``), so unknown keys and wrong types never pass silently.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import attrs
import cattrs
import cattrs.cols
import yaml
from attrs import field, frozen

from . import canary
from .errors import ConfigError
from .priorities import parse_ionice
from .trust import check_trusted
from .units import Duration, Percent, Size, shown

SECTIONS = ("sources", "engines", "enrichers", "sinks")
KIND_OF_SECTION = {"sources": "source", "engines": "engine", "enrichers": "enricher", "sinks": "sink"}
SUPPORTED_VERSIONS = (1,)
MAX_WORKERS = 256  # threads; beyond this a host runs out of them long before it scans faster
MAX_DEPTH = 64  # nesting of mappings and lists in a pipeline; real ones use five
#: How long delivery sinks hold back a detection they already sent (docs/pipeline.md).
DEFAULT_REPEAT_AFTER = 24 * 3600.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_KEY = re.compile(r"[\w$-]+", re.ASCII)
#: A host name: dot-separated labels of letters, digits, ``-`` and ``_`` (RFC 1123, and the underscores
#: some hosts have), at most 253 characters.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", re.ASCII)
#: How often each engine is shown its canary in a long-running session (``canary_every``; 0: never).
DEFAULT_CANARY_EVERY = 3600.0
#: libyaml's loader when PyYAML has it: ten times faster than the pure-Python one on a pipeline listing
#: many rule files; the same documents and errors (it also caps nesting, at 1000 levels).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_FIELD = "\0"  # joins an option's name to a validator's message, from _format_exception to structure


def _strict(expected: type, name: str):
    def structure(value: Any, _type: type) -> Any:
        if isinstance(value, bool) and expected is not bool:
            raise ValueError(f"expected {name}, got {shown(value)}")
        if expected is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, expected):
            raise ValueError(f"expected {name}, got {shown(value)}")
        return value
    return structure


def _list_of(type_: Any, converter: cattrs.Converter):
    """A list (or ``tuple[X, ...]``) option that refuses a single string or a mapping: cattrs would take
    a string's characters as the items (``rules: /etc/rules`` as the rule directories ``/``, ``e``, ...)."""
    items = (cattrs.cols.homogenous_tuple_structure_factory if getattr(type_, "__origin__", None) is tuple
             else cattrs.cols.list_structure_factory)(type_, converter)

    def structure(value: Any, _type: type) -> Any:
        if isinstance(value, (str, bytes)):
            raise ValueError(f"expected a list, got {shown(value)}: write one item as [item]")
        if isinstance(value, Mapping):
            raise ValueError(f"expected a list, got a mapping {shown(value)}")
        return items(value, _type)
    return structure


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook_factory(cattrs.cols.is_sequence, _list_of)
    for expected, name in ((int, "a whole number"), (float, "a number"), (str, "a string"),
                           (bool, "true or false")):
        converter.register_structure_hook(expected, _strict(expected, name))
    converter.register_structure_hook(Union[bool, str], lambda value, _type: value)  # checked by validators
    for unit in (Size, Duration, Percent):
        converter.register_structure_hook(unit, lambda value, cls: cls.parse(value))
    return converter


converter = _make_converter()


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ConfigError):  # raised by a validator: ``where`` is the option's name
        return f"{exc.where}{_FIELD}{exc.message}"
    if len(exc.args) == 4 and isinstance(exc.args[1], attrs.Attribute):  # attrs.validators.in_
        _, attribute, options, value = exc.args
        return f"{attribute.name}{_FIELD}must be one of {', '.join(map(str, options))} (got {shown(value)})"
    if len(exc.args) > 1 and isinstance(exc.args[1], attrs.Attribute):  # another attrs validator
        return f"{exc.args[1].name}{_FIELD}{exc.args[0]}"
    if isinstance(exc, ValueError) and str(exc):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown key(s) {', '.join(sorted(map(_key, exc.extra_fields)))}"
    if isinstance(exc, (AttributeError, TypeError)) and attrs.has(type_):  # not a mapping
        return "expected a mapping of options"
    return cattrs.v.format_exception(exc, type_)


def _key(key: Any) -> str:
    """A mapping key as a message shows it: plain words as they are, anything else quoted and escaped
    (a key holding a newline or an escape sequence cannot break the one-line message)."""
    return key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else repr(key)


def _resolve_env(value: Any, where: str, depth: int = 0, done: dict[int, Any] | None = None) -> Any:
    """Replace ``{$env: NAME}`` with the environment variable's value (for secrets). A mapping or list
    that YAML aliases share is resolved once (an alias bomb repeats a few lists a billion times over)."""
    if not isinstance(value, (Mapping, list)):
        return value
    done = {} if done is None else done
    if id(value) in done:
        return done[id(value)]
    if depth > MAX_DEPTH:
        raise ConfigError(f"nested more than {MAX_DEPTH} levels deep", where)
    if isinstance(value, list):
        resolved: Any = [_resolve_env(v, f"{where}[{i}]", depth + 1, done) for i, v in enumerate(value)]
    elif set(value) == {"$env"}:
        name = value["$env"]
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"$env takes the name of an environment variable, got {shown(name)}", where,
                              "e.g. {$env: ELKSCAN_PASSWORD}")
        if name not in os.environ:
            raise ConfigError(f"environment variable {name!r} is not set", where,
                              f"export {name}=... or write the value in the pipeline")
        resolved = os.environ[name]
    else:
        resolved = {k: _resolve_env(v, f"{where}.{_key(k)}", depth + 1, done) for k, v in value.items()}
    done[id(value)] = resolved
    return resolved


def structure(data: Any, cls: type, where: str) -> Any:
    """Build ``cls`` (an attrs class) from plain data, or raise ConfigError naming the YAML path."""
    if attrs.has(cls) and isinstance(data, Mapping) and set(data) == {"$env"}:
        raise ConfigError("$env stands in for one option's value, not for all of them", where,
                          "e.g. {password: {$env: NAME}}")
    data = _resolve_env({} if data is None else data, where)
    if attrs.has(cls) and not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of options, got {type(data).__name__}", where)
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs groups every problem; report the first, count the rest
        if isinstance(exc, ConfigError):
            raise
        messages = (cattrs.transform_error(exc, path=where, format_exception=_format_exception)
                    if isinstance(exc, cattrs.BaseValidationError) else [f"{exc} @ {where}"])
        message, _, path = messages[0].rpartition(" @ ")
        name, field_, problem = message.partition(_FIELD)
        if field_:
            message, path = problem, f"{path}.{name}"
        more = f" (and {len(messages) - 1} more problem(s))" if len(messages) > 1 else ""
        raise ConfigError(message + more, path, "see docs/pipeline.md") from None


# Validators raise ConfigError(problem, option name): a clean one-liner also when the command line
# changes a value (``attrs.evolve``), and ``structure`` puts the name into the YAML path.


def _check_workers(_instance, attribute, value: int) -> None:
    if not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"needs 1 to {MAX_WORKERS} workers, got {value}", attribute.name)


def _check_queue(_instance, attribute, value: int) -> None:
    if value < 1:
        raise ConfigError(f"needs room for at least 1 target, got {value} (0 or less would be unbounded)",
                          attribute.name)


def _check_nice(_instance, attribute, value: Optional[int]) -> None:
    if value is not None and not -20 <= value <= 19:
        raise ConfigError(f"-20 (first) to 19 (last), got {value}", attribute.name)


def _check_ionice(_instance, attribute, value: Optional[str]) -> None:
    if value is not None:
        try:
            parse_ionice(value)
        except ValueError as exc:
            raise ConfigError(str(exc), attribute.name) from None


def _check_cgroup(_instance, attribute, value: Union[bool, str]) -> None:
    if not (isinstance(value, bool) or value == "top"):
        raise ConfigError(f"true (a cgroup below the one elkscan starts in), top (one at the top of the hierarchy,"
                          f" out of the service's limits) or false, got {shown(value)}", attribute.name)


def _check_share(_instance, attribute, value: Optional[float]) -> None:
    if value is not None and value <= 0:
        raise ConfigError("must be above 0%; leave it out for no limit", attribute.name)


@frozen
class Limits:
    """``limits:``: how much of the host the scan may use (see docs/performance.md)."""

    workers: int = field(default=2, validator=_check_workers)
    queue: int = field(default=64, validator=_check_queue)
    cpu: Optional[Percent] = field(default=None, validator=_check_share)
    nice: Optional[int] = field(default=None, validator=_check_nice)
    ionice: Optional[str] = field(default=None, validator=_check_ionice)
    memory: Optional[Size] = None
    cgroup: Union[bool, str] = field(default=False, validator=_check_cgroup)
    pressure: Optional[Percent] = field(default=None, validator=_check_share)
    cache: bool = False
    cache_path: Optional[str] = None
    shares: bool = False


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (an IP address or ``localhost``; ``[v6]:port``) -> (host, port); ValueError."""
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:9464 or [::1]:9464, got {shown(value)}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"expected an IP address or localhost before the port, got {shown(host)}") from None
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


@frozen
class MetricsConfig:
    """``metrics:``: where the Prometheus endpoint listens (see docs/metrics.md)."""

    listen: str = "127.0.0.1:9464"
    public: bool = False

    def __attrs_post_init__(self) -> None:
        try:
            host, _ = parse_listen(self.listen)
        except ValueError as exc:
            raise ConfigError(str(exc), "listen") from None
        if not (self.public or is_loopback(host)):
            raise ConfigError(f"{self.listen} is reachable from other hosts, and the metrics tell about this "
                              "one (what is scanned and found, how the scanner is doing): listen on "
                              "127.0.0.1 or [::1], or say public: true", "listen")

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


@frozen
class ComponentSpec:
    """One entry of a section: which component (``use``), its raw options (``with``), where it is.
    ``canary`` is an engine entry's own canary: None (the engine's), ``"none"``, ``"eicar"`` or
    ``{file, signature}``."""

    kind: str
    use: str
    options: Mapping[str, Any] = field(factory=dict)
    optional: bool = False
    where: str = ""
    canary: Any = None


@frozen
class Pipeline:
    """A parsed pipeline: the allow-list of plugins, the components of each kind in order, limits."""

    version: int = 1
    plugins: tuple[str, ...] = ()
    sources: tuple[ComponentSpec, ...] = ()
    engines: tuple[ComponentSpec, ...] = ()
    enrichers: tuple[ComponentSpec, ...] = ()
    sinks: tuple[ComponentSpec, ...] = ()
    limits: Limits = Limits()
    state_dir: str | None = None
    repeat_after: float = DEFAULT_REPEAT_AFTER
    metrics: MetricsConfig | None = None
    canary_every: float = DEFAULT_CANARY_EVERY
    #: Signatures whose detections are dropped (and counted): exact names, or ``*``/``?`` patterns.
    ignore_signatures: tuple[str, ...] = ()
    #: The host name records carry (and their ids are made with); None: the system's.
    host: str | None = None
    base_dir: str = "."
    origin: str = "<pipeline>"

    def specs(self, kind: str) -> tuple[ComponentSpec, ...]:
        return getattr(self, {v: k for k, v in KIND_OF_SECTION.items()}[kind])

    def resolve_path(self, path: str) -> str:
        """A path from the YAML, relative to the YAML file's directory."""
        return str(Path(self.base_dir, os.path.expanduser(path)))


def _component(section: str, index: int, item: Any) -> ComponentSpec:
    where = f"{section}[{index}]"
    if isinstance(item, str):
        item = {"use": item}
    if not isinstance(item, Mapping):
        raise ConfigError(f"expected a mapping like {{use: <id>, with: {{...}}}}, got {shown(item)}", where)
    unknown = set(item) - {"use", "with", "optional", "canary"}
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(map(_key, unknown)))}", where,
                          "a component entry takes use, with, optional and, for an engine, canary")
    if not isinstance(item.get("use"), str) or not item["use"]:
        raise ConfigError("missing 'use: <component id>'", where)
    options = item.get("with") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"expected a mapping of options, got {shown(options)}", f"{where}.with")
    optional = item.get("optional", False)
    if not isinstance(optional, bool):
        raise ConfigError(f"expected true or false, got {shown(optional)}", f"{where}.optional")
    if "canary" in item:
        if section != "engines":
            raise ConfigError("only an engine has a canary", f"{where}.canary")
        canary.check_value(item["canary"], where)
    return ComponentSpec(KIND_OF_SECTION[section], item["use"], dict(options), optional, where,
                         item.get("canary"))


def parse_pipeline(data: Any, origin: str = "<pipeline>", base_dir: str = ".") -> Pipeline:
    """Validate the pipeline's own structure (components' options are checked when built)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a pipeline is a YAML mapping, got {type(data).__name__}", origin)
    known = {"version", "plugins", "limits", "state_dir", "repeat_after", "metrics", "canary_every",
             "ignore_signatures", "host", *SECTIONS}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(map(_key, unknown)))}", origin,
                          f"top-level keys are {', '.join(sorted(known))}")
    version = data.get("version")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ConfigError(f"unsupported or missing version {shown(version)}", "version", "write 'version: 1'")
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError("expected a list of plugin names", "plugins",
                          "e.g. plugins: [yara_backend, stdout_sink]")
    sections = {}
    for section in SECTIONS:
        items = data.get(section) or []
        if not isinstance(items, list):
            raise ConfigError(f"expected a list of components, got {type(items).__name__}", section)
        sections[section] = tuple(_component(section, i, item) for i, item in enumerate(items))
    state_dir = data.get("state_dir")
    if state_dir is not None and not isinstance(state_dir, str):
        raise ConfigError(f"expected a directory path, got {shown(state_dir)}", "state_dir")
    ignored = data.get("ignore_signatures") or []
    if not isinstance(ignored, list) or not all(isinstance(s, str) and s for s in ignored):
        raise ConfigError("expected a list of signature names", "ignore_signatures",
                          "e.g. ignore_signatures: [Multios_TestFile_Eicar, 'Php.Webshell.*']")
    host = data.get("host")
    if host is not None:
        problem = host_name_problem(host)
        if problem:
            raise ConfigError(problem, "host", "e.g. host: web-1.example.org (leave it out for the system's name)")
    limits = structure(data.get("limits"), Limits, "limits")
    repeat_after = _duration(data, "repeat_after", DEFAULT_REPEAT_AFTER, "e.g. repeat_after: 24h (0: send every time)")
    metrics = structure(data["metrics"], MetricsConfig, "metrics") if data.get("metrics") is not None else None
    canary_every = _duration(data, "canary_every", DEFAULT_CANARY_EVERY, "e.g. canary_every: 1h (0: never)")
    return Pipeline(version=version, plugins=tuple(plugins), limits=limits, state_dir=state_dir,
                    repeat_after=repeat_after, metrics=metrics, canary_every=canary_every,
                    ignore_signatures=tuple(ignored), host=host, base_dir=base_dir,
                    origin=origin, **sections)


def _duration(data: dict, key: str, default: float, example: str) -> float:
    """A top-level duration (``default`` when absent), or a ConfigError naming ``key`` with ``example``."""
    if data.get(key) is None:
        return default
    try:
        return Duration.parse(data[key])
    except ValueError as exc:
        raise ConfigError(str(exc), key, example) from None


def host_name_problem(value: Any) -> str:
    """Why ``value`` is not a host name records can carry ('' when it is one)."""
    if not isinstance(value, str) or not value:
        return f"expected a host name, got {shown(value)}"
    if len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in value.split(".")):
        return (f"{shown(value)} is not a host name: dot-separated labels of letters, digits, '-' and '_' "
                "(at most 63 each, not starting or ending with '-'), at most 253 characters")
    return ""


def builtin_pipeline(name: str = "default") -> Path:
    """A pipeline shipped with elkscan (``pipelines/<name>.yaml``)."""
    from importlib.resources import files  # here: a scan of a pipeline file does without its imports

    return Path(str(files("elkscan_core.pipelines").joinpath(f"{name}.yaml")))


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Read and validate a pipeline file; YAML syntax errors carry the line and column. A pipeline that
    another user can change is refused (``UntrustedError``): it decides what elkscan runs and loads."""
    path = Path(path)
    if path.exists():  # a missing file gets the clearer "cannot read" below
        check_trusted(path, "pipeline")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline: {exc.strerror}", str(path),
                          "pass an existing file with --pipeline") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
                          str(path)) from None
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow; no line to point at
        raise ConfigError(f"invalid YAML: {exc.reason} (character {exc.character:#x} at offset {exc.position})",
                          str(path), "fix the YAML syntax") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
        raise ConfigError(f"invalid YAML: {problem}", place, "fix the YAML syntax") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError("invalid YAML: nested too deeply", str(path)) from None
    try:
        return parse_pipeline(data, str(path), str(path.parent.resolve()))
    except ConfigError as exc:
        where = exc.where if exc.where.startswith(str(path)) else f"{path}: {exc.where}"
        raise ConfigError(exc.message, where, exc.hint) from None


def configure_component(cls: type, spec: ComponentSpec) -> Any:
    """Validate a component's ``with:`` against its Config class."""
    return structure(spec.options, cls.Config, f"{spec.where}.with")
