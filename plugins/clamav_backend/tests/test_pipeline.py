"""End to end through a real session: the clamav engine in a pipeline, on Debian's ClamAV test corpus
(compared with clamscan on the same database) and on the project's samples with the default bundle."""

from __future__ import annotations

import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from elkscan_core import ComponentError
from elkscan_core.bundle import read_sign
from elkscan_core.testing import SAMPLES, run, write_samples
from elkscan_clamav_backend.defaults import build_default_bundle

TESTFILES = Path("/usr/share/clamav-testfiles")


def _walk(root: Path) -> dict:
    return {"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False, "exclude": []}}


def test_testfiles_corpus_matches_clamscan(clamd_binary, test_database, signatures):
    if not TESTFILES.is_dir():
        pytest.skip("Debian package clamav-testfiles is not installed")
    clamscan = shutil.which("clamscan")
    if clamscan is None:
        pytest.skip("clamscan (Debian package clamav) is not installed")
    out = subprocess.run([clamscan, "--no-summary", "--recursive", f"--database={test_database}",
                          str(TESTFILES)], capture_output=True, text=True, check=False).stdout
    expected = {}
    for line in out.splitlines():
        if line.endswith(" FOUND"):
            path, _, signature = line[: -len(" FOUND")].rpartition(": ")
            expected[path] = [signature]

    result = run({"plugins": ["clamav_backend"], "sources": [_walk(TESTFILES)],
                  "engines": [{"use": "clamav", "with": {"managed": True, "database": str(test_database)}}]})

    assert result.summary.errors == 0, [r.error for r in result.records if r.errors]
    assert result.detected == expected
    # clam.exe inside archives, packers, mail and documents, all found through its MD5 alone
    assert len(expected) >= 30
    assert all(found == [signatures["clam.exe"] + ".UNOFFICIAL"] for found in expected.values())
    assert any(p.endswith(".zip") for p in expected) and any(p.endswith(".pdf") for p in expected)


def _positives(directory: Path) -> set[str]:
    return {str(directory / name) for name, (_, rule) in SAMPLES.items() if rule}


def test_default_bundle_detects_the_project_samples(clamd_binary, tmp_path):
    samples = tmp_path / "samples"
    write_samples(samples)
    report = build_default_bundle(tmp_path / "archive_db_default.zip", password="s3cret")
    result = run({"plugins": ["clamav_backend"], "sources": [_walk(samples)],
                  "engines": [{"use": "clamav", "with": {
                      "managed": True, "database": report.path, "password": "s3cret",
                      "bundle_version": report.version, "bundle_sha256": read_sign(report.sign_path)}}]})
    assert set(result.detected) == _positives(samples)
    assert result.summary.errors == 0
    (eicar_hit,) = [r for r in result.records if r.target.path.endswith("eicar.com")][0].detections
    assert (eicar_hit.types, eicar_hit.class_, eicar_hit.name) == ("Txt", "Test", "EICAR-Elkscan-1")


def test_managed_engine_without_database_uses_the_project_signatures(clamd_binary, tmp_path):
    write_samples(tmp_path)
    result = run({"plugins": ["clamav_backend"], "sources": [_walk(tmp_path)],
                  "engines": [{"use": "clamav"}]})
    assert set(result.detected) == _positives(tmp_path)


def test_damaged_bundle_stops_start_up_with_the_reason(clamd_binary, tmp_path):
    report = build_default_bundle(tmp_path / "db.zip")
    with pytest.raises(ComponentError, match="expected 'v999'"):
        run({"plugins": ["clamav_backend"], "sources": [],
             "engines": [{"use": "clamav", "with": {"database": report.path, "bundle_version": "v999"}}]})


def test_optional_engine_without_clamd_is_dropped_with_one_warning(tmp_path, caplog):
    write_samples(tmp_path)
    clamav = {"use": "clamav", "optional": True, "with": {"clamd": "/nonexistent/clamd"}}
    pipeline = {"plugins": ["clamav_backend", "yara_backend"], "sources": [_walk(tmp_path)],
                "engines": [clamav, "yara"]}
    with caplog.at_level(logging.WARNING, logger="elkscan"):
        result = run(pipeline)
    assert [e.id for e in result.session.engines] == ["yara"] and result.summary.files == len(SAMPLES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "clamav-daemon" in warnings[0] and "socket:" in warnings[0]
    with pytest.raises(ComponentError, match="clamav-daemon"):
        run({**pipeline, "engines": [{**clamav, "optional": False}]})
    # The only engine dropped: nothing would be judged, which is an error, never a clean scan.
    with pytest.raises(ComponentError, match="every engine failed to start"):
        run({**pipeline, "engines": [clamav]})


def test_db_build_default_is_the_plugins_bundle_through_its_hook(tmp_path, capsys):
    """``elkscan db build --default``: the core asks the elkscan_default_bundle hook, and this plugin
    answers with the bundle build_default_bundle makes (same version, same files)."""
    from elkscan_core.cli import main
    from elkscan_clamav_backend.defaults import default_version

    out = tmp_path / "archive_db_default.zip"
    assert main(["db", "build", "--default", str(out)]) == 0
    assert f"version {default_version()}" in capsys.readouterr().out
    assert main(["db", "verify", str(out), "--version", default_version()]) == 0
    direct = build_default_bundle(tmp_path / "direct.zip")
    with zipfile.ZipFile(out) as built, zipfile.ZipFile(direct.path) as made:
        assert sorted(built.namelist()) == sorted(made.namelist())
