"""`elkscan elkeid package`: what it prints, what the archive holds, and how it fails."""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
import platform
import stat
import subprocess
import sys
import sysconfig
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from elkscan_core import __version__


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_package_and_the_hashes_the_agent_checks(built_package):
    archive, output, unpacked = built_package.archive, built_package.output, built_package.unpacked
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    assert archive.name == f"scanner-{arch}-{__version__}.tar.gz"
    printed = dict(line.split(":", 1) for line in output.splitlines())
    assert printed["sha256"].split()[0] == sha256(archive)  # Elkeid's plugin config 'sha256'
    assert printed["signature"].split()[0] == sha256(unpacked / "scanner")  # and 'signature'
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    state = json.loads((unpacked / "tmp" / "archive_db.json").read_text())
    database = f"tmp/{state['archive']}"
    # One executable and what an operator may edit or replace: the pipeline and the rule database.
    assert sorted(members) == ["pipelines", "pipelines/elkeid.yaml", "scanner", "tmp", "tmp/archive_db.json", database]
    assert members["scanner"].mode & stat.S_IXUSR and members["scanner"].uid == 0
    assert all(m.isfile() or m.isdir() for m in members.values())  # the agent refuses links
    assert sha256(unpacked / database) == state["sha256"]


def test_scanner_needs_no_loader_and_carries_all_of_elkscan(built_package, tmp_path):
    """The signature the agent checks covers every module that runs: scanner is a static ELF (no
    PT_INTERP: nothing of the host is loaded) carrying the C libraries, the interpreter and each module
    of elkscan's projects with their entry points."""
    from elftools.elf.elffile import ELFFile
    from PyInstaller.archive.readers import CArchiveReader

    scanner = built_package.unpacked / "scanner"
    with open(scanner, "rb") as f:
        assert not [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_INTERP"]
    unpacked = tmp_path / "staticx"
    subprocess.run([sys.executable, "-m", "staticx.extract", str(scanner), str(unpacked)], check=True)
    libraries = {p.name for p in unpacked.iterdir()}
    assert {"libc.so.6", "ld-linux-x86-64.so.2" if platform.machine() == "x86_64" else "ld-linux-aarch64.so.1",
            "libgcc_s.so.1"} <= libraries  # libgcc_s: glibc loads it when a thread exits at shutdown
    program = CArchiveReader(str(unpacked / "scanner"))
    modules = set(program.open_embedded_archive("PYZ.pyz").toc)
    plugins = yaml.safe_load((built_package.unpacked / "pipelines" / "elkeid.yaml").read_text())["plugins"]
    for name in ["core", *plugins]:
        package = importlib.import_module(f"elkscan_{name}")
        expected = {package.__name__} | {m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")}
        assert expected <= modules, sorted(expected - modules)
        dist = metadata.distribution(f"elkscan-{name.replace('_', '-')}")
        assert f"elkscan_{name}-{dist.version}.dist-info/entry_points.txt" in program.toc  # what finds plugins
    assert any(name.startswith("libpython3") for name in program.toc)


def test_the_staging_builds_where_the_wheel_distribution_is_not_installed(tmp_path):
    """A pip install of elkscan has setuptools (a dependency) but maybe not ``wheel``: the build once
    failed there with ``invalid command 'bdist_wheel'``. The environment here is this one's
    site-packages without ``wheel``, seen from a fresh venv."""
    view = tmp_path / "site-packages"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name != "wheel" and not entry.name.startswith("wheel-"):
            (view / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "view.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    assert subprocess.run([python, "-c", "import wheel"], capture_output=True).returncode == 1
    stage = tmp_path / "stage"
    script = ("import sys; from importlib import metadata; from pathlib import Path; "
              "from elkscan_elkeid_transport.package import stage_projects; "
              "stage_projects([metadata.distribution(n) for n in ('elkscan-core', 'elkscan-elkeid-transport')], "
              "Path(sys.argv[1]), Path(sys.argv[2]))")
    result = subprocess.run([python, "-c", script, str(stage), str(tmp_path / "src")], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (stage / "elkscan_elkeid_transport" / "frozen.py").is_file()
    assert (stage / "elkscan_core" / "pipelines" / "elkeid.yaml").is_file()
    assert list(stage.glob("elkscan_core-*.dist-info/entry_points.txt"))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="needs a host of another architecture")
def test_a_package_for_another_architecture_is_refused_clearly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "elkeid", "package", "--arch", "aarch64",
                             "-o", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "carries this machine's Python and C libraries (x86_64); build the aarch64 package on an aarch64 host" \
        in result.stderr
    assert list(tmp_path.iterdir()) == []
