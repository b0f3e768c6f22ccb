"""`elkscan elkeid package`: what it prints, what the archive holds, and how it fails."""

from __future__ import annotations

import hashlib
import json
import platform
import stat
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

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
    assert members["scanner"].mode & stat.S_IXUSR and members["scanner"].uid == 0
    assert not any(name.startswith(("/", "..")) or "/../" in name or "__pycache__" in name for name in members)
    assert (unpacked / "pipelines" / "elkeid.yaml").is_file()
    vendor = unpacked / "elkscan" / "vendor" / f"py{sys.version_info[0]}.{sys.version_info[1]}"
    assert (vendor / "yaml").is_dir()
    assert not (vendor / "setuptools").exists()  # what the build needs, the scanner does not
    assert (unpacked / "elkscan" / "lib" / "elkscan_elkeid_transport" / "agent.py").is_file()
    state = json.loads((unpacked / "tmp" / "archive_db.json").read_text())
    database = unpacked / "tmp" / f"archive_db_{state['dbname']}_{state['version']}.zip"
    assert sha256(database) == state["sha256"]
    assert sorted(p.name for p in (unpacked / "tmp").iterdir()) == sorted(["archive_db.json", database.name])


def test_the_package_builds_where_the_wheel_distribution_is_not_installed(tmp_path):
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
    result = subprocess.run([python, "-m", "elkscan_core.cli", "elkeid", "package", "--no-database",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "out").glob("scanner-*.tar.gz"))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="needs a host of another architecture")
def test_a_package_for_another_architecture_is_refused_clearly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "elkeid", "package", "--arch", "aarch64",
                             "-o", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "contain compiled code for x86_64; build the aarch64 package on an aarch64 host" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_python_the_package_does_not_carry_is_explained(start_agent, plugin_dir):
    vendor = plugin_dir.workdir / "elkscan" / "vendor"
    (vendor / f"py{sys.version_info[0]}.{sys.version_info[1]}").rename(vendor / "py3.0")
    agent = start_agent()
    assert agent.process.wait(20) == 1
    assert "this package carries dependencies for py3.0, but /usr/bin/python3 is Python" in agent.stderr()
    assert "elkscan elkeid package --python /usr/bin/python3" in agent.stderr()
