"""``elkscan validate`` asks the clamav engine to check what it would use, and starts no clamd: the binary
found and trusted, the database there and trusted (a bundle verified), an existing clamd's socket there
or its TCP port allowed. Each refusal is one line and exit code 2. None of these tests needs clamd: the
pipelines name a root-owned wrapper that would leave a mark if it were ever run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from elkscan_core.bundle import build_bundle

NOBODY = 65534


def elkscan(tmp_path, *args):
    """The real command, with its temporary files kept where the test can see they are gone."""
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "elkscan_core.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TMPDIR": str(scratch)})


def validate(tmp_path, options: dict):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(json.dumps({"version": 1, "plugins": ["clamav_backend"],
                                    "engines": [{"use": "clamav", "with": options}]}))  # JSON is YAML
    return pipeline, elkscan(tmp_path, "validate", str(pipeline))


@pytest.fixture
def wrapper(tmp_path):
    """A clamd that writes ``ran`` when run: root's, so trusted; validate must never start it."""
    script = tmp_path / "bin" / "clamd"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\nexit 1\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def bundle(tmp_path, test_database):
    return Path(build_bundle(tmp_path / "bundles" / "archive_db_default_1.zip", version="1",
                             clamav=[test_database]).path)


def _refusals(tmp_path, wrapper, test_database, bundle) -> dict:
    """Each mistake or attack -> (options, the one line's reason)."""
    evil = tmp_path / "evil-clamd"
    evil.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\n")
    evil.chmod(0o755)
    os.chown(evil, NOBODY, NOBODY)
    theirs = tmp_path / "theirs-db"
    shutil.copytree(test_database, theirs)
    os.chown(theirs, NOBODY, NOBODY)
    good = shutil.copy(bundle, tmp_path / "good.zip")
    os.chown(bundle, NOBODY, NOBODY)
    missing = tmp_path / "missing-db"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "clamd.sock"))  # a socket, but no one to ask
    listening.close()
    return {
        "a missing database directory": (
            {"clamd": str(wrapper), "database": str(missing)}, f"database {missing} does not exist"),
        "a clamd binary nobody owns": (
            {"clamd": str(evil)}, f"clamd binary {evil} is owned by uid {NOBODY}"),
        "no clamd": (
            {"clamd": str(tmp_path / "no-clamd")},
            f"clamd is not installed ({tmp_path / 'no-clamd'} not found)"),
        "a database directory nobody owns": (
            {"clamd": str(wrapper), "database": str(theirs)},
            f"ClamAV database directory {theirs} is owned by uid {NOBODY}"),
        "a bundle nobody owns": (
            {"clamd": str(wrapper), "database": str(bundle)},
            f"ClamAV database {bundle} is owned by uid {NOBODY}"),
        "a bundle of another version": (
            {"clamd": str(wrapper), "database": str(good), "bundle_version": "2"},
            "holds version '1', expected '2'"),
        "no clamd socket": (
            {"socket": str(tmp_path / "clamd.ctl")}, f"no clamd socket at {tmp_path / 'clamd.ctl'}"),
        "a socket path that is a file": (
            {"socket": str(evil)}, f"{evil} is not a socket"),
        "TCP as root": ({"socket": "127.0.0.1:3310"}, "is reached over TCP, which nothing authenticates"),
        "an unknown peer user": (
            {"socket": str(tmp_path / "clamd.sock"), "peer_user": "no-such-user-here"},
            "peer_user: there is no user 'no-such-user-here'"),
    }


CASES = ["a missing database directory", "a clamd binary nobody owns", "no clamd",
         "a database directory nobody owns", "a bundle nobody owns", "a bundle of another version",
         "no clamd socket", "a socket path that is a file", "TCP as root", "an unknown peer user"]


@pytest.mark.parametrize("case", CASES)
def test_validate_refuses_what_a_scan_would_in_one_line_and_runs_nothing(tmp_path, wrapper, test_database,
                                                                          bundle, case):
    options, reason = _refusals(tmp_path, wrapper, test_database, bundle)[case]
    pipeline, out = validate(tmp_path, options)
    assert out.returncode == 2, out
    [line] = out.stderr.splitlines()
    assert line.startswith(f"elkscan: error: {pipeline}: engines[0] (clamav): ") and reason in line, line
    assert not (tmp_path / "ran").exists()
    assert os.listdir(tmp_path / "tmp") == []


def test_validate_accepts_a_good_managed_clamav_and_starts_nothing(tmp_path, wrapper, test_database, bundle):
    for database in (test_database, test_database / "test.ndb", bundle):
        pipeline, out = validate(tmp_path, {"clamd": str(wrapper), "database": str(database),
                                            "runtime_dir": str(tmp_path / "rt")})
        assert (out.returncode, out.stderr) == (0, ""), out
        assert out.stdout.startswith(f"{pipeline}: valid (0 sources, 1 engine")
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "rt").exists() and os.listdir(tmp_path / "tmp") == []  # nothing left behind


def test_the_shipped_default_pipeline_validates(tmp_path):
    out = elkscan(tmp_path, "validate", "default")
    assert out.returncode == 0, out
    assert "valid" in out.stdout
    if shutil.which("clamd", path="/usr/local/sbin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")):
        assert "clamav" not in out.stderr  # the optional engine is not skipped where clamd is installed
