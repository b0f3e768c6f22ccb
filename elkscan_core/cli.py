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
import sys
import tempfile
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import attrs

from . import __version__
from .errors import ConfigError, ElkscanError
from .pipeline import ComponentSpec, Pipeline, load_pipeline
from .plugins import entry_points_in, load_everything, make_plugin_manager
from .progress import Progress, human_bytes
from .registry import Registry
from .runner import Summary, build_session
from .units import MiB

log = logging.getLogger("elkscan")
EXIT_CLEAN, EXIT_DETECTED, EXIT_ERROR = 0, 1, 2
MAX_WORKERS = 256


def builtin_pipeline(name: str = "default") -> Path:
    """A pipeline shipped with elkscan (``pipelines/<name>.yaml``)."""
    return Path(str(files("elkscan_core.pipelines").joinpath(f"{name}.yaml")))


def _pipeline_path(value: str | None) -> Path:
    if value is None:
        return builtin_pipeline()
    path = Path(value)
    if not path.exists() and "/" not in value and builtin_pipeline(value.removesuffix(".yaml")).exists():
        return builtin_pipeline(value.removesuffix(".yaml"))
    return path


def _with_paths(pipeline: Pipeline, paths: Sequence[str], max_size: int) -> Pipeline:
    """The pipeline with its sources replaced by a walk of the paths a user named.

    Named paths are judged whole, by every engine, up to ``max_size``: no depth limit, no file-type
    filter, no filter prefixes, engines' own size limits raised to ``max_size``; whatever is not judged
    makes the scan an error (exit code 2).
    """
    roots = {os.path.abspath(p): -1 for p in paths}
    spec = ComponentSpec("source", "dirscan", {"roots": roots, "exclude": [], "type_filter": False,
                                               "min_size": 0, "max_size": max_size, "required": True},
                         where="<command line paths>")
    return attrs.evolve(pipeline, sources=(spec,))



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


def _print_summary(summary: Summary) -> None:
    not_scanned = sum(summary.not_scanned.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in
                        sorted(summary.not_scanned.items(), key=lambda item: -item[1]))
    print(f"elkscan: scanned {summary.files:,} files ({human_bytes(summary.bytes)}) in {summary.elapsed:.1f}s: "
          f"{summary.detections} detection(s) in {summary.detected_files} file(s), {summary.clean:,} clean"
          + (f" ({summary.known_good:,} known good)" if summary.known_good else "") + ", "
          f"{summary.errors} error(s), {not_scanned:,} not scanned" + (f" ({reasons})" if reasons else "")
          + (f", {summary.cached} verdict(s) from the cache" if summary.cached else "")
          + (f", {summary.abandoned} abandoned" if summary.abandoned else "")
          + (" (interrupted)" if summary.interrupted else ""), file=sys.stderr)


def run_pipeline(pipeline: Pipeline, *, report_clean: bool = False, quiet: bool = False,
                 whole_up_to: int | None = None, daemon: bool = False) -> int:
    """Run a pipeline to its end (or SIGINT/SIGTERM) and return the exit code. A ``daemon`` (``elkscan
    run``) that stops cleanly on a signal exits 0, as service managers expect."""
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
    if not quiet:
        _print_summary(summary)
    if daemon and summary.interrupted:
        return EXIT_CLEAN  # stopped by a signal, in order: what remained queued is counted as abandoned
    return _exit_code(summary)


def cmd_scan(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(_pipeline_path(args.pipeline))
    missing = [p for p in args.paths if not os.path.lexists(p)]
    for path in missing:
        log.error("%s: no such file or directory", path)
    if args.paths:
        present = [p for p in args.paths if p not in missing]
        if not present:
            return EXIT_ERROR
        pipeline = _with_paths(pipeline, present, args.max_size)
    elif not pipeline.sources:
        raise ConfigError("nothing to scan: no paths given and the pipeline has no sources", pipeline.origin,
                          "name files or directories, or add a source such as dirscan")
    pipeline = _with_format(pipeline, args.format)
    if args.workers:
        pipeline = attrs.evolve(pipeline, limits=attrs.evolve(pipeline.limits, workers=args.workers))
    if args.no_cache:
        pipeline = attrs.evolve(pipeline, limits=attrs.evolve(pipeline.limits, cache=False))
    pipeline = attrs.evolve(pipeline, canary_every=0)  # one shot: no canaries (docs/metrics.md)
    code = run_pipeline(pipeline, report_clean=args.all, quiet=args.quiet,
                        whole_up_to=args.max_size if args.paths else None)
    return EXIT_ERROR if missing and code == EXIT_CLEAN else code


def cmd_run(args: argparse.Namespace) -> int:
    return run_pipeline(load_pipeline(_pipeline_path(args.pipeline)), quiet=args.quiet, daemon=True)


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
    print(f"{'PLUGIN':<18} {'KIND':<9} {'ID':<10} CLASS")
    for row in sorted(rows):
        print(f"{row[0]:<18} {row[1]:<9} {row[2]:<10} {row[3]}")
    for name, reason in sorted(failures.items()):
        print(f"{name:<18} BROKEN    {reason}")
    return EXIT_ERROR if failures else EXIT_CLEAN


def cmd_demo(args: argparse.Namespace) -> int:
    from .testing import write_samples

    directory = Path(args.directory or tempfile.mkdtemp(prefix="elkscan-demo-"))
    written = write_samples(directory)
    pipeline = _with_format(load_pipeline(_pipeline_path(args.pipeline)), args.format)
    also = f" and what the pipeline's {len(pipeline.sources)} source(s) find" if pipeline.sources else ""
    print(f"elkscan: wrote {len(written)} harmless test samples to {directory}; scanning them{also}",
          file=sys.stderr)
    spec = ComponentSpec("source", "dirscan", {"roots": {str(directory.resolve()): -1}, "exclude": [],
                                               "type_filter": False}, where="<demo samples>")
    pipeline = attrs.evolve(pipeline, sources=(spec, *pipeline.sources), canary_every=0)
    return run_pipeline(pipeline)


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` is the subcommand about to run (its plugin gets imported)."""
    parser = argparse.ArgumentParser(
        prog="elkscan", description="A pluggable host malware scanner (Elkeid's scanner, in Python).",
        epilog="Exit codes: 0 nothing detected, 1 detections, 2 errors. Each command has its own --help; "
               "the manual is docs/index.md in elkscan's source.")
    parser.add_argument("--version", action="version", version=f"elkscan {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging on stderr (-vv for debug; shows tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    scan = sub.add_parser("scan", help="scan paths (or the pipeline's sources) once and exit",
                          description="Scan the named files and directories, or, with no paths, what the "
                                      "pipeline's sources find. Records go to stdout.")
    scan.add_argument("paths", nargs="*", metavar="PATH", help="files or directories to scan, whole")
    scan.add_argument("-p", "--pipeline", metavar="FILE", help="pipeline YAML (default: the shipped default)")
    scan.add_argument("-f", "--format", choices=("jsonl", "table"),
                      help="output format (default: table on a terminal, JSON lines otherwise)")
    scan.add_argument("-a", "--all", action="store_true", help="report clean files too")
    scan.add_argument("-w", "--workers", type=_workers, metavar="N",
                      help=f"worker threads, 1 to {MAX_WORKERS} (default: the pipeline's)")
    scan.add_argument("--max-size", type=_size, default=100 * MiB, metavar="SIZE",
                      help="read named files whole up to this size; a larger one is reported not scanned "
                           "and the exit code is 2 (default: 100MiB)")
    scan.add_argument("--no-cache", action="store_true",
                      help="judge every file again, ignoring the pipeline's verdict cache (limits.cache)")
    scan.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary on stderr")
    scan.set_defaults(func=cmd_scan)

    run = sub.add_parser("run", help="run a pipeline until its sources end or it is stopped",
                         description="Long-running mode: periodic walks, monitors and task sources run "
                                     "until SIGTERM/SIGINT.")
    run.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary on stderr")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a pipeline without running it")
    validate.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML, or a shipped one's name")
    validate.add_argument("--print", action="store_true", dest="show",
                          help="then print the pipeline's YAML, e.g. a shipped one to copy and edit")
    validate.set_defaults(func=cmd_validate)

    plugins = sub.add_parser("plugins", help="list installed plugins, their components, and broken ones")
    plugins.set_defaults(func=cmd_plugins)

    demo = sub.add_parser("demo", help="write harmless test samples and scan them with the default pipeline")
    demo.add_argument("directory", nargs="?", help="where to write the samples (default: a new temp dir)")
    demo.add_argument("-p", "--pipeline", metavar="FILE", help="pipeline YAML (default: the shipped default)")
    demo.add_argument("-f", "--format", choices=("jsonl", "table"), help="output format")
    demo.set_defaults(func=cmd_demo)

    for name, ep in sorted(command_plugins().items()):
        if name == command:  # only the command being run is imported
            ep.load()(sub)
        else:
            dist = getattr(ep, "dist", None)  # Python 3.10+
            sub.add_parser(name, help=f"'elkscan {name} --help' says more (from {dist.name if dist else ep.value})",
                           add_help=False)
    return parser


def command_plugins() -> dict:
    """Extra subcommands, from entry points in group ``elkscan.commands`` (``name = "module:register"``,
    where ``register(subparsers)`` adds the parser and sets ``func``). Only the one invoked is imported."""
    return entry_points_in("elkscan.commands")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="elkscan: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as exc:  # one line, never exit code 1 ("detections"); -vv shows the traceback
        if args.verbose >= 2:
            log.exception("error")
        message = str(exc) if isinstance(exc, ElkscanError) else f"{type(exc).__name__}: {exc}"
        print(f"elkscan: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
