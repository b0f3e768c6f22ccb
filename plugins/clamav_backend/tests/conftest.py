"""Fixtures: a small ClamAV test database written at test time, and real clamav engines (each a private
clamd, started and stopped by the fixture). Never the system's freshclam database: it needs over 1 GB
and minutes to load."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from elkscan_core import Target
from elkscan_core.components import Subject
from elkscan_core.pipeline import parse_pipeline
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.runner import build_session
from elkscan_core.testing import eicar

CLAMD = "/usr/sbin/clamd"
TESTFILES = Path("/usr/share/clamav-testfiles")

#: Marker strings, split so this file itself matches none of the test signatures.
LOGICAL_A, LOGICAL_B = "elkscan-logical-" + "alpha", "elkscan-logical-" + "bravo"
YARA_MARKER = "elkscan-yara-" + "marker"
HASH_SAMPLE = b"a file known only by its MD5 " + b"(elkscan test)\n"

SIGNATURES = {
    "eicar": "Txt.Test.EicarBody-1",
    "logical": "Unix.Test.LogicalPair-1",
    "md5": "Unix.Test.HashSample-1",
    "yara": "YARA.Unix_Test_YaraMarker",
    "clam.exe": "Win.Test.ClamExe-1",
}


def samples() -> dict[str, bytes]:
    """Files the test database detects (by signature key) and look-alikes it must not."""
    return {
        "eicar": eicar(),
        "logical": f"first {LOGICAL_A} then {LOGICAL_B}\n".encode(),
        "logical-lookalike": f"only {LOGICAL_A} here\n".encode(),
        "md5": HASH_SAMPLE,
        "md5-lookalike": HASH_SAMPLE + b"!",
        "yara": f"x {YARA_MARKER} y\n".encode(),
    }


def write_test_database(directory: Path) -> Path:
    """An EICAR body signature, a logical signature, MD5 signatures (a sample, Debian's clam.exe) and a
    YARA rule, in the formats clamd loads."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "test.ndb").write_text(f"{SIGNATURES['eicar']}:0:0:{eicar().hex()}\n")
    (directory / "test.ldb").write_text(
        f"{SIGNATURES['logical']};Engine:51-255,Target:0;0&1;{LOGICAL_A.encode().hex()};"
        f"{LOGICAL_B.encode().hex()}\n")
    hashes = [f"{hashlib.md5(HASH_SAMPLE).hexdigest()}:{len(HASH_SAMPLE)}:{SIGNATURES['md5']}"]
    clam_exe = TESTFILES / "clam.exe"
    if clam_exe.exists():
        data = clam_exe.read_bytes()
        hashes.append(f"{hashlib.md5(data).hexdigest()}:{len(data)}:{SIGNATURES['clam.exe']}")
    (directory / "test.hdb").write_text("\n".join(hashes) + "\n")
    rule = SIGNATURES["yara"].removeprefix("YARA.")
    (directory / "test.yar").write_text(f'rule {rule}\n{{\n  strings: $a = "{YARA_MARKER}"\n'
                                        "  condition: $a\n}\n")
    return directory


@pytest.fixture(scope="session")
def clamd_binary() -> str:
    if not (os.path.isfile(CLAMD) or shutil.which("clamd")):
        pytest.skip("clamd is not installed (Debian package clamav-daemon): the clamav engine needs it")
    return CLAMD if os.path.isfile(CLAMD) else shutil.which("clamd")


@pytest.fixture(scope="session")
def test_database(tmp_path_factory) -> Path:
    return write_test_database(tmp_path_factory.mktemp("clamdb"))


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("samples")
    written = {}
    for name, content in samples().items():
        (directory / name).write_bytes(content)
        written[name] = directory / name
    return written


def make_engine(options: dict, base_dir: str = "."):
    """A clamav engine built the way a session builds it (real plugin loading), not yet started."""
    pipeline = parse_pipeline({"version": 1, "plugins": ["clamav_backend"],
                               "engines": [{"use": "clamav", "with": options}]}, "<test>", base_dir)
    session = build_session(pipeline, make_plugin_manager(pipeline.plugins))
    return session.engines[0]


@pytest.fixture(scope="session")
def new_engine():
    """new_engine(options): an engine as make_engine builds it, for tests whose start() must fail."""
    return make_engine


@pytest.fixture
def engine_factory(clamd_binary):
    """engine_factory(options) -> a started clamav engine; every one is closed after the test."""
    engines = []

    def create(options: dict, start: bool = True):
        engine = make_engine(options)
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield create
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def managed_engine(clamd_binary, test_database):
    """One managed clamd with the test database, shared by a module's read-only tests."""
    engine = make_engine({"managed": True, "database": str(test_database)})
    engine.start()
    yield engine
    engine.close()


def _scan(engine, path: Path, detections: bool = False) -> list:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        subject = Subject(Target(str(path)), fd, os.fstat(fd))
        found = engine.scan(subject)
        return list(found) if detections else [d.signature for d in found]
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def scan():
    """scan(engine, path, detections=False): scan one file as the runner does (opened once, by
    descriptor); the signatures found, or the Detection objects."""
    return _scan


@pytest.fixture(scope="session")
def signatures() -> dict[str, str]:
    return dict(SIGNATURES)
