"""Vet a directory of YARA rules as ``elkscan rules update`` does, on this host, and say what was set aside
(counts by reason, examples) and how long each step took.

    .venv/bin/python bench/rules_vetting.py RULES_DIR [--budget 5ms] [--max-files 1000] [--max-bytes 128MiB]

RULES_DIR is passed as a local source (``dir:``); the state goes into a temporary directory, removed at the
end. The figures in docs/rules.md were measured with Elastic's public Linux rules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict

from elkscan_rules.config import load_config
from elkscan_rules.store import Store
from elkscan_rules.update import update


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rules", metavar="RULES_DIR")
    parser.add_argument("--budget", default="5ms", help="vetting.budget (default 5ms per MiB)")
    parser.add_argument("--max-files", type=int, default=1000, help="baseline.max_files (default 1000)")
    parser.add_argument("--max-bytes", default="128MiB", help="baseline.max_bytes (default 128MiB)")
    parser.add_argument("--examples", type=int, default=5, help="examples shown per reason")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="elkscan-rules-bench-") as tmp:
        config_path = os.path.join(tmp, "rules.yaml")
        with open(config_path, "w") as handle:
            json.dump({"sources": [{"name": "bench", "dir": os.path.abspath(args.rules)}],
                       "state_dir": os.path.join(tmp, "state"),
                       "vetting": {"budget": args.budget, "baseline": {"max_files": args.max_files,
                                                                       "max_bytes": args.max_bytes}}}, handle)
        config = load_config(config_path)
        started = time.monotonic()
        outcome = update(config, Store(config.state_dir), lambda line: print(f"  {line}", file=sys.stderr))
        wall = time.monotonic() - started
    entry = outcome.entry
    aside = entry["set_aside"]
    print(f"| rules kept | files | set aside | baseline | profiling sample | budget | wall |")
    print("|---|---|---|---|---|---|---|")
    base = entry["baseline"]
    print(f"| {entry['kept']} | {entry['files']} | {len(aside)} | {base['files']} files | "
          f"{base['sample_files']} files, {base['sample_bytes'] / 2**20:.1f} MiB | {entry['budget_ms_per_mib']:g} ms/MiB "
          f"| {wall:.1f} s |")
    print("\nseconds: " + ", ".join(f"{k} {v}" for k, v in entry["seconds"].items()))
    by_reason: dict[str, list[dict]] = defaultdict(list)
    for item in aside:
        by_reason[item["reason"]].append(item)
    for reason, count in Counter(item["reason"] for item in aside).most_common():
        print(f"\n{reason}: {count}")
        for item in by_reason[reason][:args.examples]:
            print(f"  {item['file']} {item['rule']}: {item['detail']}")
    if entry["warnings"]:
        print(f"\ncompiler warnings: {len(entry['warnings'])}, e.g. {entry['warnings'][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
