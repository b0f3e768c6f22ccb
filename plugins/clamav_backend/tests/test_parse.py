"""`parse:` and `heuristics:` make a managed clamd judge as libclamav with those scan options (Elkeid's
profile: ELF and archives only, no heuristic alerts), checked against clamscan given the same options."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from elkscan_core import ConfigError
from elkscan_core.testing import run

TESTFILES = Path("/usr/share/clamav-testfiles")
ELKEID = {"parse": ["elf", "archive"], "heuristics": False}
#: clamscan's options for libclamav's parse = ELF | ARCHIVE, heuristic = 0 (Elkeid's scan options).
CLAMSCAN_ELKEID = ["--scan-pe=no", "--scan-elf=yes", "--scan-ole2=no", "--scan-pdf=no", "--scan-swf=no",
                   "--scan-html=no", "--scan-xmldocs=no", "--scan-hwp3=no", "--scan-onenote=no",
                   "--scan-archive=yes", "--scan-image=no", "--scan-mail=no", "--heuristic-alerts=no"]


def _walk(root: Path) -> dict:
    return {"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False, "exclude": []}}


def test_elkeids_scan_options_find_what_clamscan_with_them_finds(clamd_binary, test_database):
    if not TESTFILES.is_dir():
        pytest.skip("Debian package clamav-testfiles is not installed")
    clamscan = shutil.which("clamscan")
    if clamscan is None:
        pytest.skip("clamscan (Debian package clamav) is not installed")
    out = subprocess.run([clamscan, "--no-summary", "--recursive", f"--database={test_database}",
                          *CLAMSCAN_ELKEID, str(TESTFILES)], capture_output=True, text=True, check=False).stdout
    expected = {line[: -len(" FOUND")].rpartition(": ")[0] for line in out.splitlines() if line.endswith(" FOUND")}

    result = run({"plugins": ["clamav_backend"], "sources": [_walk(TESTFILES)],
                  "engines": [{"use": "clamav", "with": {"managed": True, "database": str(test_database),
                                                         **ELKEID}}]})
    assert result.summary.errors == 0, [r.error for r in result.records if r.errors]
    assert set(result.detected) == expected
    names = {Path(p).name for p in expected}
    assert {"clam.zip", "clam.tar.gz", "clam.7z", "clam.exe"} <= names  # archives unpacked, files as they are
    # no PE unpacking (packers), no PDF, OLE2, HTML or mail parsing, as in Elkeid
    assert not names & {"clam-upx.exe", "clam-aspack.exe", "clam.pdf", "clam.ole.doc", "clam.ppt",
                        "clam.exe.html", "clam.mail"}
    everything = run({"plugins": ["clamav_backend"], "sources": [_walk(TESTFILES)],
                      "engines": [{"use": "clamav", "with": {"managed": True, "database": str(test_database)}}]})
    assert {"clam-upx.exe", "clam.pdf", "clam.ole.doc"} <= {Path(p).name for p in everything.detected}


def test_the_clamd_conf_says_which_parsers_and_alerts_are_on(clamd_binary, test_database, tmp_path):
    from elkscan_core.plugins import make_plugin_manager
    from elkscan_core.pipeline import parse_pipeline
    from elkscan_core.runner import build_session

    pipeline = parse_pipeline({"version": 1, "plugins": ["clamav_backend"], "engines": [
        {"use": "clamav", "with": {"database": str(test_database), "runtime_dir": str(tmp_path), **ELKEID}}]})
    session = build_session(pipeline, make_plugin_manager(pipeline.plugins))
    (engine,) = session.engines
    engine.start()
    try:
        conf = dict(line.split(" ", 1) for line in Path(engine.daemon.config_path).read_text().splitlines())
    finally:
        engine.close()
    assert (conf["ScanELF"], conf["ScanArchive"]) == ("yes", "yes")
    assert {conf[key] for key in ("ScanPE", "ScanOLE2", "ScanPDF", "ScanHTML", "ScanMail", "ScanSWF",
                                  "ScanXMLDOCS", "ScanHWP3", "ScanImage", "ScanOneNote")} == {"no"}
    assert (conf["HeuristicAlerts"], conf["AlertBrokenExecutables"], conf["AlertExceedsMax"]) == ("no", "no", "yes")


def test_heuristics_off_still_reports_a_file_clamd_could_not_scan_whole(clamd_binary, test_database, tmp_path):
    """AlertExceedsMax is elkscan's, not a heuristic alert: a file over a limit is never called clean."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "plain.txt").write_text("x" * 3000)
    result = run({"plugins": ["clamav_backend"], "sources": [_walk(tmp_path / "files")],
                  "engines": [{"use": "clamav", "with": {"managed": True, "database": str(test_database),
                                                         "max_scan_size": "2KiB", **ELKEID}}]},
                 report_clean=True)
    (record,) = result.records
    assert (record.status, record.skipped) == ("not_scanned", "above clamav's max_scan_size")


@pytest.mark.parametrize("options,message", [
    ({"parse": ["elf", "exe"]}, "unknown file type(s) exe"),
    ({"socket": "/run/clamav/clamd.ctl", "heuristics": False}, "configure a managed clamd"),
])
def test_parse_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run({"plugins": ["clamav_backend"], "engines": [{"use": "clamav", "with": options}]})
