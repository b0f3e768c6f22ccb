"""``elkscan elkeid``: build the agent package, or run as the agent's plugin from an installed elkscan."""

from __future__ import annotations

import argparse
import sys

from .package import ARCHES


def register(subparsers) -> None:
    parser = subparsers.add_parser("elkeid", help="the Elkeid agent plugin: build its package, or run as it",
                                   description="elkscan as Elkeid's scanner plugin (docs/elkeid.md).")
    sub = parser.add_subparsers(dest="elkeid_command", metavar="ACTION", required=True)
    package = sub.add_parser("package", help="build scanner-<arch>-<version>.tar.gz for the agent",
                             description="Build the plugin package and print the SHA-256 values for "
                                         "Elkeid's plugin config (sha256 = archive, signature = scanner).")
    package.add_argument("--arch", choices=ARCHES, help="target architecture: this host's (the default; scanner "
                                                        "carries this machine's Python and C libraries)")
    package.add_argument("-o", "--output", metavar="DIR", default=".", help="where to write the archive")
    package.add_argument("-p", "--pipeline", metavar="FILE", help="pipeline to ship (default: elkeid.yaml)")
    package.add_argument("--no-database", action="store_true", help="ship no rule database under tmp/")
    package.set_defaults(func=cmd_package)
    run = sub.add_parser("run", help="run as the agent's plugin (tasks on fd 3, records on fd 4)")
    run.add_argument("pipeline", nargs="?", metavar="PIPELINE", help="pipeline YAML (default: elkeid.yaml)")
    run.set_defaults(func=cmd_run)


def cmd_package(args: argparse.Namespace) -> int:
    from .package import PackageError, build
    try:
        built = build(args.output, arch=args.arch, pipeline=args.pipeline, database=not args.no_database)
    except PackageError as exc:
        print(f"elkscan: error: {exc}", file=sys.stderr)
        return 2
    print(f"package:   {built.archive}")
    print(f"sha256:    {built.archive_sha256}    (plugin config 'sha256')")
    print(f"signature: {built.scanner_sha256}    (plugin config 'signature': SHA-256 of scanner)")
    if built.database:
        print(f"database:  tmp/archive_db_default_{built.database}.zip")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from .agent import main
    pipeline = args.pipeline or str(files("elkscan_core.pipelines").joinpath("elkeid.yaml"))
    return main([pipeline])
