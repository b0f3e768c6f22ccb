"""``elkscan rules update|status|rollback`` (docs/rules.md).

Exit codes: 0 done; 1 (update only) a bundle is in use, but some source could not be fetched (its last
good copy was used, or it had none and was left out): the rules are not as current as the config asks;
2 an error, and the rules in use are unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Any

from elkscan_core.render import json_line
from elkscan_core.runner import default_state_dir
from elkscan_core.text import visible

from .config import RulesConfig, load_config
from .store import Store
from .update import password, rollback, update

DEFAULT_CONFIG = "/etc/elkscan/rules.yaml"


def _config(args: argparse.Namespace) -> RulesConfig:
    return load_config(args.config)


def _store(args: argparse.Namespace, config: RulesConfig | None = None) -> Store:
    if getattr(args, "state_dir", None):
        return Store(args.state_dir)
    if config is not None and config.state_dir:
        return Store(config.state_dir)
    return Store(os.path.join(default_state_dir(), "rules"))


def _say(args: argparse.Namespace):
    quiet = getattr(args, "quiet", False)
    return (lambda line: None) if quiet else (lambda line: print(f"elkscan rules: {line}", file=sys.stderr))


def _summary(entry: dict[str, Any]) -> str:
    reasons = Counter(item["reason"] for item in entry.get("set_aside", []))
    aside = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())) or "nothing"
    return f"kept {entry.get('kept', 0)} rules in {entry.get('files', 0)} files; set aside: {aside}"


def cmd_update(args: argparse.Namespace) -> int:
    config = _config(args)
    store = _store(args, config)
    outcome = update(config, store, _say(args))
    entry = outcome.entry
    state = "new" if outcome.changed else "unchanged"
    print(f"rules {entry['version']} ({state}): {_summary(entry)}; in {entry['seconds'].get('total', 0):.1f}s")
    print(f"  scans use it as: {os.path.join(store.path, 'current')}")
    for message in outcome.failed:
        print(f"elkscan rules: {message}", file=sys.stderr)
    return 1 if outcome.failed else 0


def cmd_rollback(args: argparse.Namespace) -> int:
    config = _config(args) if os.path.exists(args.config) else None
    store = _store(args, config)
    secret = password(config) if config is not None else password(RulesConfig(sources=()))
    entry = rollback(secret, store)
    print(f"rules {entry['version']} in use again (built {entry.get('built_at', '?')}): {_summary(entry)}")
    return 0


def _records(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The bundles (current, then previous), then the current one's sources and what it set aside."""
    records = [{"type": "bundle", "role": role, **{k: v for k, v in state[role].items()
                                                  if k not in ("sources", "set_aside")}}
               for role in ("current", "previous") if state.get(role)]
    current = state.get("current") or {}
    records += [{"type": "source", **source} for source in current.get("sources", [])]
    records += [{"type": "set_aside", **item} for item in current.get("set_aside", [])]
    return records


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args) if os.path.exists(args.config) else None
    store = _store(args, config)
    state = store.state() if os.path.isdir(store.path) else {}
    if args.format == "jsonl":
        for record in _records(state):
            sys.stdout.write(json_line(record))
        return 0
    current = state.get("current")
    if not current:
        print(f"no rules bundle in {store.path} yet: run 'elkscan rules update'")
        return 0
    print(f"in use:   {current['version']}  built {current.get('built_at', '?')}  "
          f"({current.get('seconds', {}).get('total', 0):.1f}s)  sha256 {current.get('sha256', '')[:16]}")
    print(f"          {_summary(current)}")
    print(f"          scans use it as {os.path.join(store.path, 'current')}")
    warnings = current.get("warnings", [])
    if warnings:
        print(f"          {len(warnings)} compiler warning(s), e.g. {visible(warnings[0])} (all: -f jsonl)")
    previous = state.get("previous")
    print(f"previous: {previous['version']}  built {previous.get('built_at', '?')}  ('elkscan rules rollback')"
          if previous else "previous: none")
    print("\nSOURCE               KIND       VERSION                                   STATE")
    for source in current.get("sources", []):
        print(f"{visible(source['name']):<20} {source['kind']:<10} {visible(source.get('version', ''))[:40]:<41} "
              f"{visible(source.get('state', ''))}")
    items = current.get("set_aside", [])
    if items:
        print("\nSET ASIDE            REASON                 FILE / RULE: DETAIL")
        for item in items[: None if args.all else 50]:
            rule = f" / {item['rule']}" if item["rule"] else ""
            print(f"{visible(item['source']):<20} {item['reason']:<22} {visible(item['file'])}{visible(rule)}: "
                  f"{visible(item['detail'])}")
        if len(items) > 50 and not args.all:
            print(f"... and {len(items) - 50} more (--all, or -f jsonl)")
    return 0


def register(subparsers) -> None:
    """Add ``elkscan rules`` (entry point ``rules`` in group ``elkscan.commands``)."""
    parser = subparsers.add_parser(
        "rules", help="fetch, vet and switch rule sets: update, status, rollback",
        description="Rule sources listed in a config are fetched, vetted (they compile, stay within a cost "
                    "budget, match nothing benign on this host) and made a versioned bundle "
                    "(docs/rules.md). Exit codes: 0 done; 1 a bundle is in use but a source could not be "
                    "fetched; 2 error, nothing changed.")
    sub = parser.add_subparsers(dest="rules_command", metavar="ACTION", required=True)

    def common(action: argparse.ArgumentParser) -> None:
        action.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                            help=f"the rules config (default: {DEFAULT_CONFIG})")
        action.add_argument("--state-dir", metavar="DIR",
                            help="where bundles and sources are kept (default: the config's state_dir, else "
                                 "'rules' in elkscan's state directory)")

    up = sub.add_parser("update", help="fetch every source, vet its rules, build and use a new bundle")
    common(up)
    up.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    up.set_defaults(func=cmd_update)

    status = sub.add_parser("status", help="the bundle in use, its sources, and what was set aside and why")
    common(status)
    status.add_argument("-f", "--format", choices=("table", "jsonl"), default="table",
                        help="jsonl: one JSON object a line (type bundle, source, set_aside)")
    status.add_argument("-a", "--all", action="store_true", help="list everything set aside, not the first 50")
    status.set_defaults(func=cmd_status)

    back = sub.add_parser("rollback", help="use the previous bundle again (a second rollback undoes it)")
    common(back)
    back.set_defaults(func=cmd_rollback)
