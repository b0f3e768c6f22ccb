"""``elkscan elkeid package``: the tar.gz an Elkeid operator uploads in place of the ``scanner`` plugin.

Layout (unpacked into /etc/elkeid/plugin/scanner)::

    scanner                         POSIX sh launcher: finds /usr/bin/python3 (or platform-python)
    elkscan/boot.py                 puts lib/ and vendor/py<X.Y>/ on sys.path, runs the agent entry point
    elkscan/lib/                    elkscan-core and the pipeline's plugins (pure Python, any 3.9+)
    elkscan/vendor/py<X.Y>/         third-party dependencies for one Python version (compiled ones too)
    pipelines/elkeid.yaml           the pipeline the launcher runs
    tmp/archive_db_<name>_<v>.zip   the default rule database, named by tmp/archive_db.json

Everything comes from the environment that runs the command: elkscan projects are built from their
source directories with pip (offline, no build isolation), third-party dependencies are copied from the
installed distributions. ``--python`` adds dependencies for another interpreter through its own pip.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from typing import Optional

import attrs
from packaging.requirements import Requirement

from elkscan_core import __version__, load_pipeline
from elkscan_core import bundle as bundles
from elkscan_core.bundle import sha256_file

from .database import DatabaseSpec, write_state

log = logging.getLogger("elkscan.elkeid.package")

ARCHES = ("x86_64", "aarch64")
#: What this command needs to build elkscan's projects, and the scanner does not need to run.
BUILD_ONLY = frozenset({"setuptools"})
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "tests",
                                 "bench", "docs", "plugins", ".pytest_cache", "state")


class PackageError(Exception):
    """The package cannot be built; the message says why and what to do."""


@attrs.frozen
class Package:
    archive: Path
    archive_sha256: str
    scanner_sha256: str
    database: str


def host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)


def _pipeline_plugins(pipeline: Path) -> list[str]:
    return list(load_pipeline(pipeline).plugins)


def _installed(name: str) -> metadata.Distribution:
    """The installed distribution ``name``. An install with ``direct_url.json`` (pip's) is preferred to a
    bare ``*.egg-info`` that a source checkout on sys.path (the current directory) also offers: that one's
    file list is whatever the last build saw, and a module added since would be left out."""
    found = list(metadata.distributions(name=name))
    if not found:
        raise metadata.PackageNotFoundError(name)
    return next((d for d in found if d.read_text("direct_url.json")), found[0])


def _dist_of_plugin(name: str) -> metadata.Distribution:
    for ep in metadata.entry_points(group="elkscan"):
        if ep.name == name and ep.dist is not None:
            return ep.dist
    raise PackageError(f"plugin {name!r} named in the pipeline is not installed; install it first")


def _source_dir(dist: metadata.Distribution) -> Optional[Path]:
    """The project directory of an editable (development) install, else None."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
        return Path(info["url"][len("file://"):])
    return None


def _requirements(dist: metadata.Distribution) -> list[str]:
    """Names of the distributions ``dist`` needs here (markers evaluated, extras ignored)."""
    names = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def _closure(roots: list[metadata.Distribution]) -> dict[str, metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        dist = todo.pop()
        key = _norm(dist.metadata["Name"])
        if key in seen:
            continue
        seen[key] = dist
        for name in _requirements(dist):
            if _norm(name) in BUILD_ONLY:
                continue
            try:
                todo.append(_installed(name))
            except metadata.PackageNotFoundError:
                raise PackageError(f"{dist.metadata['Name']} needs {name}, which is not installed") from None
    return seen


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _compiled(dist: metadata.Distribution) -> bool:
    return any(Path(str(item)).suffix in (".so", ".pyd") for item in dist.files or [])


def _copy_installed(dist: metadata.Distribution, target: Path) -> None:
    """Copy an installed distribution's files (its RECORD)."""
    for item in dist.files or []:
        parts = Path(str(item)).parts
        if not parts or parts[0] == ".." or "__pycache__" in parts:
            continue
        source = Path(str(dist.locate_file(item)))
        if not source.is_file():
            continue
        destination = target.joinpath(*parts)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


def _build_code(dists: list[metadata.Distribution], target: Path, scratch: Path) -> None:
    """Install elkscan's own projects into ``target``, from their sources (offline)."""
    sources = []
    for dist in dists:
        source = _source_dir(dist)
        if source is None:
            _copy_installed(dist, target)
            continue
        copy = scratch / _norm(dist.metadata["Name"])
        shutil.copytree(source, copy, ignore=_IGNORE)
        if (source / "pipelines").is_dir():  # the core maps the top-level pipelines/ into its package
            shutil.copytree(source / "pipelines", copy / "pipelines", dirs_exist_ok=True, ignore=_IGNORE)
        sources.append(str(copy))
    if sources:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                 "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                                 "--target", str(target), *sources], capture_output=True, text=True)
        if result.returncode:
            raise PackageError(f"pip could not build elkscan's projects: {result.stderr.strip()[-2000:]}")
    shutil.rmtree(target / "bin", ignore_errors=True)


def _vendor_other(python: str, requirements: list[str], vendor: Path) -> str:
    """Dependencies for another interpreter, through its own pip (needs PyPI or a wheel cache)."""
    probe = subprocess.run([python, "-c", "import sys; print('py%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)
    if probe.returncode:
        raise PackageError(f"{python} does not run: {probe.stderr.strip()}")
    tag = probe.stdout.strip()
    result = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "--target", str(vendor / tag), *requirements], capture_output=True, text=True)
    if result.returncode:
        raise PackageError(f"{python} -m pip could not install {' '.join(requirements)}: "
                           f"{result.stderr.strip()[-2000:]}")
    return tag


def _default_database(tmp: Path) -> str:
    """The project's default rule bundle under tmp/, named by tmp/archive_db.json; its version."""
    try:
        from elkscan_clamav_backend.defaults import build_default_bundle
    except ImportError:
        build_default_bundle = None
    try:
        if build_default_bundle is not None:
            report = build_default_bundle(tmp / "default.zip", password=bundles.DEFAULT_PASSWORD, version=None)
        else:  # no ClamAV plugin: an empty database, the engines keep the project's own rules
            report = bundles.build_bundle(tmp / "default.zip", version=__version__)
    except Exception as exc:
        raise PackageError(f"cannot build the default rule database: {type(exc).__name__}: {exc} "
                           "(or build with --no-database)") from exc
    spec = DatabaseSpec(version=report.version, sha256=sha256_file(report.path), passwd=bundles.DEFAULT_PASSWORD)
    wanted = Path(spec.archive(str(tmp)))
    if Path(report.path) != wanted:
        os.replace(report.path, wanted)
    for leftover in tmp.iterdir():
        if leftover != wanted:
            leftover.unlink()
    write_state(str(tmp), spec)
    return spec.version


def _tar(root: Path, archive: Path) -> None:
    """A reproducible tar.gz of ``root``'s contents (sorted, root-owned, no timestamps of the build)."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        return info

    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        for path in sorted(root.rglob("*")):
            if "__pycache__" in path.parts:
                continue
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False, filter=clean)


def build(out_dir: str | os.PathLike = ".", *, arch: Optional[str] = None, pythons: tuple[str, ...] = (),
          pipeline: Optional[str] = None, database: bool = True) -> Package:
    """Build ``scanner-<arch>-<version>.tar.gz`` in ``out_dir``."""
    arch = arch or host_arch()
    if arch not in ARCHES:
        raise PackageError(f"unsupported architecture {arch!r} (choose {' or '.join(ARCHES)})")
    pipeline_path = Path(pipeline) if pipeline else Path(str(files("elkscan_core.pipelines").joinpath("elkeid.yaml")))
    plugin_names = _pipeline_plugins(pipeline_path)
    if "elkeid_transport" not in plugin_names:
        raise PackageError(f"{pipeline_path} does not load elkeid_transport: it cannot talk to the agent")
    own = [_installed("elkscan-core"), *(_dist_of_plugin(n) for n in plugin_names)]
    everything = _closure(own)
    own_keys = {_norm(d.metadata["Name"]) for d in own}
    third_party = {k: d for k, d in everything.items() if k not in own_keys}
    compiled = sorted(d.metadata["Name"] for d in third_party.values() if _compiled(d))
    if compiled and arch != host_arch():
        raise PackageError(f"{', '.join(compiled)} contain compiled code for {host_arch()}; build the "
                           f"{arch} package on an {arch} host")
    with tempfile.TemporaryDirectory(prefix="elkscan-package-") as scratch_dir:
        scratch = Path(scratch_dir)
        root = scratch / "scanner"
        (root / "elkscan").mkdir(parents=True)
        here = Path(__file__).parent / "launcher"
        shutil.copy2(here / "scanner", root / "scanner")
        os.chmod(root / "scanner", 0o755)
        shutil.copy2(here / "boot.py", root / "elkscan" / "boot.py")
        _build_code(list({_norm(d.metadata["Name"]): d for d in own}.values()), root / "elkscan" / "lib",
                    scratch / "src")
        tag = f"py{sys.version_info[0]}.{sys.version_info[1]}"
        vendor = root / "elkscan" / "vendor"
        for dist in third_party.values():
            _copy_installed(dist, vendor / tag)
        tags = [tag]
        # Another interpreter gets what elkscan's projects ask for, resolved by its own pip (the
        # versions installed here may not support it).
        specs = sorted({line for d in own for line in d.requires or []
                        if not _norm(line).startswith("elkscan-") and "extra ==" not in line
                        and _norm(Requirement(line).name) not in BUILD_ONLY})
        for python in pythons:
            tags.append(_vendor_other(python, specs, vendor))
        (root / "pipelines").mkdir()
        shutil.copy2(pipeline_path, root / "pipelines" / "elkeid.yaml")
        (root / "tmp").mkdir()
        version = _default_database(root / "tmp") if database else ""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        archive = out / f"scanner-{arch}-{__version__}.tar.gz"
        _tar(root, archive)
        log.info("vendored for %s; compiled dependencies: %s", ", ".join(tags), ", ".join(compiled) or "none")
        return Package(archive, sha256_file(archive), sha256_file(root / "scanner"), version)
