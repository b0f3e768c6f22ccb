"""Size, start-up time and memory of the packaged ``scanner`` (issue 11), against other packages.

For each package (a ``scanner-<arch>-<version>.tar.gz`` from ``elkscan elkeid package``, of this
checkout or of an older one, e.g. the sh launcher that ran the host's Python), it unpacks it into a
fresh plugin directory, starts ``scanner`` as the Elkeid agent does (tasks on fd 3, records on fd 4,
the plugin directory as cwd, an environment of only ``DETAIL``), sends a 6053 on a small file at once
and measures:

- size: ``scanner``, the archive, the unpacked package, and what each start unpacks (on disk);
- start-up: from ``exec`` to the 6053's 6000 (the first start compiles the YARA rules into the
  plugin's cache; the median of the later ones is the usual start), and the exit after the agent
  closes the pipes;
- memory, 1 s after the answer, summed over the plugin's processes (the loaders and the interpreter):
  RSS, and PSS, which counts a page shared between them once.

The pipeline is the shipped one without the ClamAV engine (clamd's own start-up, seconds, is the same
for every package) and with a private lock file. Run as root (the fanotify source):
``.venv/bin/python bench/package_bench.py [--package LABEL=ARCHIVE ...] [--repeat 5]``; without
``--package`` it builds this checkout's package and measures it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(  # the simulated agent's framing, as the tests use it
    "elkeid_agent", HERE.parent / "plugins" / "elkeid_transport" / "tests" / "conftest.py")
agent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agent)


def du(path: Path) -> int:
    return sum(p.lstat().st_size for p in [path, *path.rglob("*")] if p.is_file() and not p.is_symlink())


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        values[name] = int(value.split()[0])
    return values["Rss"], values["Pss"]


def unpacked_now(workdir: Path, pids: list[int]) -> int:
    """Bytes the running loaders unpacked: PyInstaller's ./_MEI* and staticx's $TMPDIR/staticx-*."""
    dirs = {p for p in workdir.iterdir() if p.name.startswith("_MEI")}
    for pid in pids:
        exe = Path(os.readlink(f"/proc/{pid}/exe"))
        if exe.parent.name.startswith("staticx-"):
            dirs.add(exe.parent)
    return sum(du(d) for d in dirs)


def start_once(workdir: Path, classes, target: str) -> dict:
    started = time.monotonic()
    process_agent = agent.Agent(workdir, classes)
    process_agent.send(6053, {"exe": target}, token="bench")
    process_agent.done("bench", timeout=120)
    answered = time.monotonic() - started
    time.sleep(1.0)
    pids = tree(process_agent.process.pid)
    rss = pss = 0
    for pid in pids:
        one_rss, one_pss = memory_kb(pid)
        rss, pss = rss + one_rss, pss + one_pss
    unpacked = unpacked_now(workdir, pids)
    closed = time.monotonic()
    assert process_agent.close(timeout=30) == 0, process_agent.stderr()
    return {"answer": answered, "exit": time.monotonic() - closed, "rss": rss, "pss": pss,
            "processes": len(pids), "unpacked": unpacked}


def measure(label: str, archive: Path, repeat: int, scratch: Path, classes) -> dict:
    workdir = scratch / label / "scanner"
    workdir.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(workdir)
    pipeline = workdir / "pipelines" / "elkeid.yaml"
    data = yaml.safe_load(pipeline.read_text())
    data["engines"] = [e for e in data["engines"] if e["use"] != "clamav"]
    data["sources"][0].setdefault("with", {}).update({"lock_file": str(scratch / label / "lock.pid")})
    pipeline.write_text(yaml.safe_dump(data))
    target = scratch / "target.txt"
    target.write_text("a small clean file\n")
    runs = [start_once(workdir, classes, str(target)) for _ in range(repeat)]
    later = runs[1:] or runs
    return {
        "label": label, "scanner": (workdir / "scanner").stat().st_size, "archive": archive.stat().st_size,
        "package": du(workdir) - du(workdir / "state") - sum(du(p) for p in workdir.glob("scanner.*")),
        "first": runs[0]["answer"], "start": statistics.median(r["answer"] for r in later),
        "exit": statistics.median(r["exit"] for r in runs),
        "rss": statistics.median(r["rss"] for r in later), "pss": statistics.median(r["pss"] for r in later),
        "processes": runs[-1]["processes"], "unpacked": runs[-1]["unpacked"],
    }


def build_current(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "elkscan_core.cli", "elkeid", "package", "-o", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    (archive,) = out.glob("scanner-*.tar.gz")
    return archive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", action="append", default=[], metavar="LABEL=ARCHIVE",
                        help="a package to measure (repeatable); default: build this checkout's")
    parser.add_argument("--repeat", type=int, default=5, help="starts per package (default 5)")
    args = parser.parse_args()
    classes = agent.build_bridge_classes()
    with tempfile.TemporaryDirectory(prefix="elkscan-package-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        packages = [tuple(p.split("=", 1)) for p in args.package]
        if not packages:
            packages = [("this checkout", build_current(scratch / "built"))]
        rows = [measure(f"p{n}", Path(archive), args.repeat, scratch, classes) | {"label": label}
                for n, (label, archive) in enumerate(packages)]
    mb = 1e6
    print(f"{args.repeat} starts each; Linux {os.uname().release}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| package | scanner | archive | unpacked package | unpacked at each start | first start | start "
          "(median) | exit | processes | RSS | PSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['scanner'] / mb:.2f} MB | {r['archive'] / mb:.1f} MB | {r['package'] / mb:.1f} MB "
              f"| {r['unpacked'] / mb:.1f} MB | {r['first']:.2f} s | {r['start']:.2f} s | {r['exit']:.2f} s "
              f"| {r['processes']} | {r['rss'] / 1e3:.1f} MB | {r['pss'] / 1e3:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
