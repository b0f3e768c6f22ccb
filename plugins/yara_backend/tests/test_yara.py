"""The yara engine with real yara-python: default rules, a production-shaped rule set, errors, cache,
reload."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from elkscan_core import ComponentError, ConfigError
from elkscan_core.testing import SAMPLES, run, write_samples
from elkscan_yara_backend import ruleset

GEN_RULES = Path(__file__).resolve().parents[3] / "bench" / "gen_rules.py"


def generated_rules(directory, count=400):
    """The benchmarks' generated rule set (bench/gen_rules.py): shaped like Elastic's Linux rules."""
    spec = importlib.util.spec_from_file_location("gen_rules", GEN_RULES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate(directory, count)


def scan(path, state, **options):
    return run({"plugins": ["yara_backend"], "state_dir": str(state),
                "sources": [{"use": "dirscan", "with": {"roots": {str(path): -1}, "type_filter": False}}],
                "engines": [{"use": "yara", "with": options}]})


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_default_rule_detects_its_sample_and_not_its_lookalike(tmp_path, name):
    content, rule = SAMPLES[name]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / name).write_bytes(content)
    result = scan(tmp_path / "files", tmp_path / "state")
    assert result.detected == ({str(tmp_path / "files" / name): [rule]} if rule else {})


def test_every_default_rule_has_a_sample_and_a_description():
    import yara

    rules = yara.compile(filepaths={p: p for p in ruleset.builtin_rules()},
                         externals=dict.fromkeys(ruleset.EXTERNALS, ""))
    names = {r.identifier: r.meta for r in rules}
    assert set(names) == {rule for _, rule in SAMPLES.values() if rule}
    assert all(meta.get("description") for meta in names.values())


def test_hit_data_is_elkeid_formatted_and_capped(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "rules.yar").write_text('rule Txt_Test_Many { strings: $a = "ab" condition: $a }')
    (tmp_path / "f" / "many.txt").write_bytes(b"ab" * 100)
    result = scan(tmp_path / "f", tmp_path / "state", rules=[str(tmp_path / "rules.yar")], max_strings=3)
    (record,) = result.records
    assert record.detections[0].hit_data == ("$a,0,2", "$a,2,2", "$a,4,2")
    assert (record.detections[0].types, record.detections[0].class_) == ("Txt", "Test")


def test_rules_may_use_loki_external_variables(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "ext.yar").write_text(
        'rule Ext_Name_Match { condition: filename == "x.php" and extension == "php" and owner == "root"'
        ' and filepath endswith "/f/x.php" }')
    (tmp_path / "f" / "x.php").write_text("<?php ?>")
    (tmp_path / "f" / "y.php").write_text("<?php ?>")
    result = scan(tmp_path / "f", tmp_path / "state", rules=[str(tmp_path / "ext.yar")])
    assert result.session.engines[0].compiled.externals == {"filename", "extension", "owner", "filepath"}
    if os.geteuid() != 0:
        pytest.skip("owner is root only when the test runs as root")
    assert list(result.detected) == [str(tmp_path / "f" / "x.php")]


def test_generated_rules_have_the_shapes_of_a_production_set(tmp_path):
    text = "\n".join(p.read_text() for p in generated_rules(tmp_path / "rules"))
    assert len(re.findall(r"^rule Linux_[A-Z][a-z]+_[A-Z][a-z0-9]+_[0-9a-f]{8} \{$", text, re.M)) == 400
    for shape in (r"\?\?", r" [0-9A-F]\? ", r"\[\d-\d+\]", r"\( [0-9A-F]{2} [0-9A-F]{2} \| ",  # hex
                  r'" nocase$', r'" wide ascii$', r'" fullword$', r"= /.+/( nocase)?$",  # text, regex
                  r"uint16\(0\) == 0x457f", r"uint32\(0\) == 0x464c457f", r"filesize < \d+MB",
                  r"any of \(\$", r"\b2 of ", r"\$sh in \(0\.\.64\)", r"^        all of them$"):
        assert re.search(shape, text, re.M), f"no rule has the shape {shape}"


def test_production_shaped_rule_set_compiles_unchanged_and_scans(tmp_path):
    files = generated_rules(tmp_path / "rules")
    assert any('"filepath' in p.read_text() for p in files)  # as in Elastic's set: a string, not a use
    compiled = ruleset.load([str(tmp_path / "rules")], cache_dir=None)
    assert compiled.count == 400 and len(compiled.files) == len(files)
    assert compiled.externals == frozenset()  # so no per-file cost for external variables
    rules = re.findall(r"^rule (\S+) \{\n(.*?)^\}", files[0].read_text(), re.M | re.S)
    name, hexa = next((name, only[1]) for name, body in rules  # a rule of one plain hex string
                      if (only := re.search(r"strings:\n\s+\$a = \{ ([0-9A-F ]+) \}\n\s+condition:", body)))
    write_samples(tmp_path / "f")
    (tmp_path / "f" / "carrier.bin").write_bytes(b"\0" * 100 + bytes.fromhex(hexa) + b"\0" * 100)
    result = scan(tmp_path / "f", tmp_path / "state", rules=["builtin", str(tmp_path / "rules")])
    assert result.detected[str(tmp_path / "f" / "carrier.bin")] == [name]
    assert (result.summary.detections, result.summary.errors) == (9, 0)


def test_broken_rule_file_names_file_and_line(tmp_path):
    (tmp_path / "f").mkdir()
    bad = tmp_path / "bad.yar"
    bad.write_text("rule ok { condition: true }\nrule broken {\n condition: $nope\n}\n")
    with pytest.raises(ComponentError, match=rf"{bad}, line \d+: undefined string \"\$nope\""):
        scan(tmp_path / "f", tmp_path / "state", rules=[str(bad)])


def test_broken_rule_files_can_be_skipped(tmp_path, caplog):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "eicar.com").write_bytes(SAMPLES["eicar.com"][0])
    (tmp_path / "bad.yar").write_text("rule broken { condition: $nope }")
    result = scan(tmp_path / "f", tmp_path / "state", rules=["builtin", str(tmp_path / "bad.yar")],
                  on_error="skip")
    assert list(result.detected.values()) == [["Multios_TestFile_Eicar"]]
    assert "skipping rule file that does not compile" in caplog.text


def test_rules_naming_nothing_is_an_error(tmp_path):
    with pytest.raises(ComponentError, match="names no rule file"):
        scan(tmp_path, tmp_path / "state", rules=[str(tmp_path / "*.yar")])


def test_unknown_option_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"engines\[0\]\.with"):
        scan(tmp_path, tmp_path / "state", rulez=["x"])


def test_compiled_rules_are_cached_by_digest(tmp_path):
    write_samples(tmp_path / "f")
    scan(tmp_path / "f", tmp_path / "state")
    cached = list((tmp_path / "state" / "yara-rules").glob("*.yarc"))
    assert len(cached) == 1
    cached[0].write_bytes(b"corrupt")  # a damaged cache is recompiled, not fatal
    assert scan(tmp_path / "f", tmp_path / "state").summary.detections == 8


def test_reload_adds_a_bundles_rules_without_restart(tmp_path):
    write_samples(tmp_path / "f")
    result = scan(tmp_path / "f", tmp_path / "state")
    engine = result.session.engines[0]
    before = engine.version()
    extra = tmp_path / "online_1.yar"
    extra.write_text('rule Txt_Test_Lookalike { strings: $a = "eicar.org" condition: $a }')
    engine.reload({"yara": [str(extra)], "clamav": ["ignored.ndb"]})
    assert engine.version() != before
    assert engine.compiled.count == 9


@pytest.mark.parametrize("rules, error", [("bad.yar", r"bad.yar, line \d+: syntax error"),
                                          ("missing/", r"'missing/' names no rule file")])
def test_validate_compiles_the_rules_so_what_it_accepts_scan_runs(tmp_path, rules, error):
    """The ux audit: validate said "valid" for a rule file that does not compile, or a missing rules dir."""
    (tmp_path / "bad.yar").write_text("rule broken { condition: ")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"version: 1\nplugins: [yara_backend]\nengines: [{{use: yara, with: {{rules: [{rules}]}}}}]\n")
    out = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "validate", str(pipeline)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert re.search(rf"p.yaml: engines\[0\] \(yara\): .*{error}", line), line


def test_validate_warns_about_an_optional_engine_that_start_would_skip(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nplugins: [yara_backend]\n"
                        "engines: [{use: yara, optional: true, with: {rules: [missing/]}}]\n")
    out = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "validate", str(pipeline)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "valid" in out.stdout
    assert "engines[0] (yara) is optional and would be skipped: rules: 'missing/' names no rule file" in out.stderr


def test_relative_paths_start_at_the_pipeline_directory_not_the_working_directory(tmp_path, monkeypatch):
    """Audit A23's class: a relative path in with: must not depend on where elkscan was started."""
    conf = tmp_path / "conf"
    (conf / "rules").mkdir(parents=True)
    (conf / "rules" / "eicar.yar").write_text('rule Txt_Test_Rel { strings: $a = "EICAR" condition: $a }')
    write_samples(tmp_path / "f")
    monkeypatch.chdir(tmp_path / "f")
    result = run({"plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
                  "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path / "f"): -1}}}],
                  "engines": [{"use": "yara", "with": {"rules": ["rules/"], "cache_dir": "cache"}}]},
                 base_dir=str(conf))
    assert "Txt_Test_Rel" in {rule for rules in result.detected.values() for rule in rules}
    assert list((conf / "cache").glob("*.yarc"))


def test_an_included_rule_file_is_part_of_the_rule_sets_identity(tmp_path):
    """Editing a file that another includes must not leave the old compiled rules (or the verdicts
    cached under them) in use; its external variables count too; and it is trust-checked."""
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.php").write_text("<?php marker_one ?>")
    (tmp_path / "inc").mkdir()
    included = tmp_path / "inc" / "part.yar"
    included.write_text('rule Part_Test_One { strings: $a = "marker_one" condition: $a }')
    (tmp_path / "main.yar").write_text('include "inc/part.yar"\n')
    state = tmp_path / "state"
    first = scan(tmp_path / "f", state, rules=[str(tmp_path / "main.yar")])
    assert [d.signature for r in first.records for d in r.detections] == ["Part_Test_One"]
    included.write_text('rule Part_Test_Two { strings: $a = "marker_one" condition: $a and extension == "php" }')
    second = scan(tmp_path / "f", state, rules=[str(tmp_path / "main.yar")])
    assert [d.signature for r in second.records for d in r.detections] == ["Part_Test_Two"]
    assert second.session.engines[0].compiled.externals == {"extension"}
    assert second.session.engines[0].compiled.digest != first.session.engines[0].compiled.digest
    os.chown(included, 65534, 65534)
    with pytest.raises(ComponentError, match="included rule file .*part.yar is owned by uid 65534"):
        scan(tmp_path / "f", state, rules=[str(tmp_path / "main.yar")])


def test_external_variables_are_found_past_a_brace_in_a_condition(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.php").write_text("<?php ?>")
    (tmp_path / "r.yar").write_text(
        'rule Brace_Test_Ext {\n  meta: note = "filepath is not used here"\n'
        '  condition: filesize > 0 /* } */ and extension == "php"\n}\n')
    result = scan(tmp_path / "f", tmp_path / "state", rules=[str(tmp_path / "r.yar")])
    assert result.session.engines[0].compiled.externals == {"extension"}
    assert list(result.detected) == [str(tmp_path / "f" / "x.php")]


def test_a_large_file_is_judged_whole_through_the_trimmed_mapping(tmp_path):
    """Files of 256 KiB (READ_BELOW) and more are scanned from a mapping whose pages are handed back while yara reads
    it (elkscan_core.mapping): a rule that needs the first bytes, the last ones and the size still sees
    them all, as does one that only matches in a file under the threshold."""
    from elkscan_core.mapping import READ_BELOW

    (tmp_path / "f").mkdir()
    size = 3 * READ_BELOW + 12345
    body = bytearray(os.urandom(size))
    body[:4] = b"\x7fELF"
    body[-16:] = b"TAIL-MARKER-0001"
    (tmp_path / "f" / "large.bin").write_bytes(bytes(body))
    (tmp_path / "f" / "small.bin").write_bytes(b"\x7fELF" + b"\0" * 100 + b"TAIL-MARKER-0001")
    (tmp_path / "f" / "large-no-tail.bin").write_bytes(bytes(body[:-16]))
    (tmp_path / "rules.yar").write_text(
        'rule Elf_Test_Whole { strings: $t = "TAIL-MARKER-0001" '
        f'condition: uint32(0) == 0x464c457f and $t at filesize - 16 and filesize > {READ_BELOW} }}\n'
        'rule Elf_Test_Tail { strings: $t = "TAIL-MARKER-0001" condition: $t and uint32(0) == 0x464c457f }\n')
    result = scan(tmp_path / "f", tmp_path / "state", rules=[str(tmp_path / "rules.yar")])
    assert result.detected == {str(tmp_path / "f" / "large.bin"): ["Elf_Test_Whole", "Elf_Test_Tail"],
                               str(tmp_path / "f" / "small.bin"): ["Elf_Test_Tail"]}


RSS_OF_A_LARGE_SCAN = """
import os, sys
from elkscan_core.testing import run
path, rules = sys.argv[1], sys.argv[2]
def high_water_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
run({"plugins": ["yara_backend"], "state_dir": sys.argv[3], "sources": [{"use": "dirscan", "with":
     {"roots": {os.path.dirname(path) + "/small": -1}, "type_filter": False}}],
     "engines": [{"use": "yara", "with": {"rules": [rules]}}]})
before = high_water_mb()  # everything imported and started once: what is left is the large file
result = run({"plugins": ["yara_backend"], "state_dir": sys.argv[3], "sources": [{"use": "dirscan", "with":
              {"roots": {path: -1}, "type_filter": False, "max_size": 1 << 30}}],
              "engines": [{"use": "yara", "with": {"rules": [rules], "max_file_size": 1 << 30}}]})
assert result.summary.files == 1 and result.summary.clean == 1, result.summary
print(high_water_mb() - before)
"""


def test_scanning_a_large_file_does_not_keep_it_resident(tmp_path):
    """A 96 MiB file scanned whole raises the process's high-water mark by far less than its size
    (libyara mapping it itself: by all of it)."""
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a").write_bytes(b"small")
    large = tmp_path / "large.bin"
    with open(large, "wb") as out:
        for _ in range(96):
            out.write(os.urandom(1 << 20))
    (tmp_path / "rules.yar").write_text('rule Never_Test_Match { strings: $a = "elkscan-never-there" '
                                        'condition: $a }')
    done = subprocess.run([sys.executable, "-c", RSS_OF_A_LARGE_SCAN, str(large), str(tmp_path / "rules.yar"),
                           str(tmp_path / "state")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) < 48
