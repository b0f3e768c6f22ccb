"""The ``hashlist`` engine and ``hashes`` enricher in real sessions (elkscan_core.testing.run)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import xxhash

from elkscan_core import ComponentError, ConfigError, Subject, Target
from elkscan_core.testing import run


def pipeline(root, engine_options, enricher_options=None):
    return {
        "plugins": ["hash_extractor"],
        "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "exclude": [],
                                                 "type_filter": False}}],
        "engines": [{"use": "hashlist", "with": engine_options}],
        "enrichers": [{"use": "hashes", "with": enricher_options or {}}],
    }


@pytest.fixture
def corpus(tmp_path):
    """Three files to find by three kinds of hash, one clean file; lists outside the scanned tree."""
    root = tmp_path / "scan"
    root.mkdir()
    files = {name: root / name for name in ("by-md5.bin", "by-sha1.bin", "by-sha256.sh", "clean.txt")}
    for number, path in enumerate(files.values()):
        path.write_bytes(f"sample {number}\n".encode() * (number + 3))
    lists = tmp_path / "lists"
    lists.mkdir()
    data = {name: path.read_bytes() for name, path in files.items()}
    (lists / "local.hashes").write_text(
        f"md5:{hashlib.md5(data['by-md5.bin']).hexdigest()}:{len(data['by-md5.bin'])}:Unix.Trojan.ByMd5-1\n"
        f"sha256:{hashlib.sha256(data['by-sha256.sh']).hexdigest()}:*:Txt.Malware.BySha256-2\n")
    (lists / "extra.hsb").write_text(
        f"{hashlib.sha1(data['by-sha1.bin']).hexdigest()}:{len(data['by-sha1.bin'])}"
        ":Win.Trojan.BySha1-3:73\n")
    return root, lists, files


def test_listed_files_are_detected_with_elkeid_names_and_full_facts(corpus):
    root, lists, files = corpus
    result = run(pipeline(root, {"files": [str(lists / "local.hashes"), str(lists / "*.hsb")]}))
    assert result.detected == {str(files["by-md5.bin"]): ["Unix.Trojan.ByMd5-1"],
                               str(files["by-sha1.bin"]): ["Win.Trojan.BySha1-3"],
                               str(files["by-sha256.sh"]): ["Txt.Malware.BySha256-2"]}
    record = next(r for r in result.records if r.target.path == str(files["by-md5.bin"]))
    detection = record.detections[0]
    assert (detection.engine, detection.types, detection.class_, detection.name) == (
        "hashlist", "Unix", "Trojan", "ByMd5-1")
    content = files["by-md5.bin"].read_bytes()
    st = os.stat(files["by-md5.bin"])
    assert record.facts == {
        "exe_size": len(content),
        "exe_hash": xxhash.xxh64(len(content).to_bytes(8, "little") + content).hexdigest(),
        "md5_hash": hashlib.md5(content).hexdigest(),
        "create_at": record.facts["create_at"],
        "modify_at": int(st.st_mtime),
    }
    assert result.summary.errors == 0


def test_when_all_gives_facts_for_clean_files_and_hits_does_not(corpus):
    root, lists, files = corpus
    options = {"files": [str(lists / "local.hashes")]}
    paced = {"when": "all", "sha256": True, "pace": "1ms", "chunk": "4KiB"}
    every = run(pipeline(root, options, paced), report_clean=True)
    clean = next(r for r in every.records if r.target.path == str(files["clean.txt"]))
    assert not clean.detections
    assert clean.facts["sha256"] == hashlib.sha256(files["clean.txt"].read_bytes()).hexdigest()
    hits_only = run(pipeline(root, options), report_clean=True)
    clean = next(r for r in hits_only.records if r.target.path == str(files["clean.txt"]))
    assert clean.facts == {}


def test_lists_are_found_relative_to_the_pipeline_and_bad_lines_are_reported(corpus):
    root, lists, files = corpus
    with open(lists / "local.hashes", "a") as out:
        out.write("md5:not-a-digest:12:Broken\n")
    result = run(pipeline(root, {"files": ["lists/*.hashes"]}), base_dir=str(lists.parent))
    assert result.detected == {str(files["by-md5.bin"]): ["Unix.Trojan.ByMd5-1"],
                               str(files["by-sha256.sh"]): ["Txt.Malware.BySha256-2"]}
    assert result.summary.errors == 1  # the malformed line, reported once, and the scan went on


@pytest.mark.parametrize("files, message", [
    (["nowhere/*.hdb"], r"files\[0\] 'nowhere/\*.hdb' matches no file"),
    (["missing.hdb"], "cannot read hash list .*missing.hdb"),
])
def test_lists_that_cannot_be_loaded_stop_start_up(corpus, files, message):
    root, lists, _ = corpus
    with pytest.raises(ComponentError, match=message):
        run(pipeline(root, {"files": files}), base_dir=str(lists))


def test_bad_options_are_config_errors(corpus):
    root, lists, _ = corpus
    with pytest.raises(ConfigError, match="when"):
        run(pipeline(root, {}, {"when": "sometimes"}))
    with pytest.raises(ConfigError, match="filez"):
        run(pipeline(root, {"filez": []}))


def scan_with(engine, path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return [d.signature for d in engine.scan(Subject(Target(str(path)), fd, os.fstat(fd)))]
    finally:
        os.close(fd)


def test_reload_takes_a_bundles_lists_and_keeps_the_old_ones_on_error(corpus, tmp_path):
    root, lists, files = corpus
    result = run(pipeline(root, {"files": [str(lists / "local.hashes")]}))
    engine = result.session.find("engine", "hashlist")
    clean = files["clean.txt"]
    assert scan_with(engine, clean) == []
    version = engine.version()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "main.hdb").write_text(f"{hashlib.md5(clean.read_bytes()).hexdigest()}:"
                                     f"{clean.stat().st_size}:Unix.Trojan.FromBundle-4\n")
    (bundle / "main.ldb").write_text("not a hash list: the clamav engine's\n")
    engine.reload({"clamav": [str(bundle / "main.hdb"), str(bundle / "main.ldb")], "yara": ["x.yar"]})
    assert scan_with(engine, clean) == ["Unix.Trojan.FromBundle-4"]
    assert scan_with(engine, files["by-md5.bin"]) == ["Unix.Trojan.ByMd5-1"]  # pipeline lists stay
    assert engine.version() != version
    (bundle / "broken.hashes").write_text("garbage\n")
    with pytest.raises(ValueError, match="broken.hashes holds no valid hash signature"):
        engine.reload({"hashes": [str(bundle / "broken.hashes")]})
    assert scan_with(engine, clean) == ["Unix.Trojan.FromBundle-4"]


def test_a_file_listed_in_a_rule_bundle_is_detected_after_reload(corpus, tmp_path):
    """ClamAV hash databases -> ``build_bundle`` (main.hashes) -> ``open_bundle`` -> ``reload``."""
    from elkscan_core.bundle import build_bundle, open_bundle

    root, lists, files = corpus
    target = files["clean.txt"]
    content = target.read_bytes()
    sources = tmp_path / "clamav"
    sources.mkdir()
    (sources / "daily.hdb").write_text(
        f"{hashlib.md5(content).hexdigest()}:{len(content)}:Unix.Trojan.Hdb-5:73\n")
    (sources / "daily.hsb").write_text(f"{hashlib.sha256(content).hexdigest()}:*:Unix.Malware.Hsb-6\n")
    build_bundle(tmp_path / "bundle.zip", version="7", clamav=[sources])
    bundle = open_bundle(tmp_path / "bundle.zip", password="clamav_default_passwd", version="7",
                         dest=tmp_path / "extracted")
    assert [os.path.basename(p) for p in bundle.rules["hashes"]] == ["main.hashes"]
    engine = run(pipeline(root, {})).session.find("engine", "hashlist")
    assert scan_with(engine, target) == []
    engine.reload(bundle.rules)
    assert sorted(scan_with(engine, target)) == ["Unix.Malware.Hsb-6", "Unix.Trojan.Hdb-5"]


def test_a_missing_xxhash_is_named_with_the_fix(corpus, monkeypatch):
    root, _, _ = corpus
    monkeypatch.setitem(sys.modules, "xxhash", None)  # what an absent package looks like
    with pytest.raises(ComponentError, match=r"'xxhash' is missing .*pip install xxhash"):
        run(pipeline(root, {}))


NOBODY = 65534


@pytest.mark.parametrize("forged", ["a list nobody owns", "a list in a directory nobody can write"])
def test_a_hash_list_another_user_could_write_is_refused(corpus, forged):
    """nobody writes a list that root reads: every file on the host could be called malware (or the
    list made huge). The engine refuses it at start and in validate with one line; optional: true
    drops it."""
    root, lists, files = corpus
    listed = lists / "local.hashes"
    clean = files["clean.txt"].read_bytes()
    with open(listed, "a") as out:  # what nobody adds: a false alarm on a clean file
        out.write(f"md5:{hashlib.md5(clean).hexdigest()}:{len(clean)}:Unix.Trojan.FalseAlarm-9\n")
    if forged == "a list nobody owns":
        os.chown(listed, NOBODY, NOBODY)
        problem = f"hash list {listed} is owned by uid {NOBODY}"
    else:
        os.chmod(lists, 0o777)
        problem = f"hash list {lists} (above {listed}) is world-writable (mode 0777)"
    spec = pipeline(root, {"files": [str(lists / "*.hashes")]})
    with pytest.raises(ComponentError, match=re.escape(problem)):
        run(spec)
    config = lists.parent / "pipeline.yaml"
    config.write_text(json.dumps({"version": 1, **spec}))  # JSON is YAML
    out = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "validate", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and problem in out.stderr
    trusted = str(shutil.copy(lists / "extra.hsb", lists.parent / "extra.hsb"))
    spec["engines"] = [{**spec["engines"][0], "optional": True},
                       {"use": "hashlist", "with": {"files": [trusted]}}]
    result = run(spec, report_clean=True)
    assert len(result.session.engines) == 1  # the other list's engine
    assert result.detected == {str(files["by-sha1.bin"]): ["Win.Trojan.BySha1-3"]}  # and no false alarm
