"""``elkscan quarantine list|restore|purge``: what the vault holds, and getting it out again."""

from __future__ import annotations

import argparse
import os
import sys
import time

from elkscan_core import Duration
from elkscan_core.render import json_line
from elkscan_core.runner import default_state_dir
from elkscan_core.text import raw_bytes, visible

from .vault import Vault, VaultError


def _vault_path(args: argparse.Namespace) -> str:
    return args.vault or os.path.join(default_state_dir(), "quarantine")


def cmd_list(args: argparse.Namespace) -> int:
    path = _vault_path(args)
    if not os.path.lexists(path):
        print(f"elkscan: no quarantine vault at {path}: nothing quarantined there", file=sys.stderr)
        return 0
    vault = Vault.open(path)
    try:
        entries, problems = vault.entries()
    finally:
        vault.close()
    for entry in entries:
        if args.format == "jsonl":
            sys.stdout.write(json_line(entry.public()))
        else:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.quarantined_at))
            signatures = ",".join(sorted({d["signature"] for d in entry.detections}))
            print(f"{entry.id}  {when}  {entry.size:>10}  {visible(signatures)}  {visible(entry.path)}")
    for problem in problems:
        print(f"elkscan: {path}/{problem}", file=sys.stderr)
    return 2 if problems else 0


def cmd_restore(args: argparse.Namespace) -> int:
    vault = Vault.open(_vault_path(args))
    try:
        with vault.lock():
            to = raw_bytes(os.path.abspath(args.to)) if args.to else None
            dest = vault.restore(args.id, to=to)
    finally:
        vault.close()
    print(f"restored {args.id} to {visible(os.fsdecode(dest))}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    if not (args.ids or args.all or args.older_than is not None):
        raise VaultError("purge what? name item ids, or --older-than AGE, or --all")
    vault = Vault.open(_vault_path(args))
    try:
        with vault.lock():
            count = vault.purge(args.ids, older_than=args.older_than, everything=args.all)
    finally:
        vault.close()
    print(f"purged {count} item(s) from {vault.path}")
    return 0


def _duration(value: str) -> float:
    try:
        return Duration.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers) -> None:
    """Add ``elkscan quarantine`` (entry point ``quarantine`` in group ``elkscan.commands``)."""
    parser = subparsers.add_parser(
        "quarantine", help="list, restore and purge quarantined files",
        description="The vault the quarantine sink moves detected files into (plugins/quarantine/README.md).")
    sub = parser.add_subparsers(dest="quarantine_command", metavar="ACTION", required=True)

    def vault_option(action: argparse.ArgumentParser) -> None:
        action.add_argument("--vault", metavar="DIR",
                            help="the vault (default: 'quarantine' in elkscan's state directory: "
                                 "$ELKSCAN_STATE_DIR, else ~/.cache/elkscan, or /var/lib/elkscan for root "
                                 "without HOME)")

    listing = sub.add_parser("list", help="one item a line: id, time (UTC), size, signatures, path")
    listing.add_argument("-f", "--format", choices=("text", "jsonl"), default="text",
                         help="jsonl: each item's manifest entry as one JSON object a line")
    vault_option(listing)
    listing.set_defaults(func=cmd_list)

    restore = sub.add_parser("restore", help="put an item back, identical, and take it out of the vault")
    restore.add_argument("id", metavar="ID")
    restore.add_argument("--to", metavar="PATH", help="restore there instead of where it was")
    vault_option(restore)
    restore.set_defaults(func=cmd_restore)

    purge = sub.add_parser("purge", help="delete items for good")
    purge.add_argument("ids", nargs="*", metavar="ID")
    purge.add_argument("--older-than", type=_duration, metavar="AGE", help="items quarantined longer ago (30d)")
    purge.add_argument("--all", action="store_true", help="every item")
    vault_option(purge)
    purge.set_defaults(func=cmd_purge)
