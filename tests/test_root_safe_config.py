"""Root-safe configuration (issue 10 part 3): where the state lives, and what a pipeline may name."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from elkscan_core.bundle import DEFAULT_PASSWORD, BundleError, build_bundle, open_bundle
from elkscan_core.pipeline import parse_pipeline
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.runner import build_session
from elkscan_core.testing import write_samples


def test_without_home_state_is_never_the_working_directory(tmp_path, monkeypatch):
    for name in ("HOME", "XDG_CACHE_HOME", "ELKSCAN_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # audit C11: a working directory another user could fill
    session = build_session(parse_pipeline({"version": 1}), make_plugin_manager(()))
    expected = ("/var/lib/elkscan" if os.geteuid() == 0
                else os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache", "elkscan"))
    assert session.state_dir == expected


NOBODY = 65534


def _elkscan(*args):
    return subprocess.run([sys.executable, "-m", "elkscan_core.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_a_pipeline_another_user_owns_is_refused_and_runs_nothing(tmp_path):
    """Audit A21: nobody's pipeline in a 0777 directory names nobody's script as clamd."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    marker = tmp_path / "pwned.txt"
    evil = shared / "evil.sh"
    evil.write_text(f"#!/bin/sh\nid > {marker}\n")
    os.chmod(evil, 0o755)
    pipeline = shared / "pipeline.yaml"
    pipeline.write_text("version: 1\nplugins: [clamav_backend]\n"
                        f"engines: [{{use: clamav, optional: true, with: {{clamd: {evil}}}}}]\n")
    for path in (evil, pipeline):
        os.chown(path, NOBODY, NOBODY)
    write_samples(tmp_path / "samples")
    out = _elkscan("scan", "-p", str(pipeline), str(tmp_path / "samples"))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"elkscan: error: pipeline {shared} (above {pipeline}) is world-writable (mode 0777); another user "
        f"could change what elkscan trusts: make it owned by root and writable only by its owner "
        f"(chown root {shared}; chmod go-w {shared})"]
    assert not marker.exists()
    assert _elkscan("validate", str(pipeline)).returncode == 2


@pytest.mark.parametrize("problem", ["world-writable file", "world-writable directory"])
def test_a_pipeline_others_can_write_is_refused(tmp_path, problem):
    """Audit A20: root's own pipeline, but anyone can rewrite it (or replace it in its directory)."""
    folder = tmp_path / "conf"
    folder.mkdir()
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text("version: 1\nplugins: [yara_backend]\nengines: [yara]\n")
    os.chmod(pipeline if problem == "world-writable file" else folder, 0o666 if "file" in problem else 0o777)
    out = _elkscan("validate", str(pipeline))
    assert out.returncode == 2 and "is world-writable" in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.fixture
def bundle(tmp_path):
    """A bundle built by root, with its .sign, in a private directory."""
    rules = tmp_path / "sigs"
    rules.mkdir()
    (rules / "daily.ndb").write_text("Unix.Trojan.Keep-1:0:*:6b656570\n")
    return build_bundle(tmp_path / "out" / "archive_db_default_1.zip", version="1", clamav=[rules])


@pytest.mark.parametrize("planted", ["bundle", "sign"])
def test_db_verify_refuses_a_bundle_or_sign_another_user_owns(bundle, planted):
    """nobody replaces the zip, or the .sign it is checked against, with their own."""
    os.chown(bundle.path if planted == "bundle" else bundle.sign_path, NOBODY, NOBODY)
    out = _elkscan("db", "verify", str(bundle.path))
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    what = "rule bundle" if planted == "bundle" else "bundle signature"
    assert f"{what} {bundle.path if planted == 'bundle' else bundle.sign_path} is owned by uid {NOBODY}" in line


def test_a_bundle_in_a_directory_others_can_write_is_refused_wherever_it_is_opened(bundle, tmp_path):
    os.chmod(os.path.dirname(bundle.path), 0o777)
    with pytest.raises(BundleError, match=r"rule bundle .* is world-writable"):
        open_bundle(bundle.path, password=DEFAULT_PASSWORD, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_db_build_refuses_inputs_another_user_owns(tmp_path):
    sigs = tmp_path / "sigs"
    sigs.mkdir()
    (sigs / "daily.ndb").write_text("Unix.Trojan.Theirs-1:0:*:6b656570\n")
    os.chown(sigs / "daily.ndb", NOBODY, NOBODY)
    out = _elkscan("db", "build", str(tmp_path / "b.zip"), "--version", "1", "--clamav", str(sigs))
    assert out.returncode == 2 and f"bundle input {sigs / 'daily.ndb'} is owned by uid {NOBODY}" in out.stderr
    assert not (tmp_path / "b.zip").exists()
