"""``elkscan db build|info|verify|hashes``: make and check rule bundles (docs/bundles.md), and compile
the full hash set for a fleet verifier (docs/fleet.md)."""

from __future__ import annotations

import argparse
import os
import tempfile

from .bundle import (DEFAULT_PASSWORD, SERVER_PLATFORMS, BundleError, build_bundle, check_yara, open_bundle,
                     read_sign, sha256_file, sign_path_for)
from .errors import ElkscanError
from .pipeline import builtin_pipeline, load_pipeline
from .plugins import make_plugin_manager
from .trust import check_trusted, check_trusted_tree

#: What ``db hashes`` reads from a directory: ClamAV's hash databases (``.hdu``/``.hsu``: the same
#: lines, PUA signatures) and elkscan hash lists. Packed databases are refused with the fix.
HASH_SUFFIXES = (".hdb", ".hsb", ".hdu", ".hsu", ".hashes")
PACKED_SUFFIXES = (".cvd", ".cld", ".cud")


def _password(args: argparse.Namespace) -> str:
    if args.password_env:
        value = os.environ.get(args.password_env)
        if value is None:
            raise ElkscanError(f"environment variable {args.password_env!r} (--password-env) is not set")
        return value
    return args.password


def cmd_build(args: argparse.Namespace) -> int:
    password = _password(args)
    if args.default:
        report = _default_bundle(args.output, password, args.version)
    else:
        if not args.version:
            raise ElkscanError("db build needs --version (or --default)")
        if not (args.clamav or args.yara):
            raise ElkscanError("db build needs --clamav and/or --yara inputs (or --default)")
        platforms = None if args.all_platforms else (
            [p.strip() for p in args.platforms.split(",") if p.strip()] if args.platforms else SERVER_PLATFORMS)
        report = build_bundle(args.output, version=args.version, password=password, clamav=args.clamav,
                              yara=args.yara, platforms=platforms)
    print(f"{report.path}: version {report.version}, {len(report.files)} files ({', '.join(report.files)})")
    for kind in sorted(set(report.kept) | set(report.dropped)):
        print(f"  {kind:<6} kept {report.kept.get(kind, 0):>8,}  dropped {report.dropped.get(kind, 0):>8,}")
    print(f"{report.sign_path}: sha256 {report.sha256}")
    return 0


def _default_bundle(output: str, password: str, version: str | None):
    """The default bundle, built by the plugin that ships it (clamav_backend): the default pipeline's
    plugins are the ones loaded, as for a scan with it."""
    pm = make_plugin_manager(load_pipeline(builtin_pipeline()).plugins, missing_ok=True)
    report = pm.hook.elkscan_default_bundle(output=output, password=password, version=version)
    if report is None:
        raise ElkscanError("--default needs a plugin that ships the default bundle: the clamav_backend plugin "
                           "(pip install plugins/clamav_backend)")
    return report


def _expected_sha(args: argparse.Namespace) -> str | None:
    if args.sha256:
        return args.sha256
    sign = sign_path_for(args.bundle)
    return read_sign(sign) if sign.exists() else None


def cmd_info(args: argparse.Namespace) -> int:
    sign = sign_path_for(args.bundle)
    with tempfile.TemporaryDirectory(prefix="elkscan-db-") as tmp:
        bundle = open_bundle(args.bundle, password=_password(args), dest=os.path.join(tmp, "x"))
        sha = sha256_file(args.bundle)
        print(f"{args.bundle}: version {bundle.version}")
        print(f"  sha256 {sha}" + (f" ({'matches' if read_sign(sign) == sha else 'DOES NOT match'} {sign})"
                                   if sign.exists() else f" (no {sign.name})"))
        for kind, paths in sorted(bundle.rules.items()):
            for path in paths:
                with open(path, "rb") as handle:
                    lines = sum(1 for line in handle if line.strip() and not line.startswith(b"#"))
                print(f"  {kind:<7} {os.path.basename(path):<32} {lines:>9,} lines")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    expected = _expected_sha(args)
    with tempfile.TemporaryDirectory(prefix="elkscan-db-") as tmp:
        bundle = open_bundle(args.bundle, password=_password(args), version=args.version, sha256=expected,
                             dest=os.path.join(tmp, "x"))
        try:
            check_yara(bundle.rules["yara"])
        except BundleError as exc:  # name the entry, not the temporary copy
            raise BundleError(f"{args.bundle}: {str(exc).replace(bundle.directory + os.sep, '')}") from None
    checked = ["password"] * bundle.encrypted + ["entries"] + ["sha256"] * bool(expected) + ["version"] * bool(
        args.version) + ["yara"] * bool(bundle.rules["yara"])
    unencrypted = "" if bundle.encrypted else "; not encrypted, so no password to check"
    print(f"{args.bundle}: OK, version {bundle.version} (checked {', '.join(checked)}{unencrypted})")
    return 0


def _hash_inputs(sources: list[str]) -> list[str]:
    """The hash lists named (any name) or found in directories (by ending), each trust-checked: its
    signatures decide what the verifier calls malware. Packed ClamAV databases stop with the fix."""
    found = []
    for source in sources:
        if os.path.isdir(source):
            check_trusted_tree(source, "hash source")
            for directory, dirs, files in os.walk(source):
                dirs.sort()
                found += [os.path.join(directory, name) for name in sorted(files)
                          if name.lower().endswith(HASH_SUFFIXES + PACKED_SUFFIXES)]
        elif os.path.exists(source):
            check_trusted(source, "hash source")
            found.append(source)
        else:
            raise ElkscanError(f"{source}: no such file or directory")
    for path in found:
        with open(path, "rb") as stream:
            head = stream.read(11)
        if path.lower().endswith(PACKED_SUFFIXES) or head == b"ClamAV-VDB:":
            raise ElkscanError(f"{path} is a packed ClamAV database: unpack it first (sigtool --unpack "
                               f"{os.path.basename(path)}, in an empty directory) and pass that directory")
    return found


def cmd_hashes(args: argparse.Namespace) -> int:
    paths = _hash_inputs(args.sources)
    if not paths:
        raise ElkscanError(f"no hash list in {' '.join(args.sources)} (files ending "
                           f"{' '.join(HASH_SUFFIXES)})")
    pm = make_plugin_manager(["hash_extractor"], missing_ok=True)
    report = pm.hook.elkscan_compile_hashes(sources=paths, output=args.output)
    if report is None:
        raise ElkscanError("db hashes needs the hash_extractor plugin (pip install plugins/hash_extractor)")
    counts, problems = report["signatures"], report["skipped"]
    print(f"{args.output}: {sum(counts.values()):,} signatures from {len(paths)} file(s), "
          f"{os.path.getsize(args.output):,} bytes")
    for algorithm, count in counts.items():
        print(f"  {algorithm:<7} {count:>12,}")
    if problems:
        print(f"  skipped {len(problems):,} malformed line(s), the first: "
              + "; ".join(f"{path} line {number}: {reason}" for path, number, reason in problems[:3]))
    print(f"  sha256 {report['sha256']}")
    return 0


def register(subparsers) -> None:
    """Add ``elkscan db`` (entry point ``db`` in group ``elkscan.commands``)."""
    db = subparsers.add_parser("db", help="build, inspect and verify rule bundles; compile hash sets",
                               description="Rule bundles: password-protected, versioned zips of ClamAV "
                                           "signatures, YARA rules and a hash list (docs/bundles.md).")
    sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    def password_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--password", default=DEFAULT_PASSWORD,
                            help="bundle password (default: Elkeid's clamav_default_passwd)")
        parser.add_argument("--password-env", metavar="NAME", help="read the password from this variable")

    build = sub.add_parser("build", help="build a bundle (+ .sign) from ClamAV databases and YARA rules")
    build.add_argument("output", metavar="OUTPUT.zip")
    build.add_argument("--version", help="version written into the bundle (letters, digits, . _ -)")
    build.add_argument("--clamav", nargs="+", default=[], metavar="PATH",
                       help="unpacked ClamAV databases (sigtool --unpack output): files or directories")
    build.add_argument("--yara", nargs="+", default=[], metavar="PATH", help="YARA files or directories")
    build.add_argument("--platforms", metavar="A,B,...",
                       help=f"signature prefixes to keep (default: Elkeid's: {','.join(SERVER_PLATFORMS)})")
    build.add_argument("--all-platforms", action="store_true", help="keep every signature")
    build.add_argument("--default", action="store_true",
                       help="build the project's default bundle from its own signatures and rules")
    password_options(build)
    build.set_defaults(func=cmd_build)

    info = sub.add_parser("info", help="show a bundle's version, hash and files")
    info.add_argument("bundle", metavar="BUNDLE.zip")
    password_options(info)
    info.set_defaults(func=cmd_info)

    verify = sub.add_parser("verify", help="check a bundle's hash (.sign or --sha256), password and version")
    verify.add_argument("bundle", metavar="BUNDLE.zip")
    verify.add_argument("--version", help="the version the bundle must hold")
    verify.add_argument("--sha256", help="the expected SHA-256 (default: from <name>.sign when present)")
    password_options(verify)
    verify.set_defaults(func=cmd_verify)

    hashes = sub.add_parser("hashes", help="compile hash lists and ClamAV hash databases into one index file",
                            description="Compile the full hash set (unpacked ClamAV .hdb/.hsb/.hdu/.hsu, "
                                        "elkscan .hashes) into one index file the hashlist engine maps "
                                        "and shares between processes (docs/fleet.md).")
    hashes.add_argument("sources", nargs="+", metavar="SRC", help="hash lists: files (any name) or directories")
    hashes.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="the index to write (atomically, mode 0644)")
    hashes.set_defaults(func=cmd_hashes)
