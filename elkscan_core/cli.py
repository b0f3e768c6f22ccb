"""The ``elkscan`` command.

Exit codes scripts can rely on: 0 nothing detected, 1 something detected, 2 errors (a bad pipeline, a
missing plugin, files that could not be scanned, an interrupted scan). Records go to stdout; logs,
progress and the summary go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, TextIO

import attrs

from .default_plugins.dirscan import LINK_POLICIES, Dirscan, DirscanConfig
from .errors import ConfigError, ElkscanError
from .pipeline import ComponentSpec, Pipeline, builtin_pipeline, configure_component, load_pipeline
from .plugins import entry_points_in, installed, load_everything, make_plugin_manager
from .progress import Progress, human_bytes
from .quick_exit import quick_exit
from .registry import Registry
from .runner import Summary, build_session
from .trust import UntrustedError, check_trusted
from .units import MiB
from .version import __version__

log = logging.getLogger("elkscan")
EXIT_CLEAN, EXIT_DETECTED, EXIT_ERROR = 0, 1, 2
MAX_WORKERS = 256
LOG_FORMAT = "elkscan: %(levelname)s: %(message)s"
#: ``--log``: appended, created if need be, never through a link, never blocking on a FIFO.
_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


@attrs.frozen
class _Walk:
    """How the command line steers directory walks: extra exclusions, a depth cap, a link policy."""

    exclude: tuple[str, ...] = ()
    depth: Optional[int] = None
    links: Optional[str] = None


def _pipeline_path(value: str | None) -> Path:
    if value is None:
        return builtin_pipeline()
    path = Path(value)
    if not path.exists() and "/" not in value and builtin_pipeline(value.removesuffix(".yaml")).exists():
        return builtin_pipeline(value.removesuffix(".yaml"))
    return path


def _with_paths(pipeline: Pipeline, paths: Sequence[str], max_size: int, walk: _Walk) -> Pipeline:
    """The pipeline with its sources replaced by a walk of the paths a user named.

    Named paths are judged whole, by every engine, up to ``max_size``: no file-type filter, no filter
    prefixes, no depth limit unless ``--depth``, engines' own size limits raised to ``max_size``;
    whatever is not judged makes the scan an error (exit code 2). Exclusions (``--exclude`` and those
    the pipeline's dirscan sources write out) are skipped by request: counted, never an error.
    """
    written = [path for spec in pipeline.sources if spec.use == "dirscan" and "exclude" in spec.options
               for path in _dirscan_config(pipeline, spec).exclude]
    roots = {os.path.abspath(p): -1 if walk.depth is None else walk.depth for p in paths}
    spec = ComponentSpec("source", "dirscan", {"roots": roots, "exclude": [*written, *walk.exclude],
                                               "links": walk.links or "inside", "type_filter": False,
                                               "min_size": 0, "max_size": max_size, "required": True},
                         where="<command line paths>")
    return attrs.evolve(pipeline, sources=(spec,))


def _steer_walks(pipeline: Pipeline, walk: _Walk) -> Pipeline:
    """The pipeline's dirscan sources with the command line's exclusions, depth cap and link policy."""
    if walk == _Walk():
        return pipeline
    if not any(spec.use == "dirscan" for spec in pipeline.sources):
        raise ConfigError("--exclude, --depth and --follow-symlinks steer directory walks, and the pipeline "
                          "has no dirscan source", pipeline.origin, "name the paths to scan")
    sources = []
    for spec in pipeline.sources:
        if spec.use == "dirscan":
            config = _dirscan_config(pipeline, spec)
            options = {**spec.options, "exclude": [*config.exclude, *walk.exclude]}
            if walk.depth is not None:
                options["roots"] = {root: walk.depth if depth < 0 else min(depth, walk.depth)
                                    for root, depth in config.roots.items()}
            if walk.links:
                options["links"] = walk.links
            spec = attrs.evolve(spec, options=options)
        sources.append(spec)
    return attrs.evolve(pipeline, sources=tuple(sources))


def _dirscan_config(pipeline: Pipeline, spec: ComponentSpec) -> DirscanConfig:
    try:
        return configure_component(Dirscan, spec)
    except ConfigError as exc:
        raise ConfigError(exc.message, f"{pipeline.origin}: {exc.where}", exc.hint) from None


def _with_rules(pipeline: Pipeline, rules: Sequence[str]) -> Pipeline:
    """The pipeline with YARA rule files or directories added for this run: to its (first) yara engine,
    which may then no longer be dropped as optional, or in a yara engine of their own."""
    if not rules:
        return pipeline
    rules = [os.path.abspath(r) for r in rules]
    plugins = pipeline.plugins if "yara_backend" in pipeline.plugins else (*pipeline.plugins, "yara_backend")
    engines = list(pipeline.engines)
    first = next((i for i, spec in enumerate(engines) if spec.use == "yara"), None)
    if first is None:
        engines.append(ComponentSpec("engine", "yara", {"rules": rules}, where="<--rules>"))
    else:
        spec = engines[first]
        yara = Registry.from_plugins(make_plugin_manager(plugins, missing_ok=True)).get("engine", "yara", "--rules")
        try:
            configured = configure_component(yara, spec).rules
        except ConfigError as exc:
            raise ConfigError(exc.message, f"{pipeline.origin}: {exc.where}", exc.hint) from None
        engines[first] = attrs.evolve(spec, options={**spec.options, "rules": [*configured, *rules]},
                                      optional=False)
    return attrs.evolve(pipeline, plugins=plugins, engines=tuple(engines))


def _with_ignored(pipeline: Pipeline, signatures: Sequence[str]) -> Pipeline:
    if not signatures:
        return pipeline
    return attrs.evolve(pipeline, ignore_signatures=(*pipeline.ignore_signatures, *signatures))


def _listed_paths(source: str, separator: bytes) -> list[str]:
    """The paths in a file list (``-``: standard input), one per line or NUL-terminated. Names are bytes:
    any name, UTF-8 or not, comes through as ``os.fsdecode`` gives it. A list in a regular file decides
    what is scanned, so it must be one no other user can change (a pipe is the caller's own)."""
    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(source, "rb") as stream:
                if stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                    check_trusted(source, "file list")
                data = stream.read()
        except OSError as exc:
            raise ConfigError(f"cannot read the file list: {exc.strerror}", source) from None
    return [os.fsdecode(name) for name in data.split(separator) if name]


def _with_format(pipeline: Pipeline, fmt: str | None) -> Pipeline:
    if fmt is None:
        return pipeline
    sinks = [attrs.evolve(s, options={**s.options, "format": fmt}) if s.use == "stdout" else s
             for s in pipeline.sinks]
    if not any(s.use == "stdout" for s in sinks):
        sinks.append(ComponentSpec("sink", "stdout", {"format": fmt}, where="<--format>"))
        pipeline = attrs.evolve(pipeline, plugins=(*pipeline.plugins, "stdout_sink"))
    return attrs.evolve(pipeline, sinks=tuple(sinks))


def _exit_code(summary: Summary) -> int:
    """1 when something was detected; else 2 when anything went wrong or was left unjudged that a user
    named; 0 only when everything asked for was judged clean."""
    if summary.detections:
        return EXIT_DETECTED
    if summary.errors or summary.unjudged or summary.interrupted or summary.abandoned:
        return EXIT_ERROR
    return EXIT_CLEAN


def _summary_line(summary: Summary) -> str:
    not_scanned = sum(summary.not_scanned.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in
                        sorted(summary.not_scanned.items(), key=lambda item: -item[1]))
    return (f"elkscan: scanned {summary.files:,} files ({human_bytes(summary.bytes)})"
            + (f" under {summary.names:,} names" if summary.names != summary.files else "")
            + f" in {summary.elapsed:.1f}s: "
            f"{summary.detections} detection(s) in {summary.detected_files} file(s), {summary.clean:,} clean"
            + (f" ({summary.known_good:,} known good)" if summary.known_good else "") + ", "
            f"{summary.errors} error(s), {not_scanned:,} not scanned" + (f" ({reasons})" if reasons else "")
            + (f", {summary.ignored} detection(s) ignored" if summary.ignored else "")
            + (f", {summary.cached} verdict(s) from the cache" if summary.cached else "")
            + (f", {summary.abandoned} abandoned" if summary.abandoned else "")
            + (" (interrupted)" if summary.interrupted else ""))


def run_pipeline(pipeline: Pipeline, *, report_clean: bool = False, quiet: bool = False,
                 whole_up_to: int | None = None, daemon: bool = False, log_file: TextIO | None = None) -> int:
    """Run a pipeline to its end (or SIGINT/SIGTERM) and return the exit code. A ``daemon`` (``elkscan
    run``) that stops cleanly on a signal exits 0, as service managers expect. The summary goes to
    stderr unless ``quiet``, and to ``log_file`` (``--log``) in any case."""
    log.info("pipeline %s", pipeline.origin)
    pm = make_plugin_manager(pipeline.plugins, missing_ok=True)
    session = build_session(pipeline, pm, report_clean=report_clean, whole_up_to=whole_up_to)
    previous = {sig: signal.signal(sig, lambda *_: session.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if sys.stderr.isatty() and not quiet:
            with Progress(session):
                summary = session.run()
        else:
            summary = session.run()
    finally:
        for sig, handler in previous.items():  # a daemon keeps ignoring late signals: it is ending anyway
            signal.signal(sig, signal.SIG_IGN if daemon else handler)
    line = _summary_line(summary)
    if not quiet:
        print(line, file=sys.stderr)
    if log_file is not None:
        _log_line(log_file, line)
    if daemon and summary.interrupted:
        return EXIT_CLEAN  # stopped by a signal, in order: what remained queued is counted as abandoned
    return _exit_code(summary)


def cmd_scan(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(_pipeline_path(args.pipeline))
    paths = list(args.paths)
    listed = args.file_list is not None or "-" in paths
    separator = b"\0" if args.null else b"\n"
    if "-" in paths:
        paths = [p for p in paths if p != "-"] + _listed_paths("-", separator)
    if args.file_list is not None:
        paths += _listed_paths(args.file_list, separator)
    missing = [p for p in paths if not os.path.lexists(p)]
    for path in missing:
        log.error("%s: no such file or directory", path)
    walk = _Walk(tuple(os.path.abspath(p) for p in args.exclude), args.depth, args.follow_symlinks)
    named = bool(paths) or listed  # an empty list names nothing: never the pipeline's own sources instead
    if named:
        present = [p for p in paths if p not in missing]
        if missing and not present:
            return EXIT_ERROR
        pipeline = _with_paths(pipeline, present, args.max_size, walk)
    elif not pipeline.sources:
        raise ConfigError("nothing to scan: no paths given and the pipeline has no sources", pipeline.origin,
                          "name files or directories, or add a source such as dirscan")
    else:
        pipeline = _steer_walks(pipeline, walk)
    pipeline = _with_ignored(_with_rules(_with_format(pipeline, args.format), args.rules), args.exclude_signature)
    if args.workers:
        pipeline = attrs.evolve(pipeline, limits=attrs.evolve(pipeline.limits, workers=args.workers))
    if args.no_cache:
        pipeline = attrs.evolve(pipeline, limits=attrs.evolve(pipeline.limits, cache=False))
    pipeline = attrs.evolve(pipeline, canary_every=0)  # one shot: no canaries (docs/metrics.md)
    code = run_pipeline(pipeline, report_clean=args.all, quiet=args.quiet,
                        whole_up_to=args.max_size if named else None, log_file=args.log_file)
    return EXIT_ERROR if missing and code == EXIT_CLEAN else code


def cmd_run(args: argparse.Namespace) -> int:
    return run_pipeline(load_pipeline(_pipeline_path(args.pipeline)), quiet=args.quiet, daemon=True,
                        log_file=args.log_file)


def cmd_validate(args: argparse.Namespace) -> int:
    """Build every component (options checked) and ask each to check what it would use, so what
    validate accepts, scan runs."""
    path = _pipeline_path(args.pipeline)
    pipeline = load_pipeline(path)
    session = build_session(pipeline, make_plugin_manager(pipeline.plugins, missing_ok=True))
    for component in (*session.sources, *session.engines, *session.enrichers, *session.sinks):
        try:
            component.check()
        except ElkscanError as exc:
            if not component.optional:
                raise type(exc)(f"{path}: {component.where} ({component.id}): {exc}") from None
            log.warning("%s (%s) is optional and would be skipped: %s", component.where, component.id, exc)
    if pipeline.metrics is not None:
        from . import metrics  # noqa: F401 - says how to install prometheus-client when it is missing
    sizes = {kind: len(pipeline.specs(kind)) for kind in ("source", "engine", "enricher", "sink")}
    counts = [f"{n} {kind}{'s' * (n != 1)}" for kind, n in sizes.items()]
    message = f"{path}: valid ({', '.join(counts)}; plugins: {', '.join(pipeline.plugins) or 'none'})"
    if args.show:
        print(message, file=sys.stderr)
        sys.stdout.write(Path(path).read_text(encoding="utf-8"))
    else:
        print(message)
    return EXIT_CLEAN


def cmd_plugins(args: argparse.Namespace) -> int:
    pm, failures = load_everything()
    registry, errors = Registry.collect(pm)
    failures.update(errors)
    rows = [(plugin, kind, cid, f"{cls.__module__}.{cls.__qualname__}")
            for kind, cid, cls, plugin in registry.items()]
    owners = {getattr(ep.dist, "name", ""): name for name, ep in installed().items()}
    for name, ep in command_plugins().items():  # subcommands: a plugin may give only those
        dist = getattr(getattr(ep, "dist", None), "name", "")
        rows.append((owners.get(dist, "core" if dist == "elkscan-core" else dist or "?"), "command", name, ep.value))
    print(f"{'PLUGIN':<18} {'KIND':<9} {'ID':<10} CLASS")
    for row in sorted(rows):
        print(f"{row[0]:<18} {row[1]:<9} {row[2]:<10} {row[3]}")
    for name, reason in sorted(failures.items()):
        print(f"{name:<18} BROKEN    {reason}")
    return EXIT_ERROR if failures else EXIT_CLEAN


def cmd_demo(args: argparse.Namespace) -> int:
    from .testing import write_samples

    import tempfile  # here: with shutil, random, bz2 and lzma, 3 ms of every other command's start

    directory = Path(args.directory or tempfile.mkdtemp(prefix="elkscan-demo-"))
    written = write_samples(directory)
    pipeline = _with_format(load_pipeline(_pipeline_path(args.pipeline)), args.format)
    also = f" and what the pipeline's {len(pipeline.sources)} source(s) find" if pipeline.sources else ""
    if not args.quiet:
        print(f"elkscan: wrote {len(written)} harmless test samples to {directory}; scanning them{also}",
              file=sys.stderr)
    spec = ComponentSpec("source", "dirscan", {"roots": {str(directory.resolve()): -1}, "exclude": [],
                                               "type_filter": False}, where="<demo samples>")
    pipeline = attrs.evolve(pipeline, sources=(spec, *pipeline.sources), canary_every=0)
    return run_pipeline(pipeline, quiet=args.quiet, log_file=args.log_file)


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from .scaffold import write_plugin

    root = write_plugin(args.name, args.output)
    print(f"elkscan: wrote plugin {args.name!r} to {root}: pip install -e {root} && python -m pytest {root}",
          file=sys.stderr)
    return EXIT_CLEAN


def _workers(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_WORKERS}, got {value!r}")
    return count


def _size(value: str) -> int:
    from .units import Size
    try:
        return Size.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _depth(value: str) -> int:
    try:
        depth = int(value)
    except ValueError:
        depth = -1
    if depth < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {value!r}")
    return depth


def _add_logging(parser: argparse.ArgumentParser, *, top: bool, quiet: bool = True) -> None:
    """``-v``, ``-q`` and ``--log``: before the subcommand (``top``) or after it. After it, they leave
    what was said before alone (argparse copies a subcommand's defaults over the top level's), and
    ``-v`` counts on its own, to be added up."""
    later = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", default=0, dest="verbose" if top else "verbose_after",
                        help="more logging: -v also says which engines, rule sets and clamd are in use; "
                             "-vv debugs, with tracebacks")
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary on stderr",
                            **later)
    parser.add_argument("--log", metavar="FILE", help="log to FILE (appended) instead of stderr, with the "
                                                      "summary; its directory must be writable only by you "
                                                      "or root", **later)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` is the subcommand about to run (its plugin gets imported). Its
    ``commands`` attribute maps each subcommand to its parser."""
    parser = argparse.ArgumentParser(
        prog="elkscan", description="A pluggable host malware scanner (Elkeid's scanner, in Python).",
        epilog="Exit codes: 0 nothing detected, 1 detections, 2 errors. Each command has its own --help; "
               "the manual is docs/index.md in elkscan's source.")
    parser.add_argument("--version", action="version", version=f"elkscan {__version__}")
    _add_logging(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    scan = sub.add_parser("scan", help="scan paths (or the pipeline's sources) once and exit",
                          description="Scan the named files and directories, or, with no paths, what the "
                                      "pipeline's sources find. Records go to stdout.")
    scan.add_argument("paths", nargs="*", metavar="PATH",
                      help="files or directories to scan, whole; - reads paths from standard input")
    what = scan.add_argument_group("what to scan")
    what.add_argument("--file-list", metavar="FILE", help="scan the paths listed in FILE, one a line (- for stdin)")
    what.add_argument("-0", "--null", action="store_true", help="the paths in a list end with NUL, not a newline")
    scan._has_negative_number_optionals.clear()  # "-0" is an option, yet "-w -1" is a number (to refuse)
    what.add_argument("--exclude", action="append", default=[], metavar="PATH",
                      help="skip PATH and everything below it (repeatable); counted as not scanned")
    what.add_argument("--depth", type=_depth, metavar="N",
                      help="descend at most N directory levels (1: only the files directly inside)")
    what.add_argument("--follow-symlinks", choices=LINK_POLICIES, metavar="WHEN",
                      help="follow links met in a walk: never, inside (to targets within the scanned "
                           "paths; default) or always; a link named on the command line is always followed")
    what.add_argument("--max-size", type=_size, default=100 * MiB, metavar="SIZE",
                      help="read named files whole up to this size; a larger one is reported not scanned "
                           "and the exit code is 2 (default: 100MiB)")
    how = scan.add_argument_group("how to judge")
    how.add_argument("-p", "--pipeline", metavar="FILE", help="pipeline YAML (default: the shipped default)")
    how.add_argument("-r", "--rules", action="append", default=[], metavar="FILE|DIR",
                     help="add YARA rules for this run (repeatable)")
    how.add_argument("--exclude-signature", action="append", default=[], metavar="NAME",
                     help="drop detections of signature NAME (repeatable; wildcards * and ?); counted in "
                          "the summary")
    how.add_argument("-w", "--workers", type=_workers, metavar="N",
                     help=f"worker threads, 1 to {MAX_WORKERS} (default: the pipeline's)")
    how.add_argument("--no-cache", action="store_true",
                     help="judge every file again, ignoring the pipeline's verdict cache (limits.cache)")
    output = scan.add_argument_group("output")
    output.add_argument("-f", "--format", choices=("jsonl", "table"),
                        help="output format (default: table on a terminal, JSON lines otherwise)")
    output.add_argument("-a", "--all", action="store_true", help="report clean and not-scanned files too")
    _add_logging(output, top=False)
    scan.set_defaults(func=cmd_scan)

    run = sub.add_parser("run", help="run a pipeline until its sources end or it is stopped",
                         description="Long-running mode: periodic walks, monitors and task sources run "
                                     "until SIGTERM/SIGINT.")
    run.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML")
    _add_logging(run, top=False)
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a pipeline without running it")
    validate.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML, or a shipped one's name")
    validate.add_argument("--print", action="store_true", dest="show",
                          help="then print the pipeline's YAML, e.g. a shipped one to copy and edit")
    _add_logging(validate, top=False, quiet=False)
    validate.set_defaults(func=cmd_validate)

    plugins = sub.add_parser("plugins", help="list installed plugins, their components, and broken ones")
    _add_logging(plugins, top=False, quiet=False)
    plugins.set_defaults(func=cmd_plugins)

    demo = sub.add_parser("demo", help="write harmless test samples and scan them with the default pipeline")
    demo.add_argument("directory", nargs="?", help="where to write the samples (default: a new temp dir)")
    demo.add_argument("-p", "--pipeline", metavar="FILE", help="pipeline YAML (default: the shipped default)")
    demo.add_argument("-f", "--format", choices=("jsonl", "table"), help="output format")
    _add_logging(demo, top=False)
    demo.set_defaults(func=cmd_demo)

    new = sub.add_parser("new-plugin", help="write a working plugin to start from (an engine and its test)",
                         description="Write a separately packaged plugin into DIR/NAME: pyproject.toml, a "
                                     "package with plugin.py and an engine, a README, and a test that runs it "
                                     "through elkscan_core.testing.run (docs/writing-plugins.md).")
    new.add_argument("name", metavar="NAME", help="the plugin and component id: lower-case letters, digits, _")
    new.add_argument("-o", "--output", default=".", metavar="DIR", help="where to create NAME/ (default: here)")
    new.set_defaults(func=cmd_new_plugin)

    for name, ep in sorted(command_plugins().items()):
        if name == command:  # only the command being run is imported
            ep.load()(sub)
        else:
            dist = getattr(ep, "dist", None)  # Python 3.10+
            sub.add_parser(name, help=f"'elkscan {name} --help' says more (from {dist.name if dist else ep.value})",
                           add_help=False)
    parser.commands = sub.choices
    return parser


def command_plugins() -> dict:
    """Extra subcommands, from entry points in group ``elkscan.commands`` (``name = "module:register"``,
    where ``register(subparsers)`` adds the parser and sets ``func``). Only the one invoked is imported."""
    return entry_points_in("elkscan.commands")


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv``: the first word that is neither an option nor ``--log``'s value."""
    after_log = False
    for arg in argv:
        if after_log:
            after_log = False
        elif arg == "--log":
            after_log = True
        elif not arg.startswith("-"):
            return arg
    return None


def _open_log(path: str) -> TextIO:
    """The ``--log`` file, appended to. What root writes must not land where another user can put a link
    or a file of their own, so its directory must be writable only by root or this user
    (``elkscan_core.trust``); the file is created 0600 and never opened through a link."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        mode = os.stat(directory).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot open the log file: {exc.strerror}", path) from None
    if mode & 0o022:
        raise UntrustedError(f"log file {path}: its directory is writable by other users (mode "
                             f"{stat.S_IMODE(mode):04o}), who could put a link or a file of their own in its "
                             "place: log into a directory only you or root can write")
    check_trusted(directory, "log file directory")
    if os.path.lexists(path):
        check_trusted(path, "log file")
    try:
        fd = os.open(path, _LOG_FLAGS, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the log file: {exc.strerror}", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError("not a regular file", path, "--log takes a file")
    return open(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)


def _log_line(stream: TextIO, line: str) -> None:
    stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the usage of the subcommand they were meant for, not the top level's
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.verbose += getattr(args, "verbose_after", 0)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    try:
        args.log_file = _open_log(args.log) if args.log else None
    except ElkscanError as exc:
        print(f"elkscan: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.log_file is not None:
        logging.basicConfig(level=level, format=f"%(asctime)s {LOG_FORMAT}", datefmt="%Y-%m-%d %H:%M:%S",
                            stream=args.log_file)
    else:
        logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    try:
        return args.func(args)
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as exc:  # one line, never exit code 1 ("detections"); -vv shows the traceback
        if args.verbose >= 2:
            log.exception("error")
        message = str(exc) if isinstance(exc, ElkscanError) else f"{type(exc).__name__}: {exc}"
        print(f"elkscan: error: {message}", file=sys.stderr)
        if args.log_file is not None:
            _log_line(args.log_file, f"elkscan: error: {message}")
        return EXIT_ERROR
    finally:
        if args.log_file is not None:
            args.log_file.flush()


def entry() -> None:
    """The ``elkscan`` command (and ``python -m elkscan_core.cli``): ``main``, then the process ends
    without the interpreter's teardown once its output is out (quick_exit.py)."""
    quick_exit(main())


if __name__ == "__main__":
    entry()
