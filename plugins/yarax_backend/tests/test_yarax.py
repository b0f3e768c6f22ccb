"""The yarax engine with real yara-x in real worker processes: the builtin rules, detections shaped as
the yara engine's, clean files, the compatibility report, timeouts, trust, reload."""

import logging
import os
import signal

import pytest

from elkscan_core import ComponentError, Detection, hookimpl
from elkscan_core.testing import SAMPLES, run
from elkscan_yarax_backend.engine import YaraXEngine


def scan(path, engine="yarax", workers=2, extra_plugins=(), report_clean=True, **options):
    return run({"plugins": ["yara_backend", "yarax_backend"],
                "sources": [{"use": "dirscan", "with": {"roots": {str(path): -1}, "type_filter": False}}],
                "engines": [{"use": engine, "with": options}], "limits": {"workers": workers}},
               extra_plugins=extra_plugins, report_clean=report_clean)


@pytest.fixture
def samples(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    for name, (content, _) in SAMPLES.items():
        (folder / name).write_bytes(content)
    return folder


def test_the_builtin_rules_detect_their_samples_and_not_the_lookalikes(samples):
    result = scan(samples)
    expected = {str(samples / name): [rule] for name, (_, rule) in SAMPLES.items() if rule}
    assert result.detected == expected
    clean = {r.target.path for r in result.records if r.status == "clean"}
    assert clean == {str(samples / name) for name, (_, rule) in SAMPLES.items() if rule is None}
    assert all(r.judged_by == ("yarax",) for r in result.records)
    assert result.session._pools  # judged in worker processes


def test_detections_have_the_yara_engines_shape(samples):
    """Signature, Elkeid's types/class/name, hit_data and meta as the yara engine gives them."""
    by_engine = {}
    for engine in ("yara", "yarax"):
        result = scan(samples, engine=engine)
        by_engine[engine] = {r.target.path: r.detections for r in result.records if r.detections}
    assert by_engine["yara"].keys() == by_engine["yarax"].keys() and by_engine["yara"]
    for path, detections in by_engine["yara"].items():
        for old, new in zip(detections, by_engine["yarax"][path]):
            assert (new.engine, old.engine) == ("yarax", "yara")
            assert (new.signature, new.types, new.class_, new.name) == (old.signature, old.types, old.class_,
                                                                        old.name)
            assert new.hit_data == old.hit_data and dict(new.meta) == dict(old.meta)


def test_hit_data_is_elkeid_formatted_and_capped(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "rules.yar").write_text('rule Txt_Test_Many { strings: $a = "ab" condition: $a }')
    (tmp_path / "f" / "many.txt").write_bytes(b"ab" * 100)
    result = scan(tmp_path / "f", rules=[str(tmp_path / "rules.yar")], max_strings=3)
    (record,) = result.records
    assert record.detections[0].hit_data == ("$a,0,2", "$a,2,2", "$a,4,2")
    assert (record.detections[0].types, record.detections[0].class_) == ("Txt", "Test")


COMPAT_RULES = r'''
rule Compat_Good { strings: $a = "compat-good-marker" condition: $a }

rule Compat_Entrypoint
{
    strings: $a = { 90 90 90 }
    condition: $a at entrypoint
}

// libyara reads "{" here as a character; YARA-X's own syntax refuses it
rule Compat_Brace { strings: $a = /compat-brace-a{b/ condition: $a }

rule Compat_Modifiers { strings: $a = "compat" xor xor condition: $a }
'''


@pytest.fixture
def compat_rules(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "compat.yar").write_text(COMPAT_RULES)
    (tmp_path / "rules" / "latin1.yar").write_bytes(b'rule Compat_Latin1 { strings: $a = "caf\xe9" condition: $a }')
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "good.txt").write_bytes(b"x compat-good-marker x" * 20)
    (tmp_path / "files" / "brace.txt").write_bytes(b"x compat-brace-a{b x" * 20)
    return tmp_path


def test_the_rules_yara_x_refuses_or_reads_otherwise_are_named_one_line_each(compat_rules, caplog):
    caplog.set_level(logging.INFO)
    rules = str(compat_rules / "rules")
    result = scan(compat_rules / "files", rules=[rules], on_error="skip")
    assert result.detected == {str(compat_rules / "files" / "good.txt"): ["Compat_Good"],
                               str(compat_rules / "files" / "brace.txt"): ["Compat_Brace"]}
    lines = [r.getMessage() for r in caplog.records if r.name == "elkscan.yarax"]
    compat = f"{rules}/compat.yar"
    assert f"yarax: yara-x refuses rule Compat_Entrypoint ({compat}, line 4): `entrypoint` is unsupported: " \
           "the `entrypoint` keyword is not supported anymore" in lines
    assert f"yarax: yara-x refuses rule Compat_Modifiers ({compat}, line 13): duplicate pattern modifier: " \
           "duplicate modifier" in lines
    assert any(line.startswith(f"yarax: yara-x refuses {rules}/latin1.yar: not UTF-8 (byte 0xe9 at offset 39)")
               and line.endswith("refuses its 1 rule(s) Compat_Latin1") for line in lines)
    assert any(line.startswith(f"yarax: rule Compat_Brace is read with libyara's regexp syntax only ({compat}, "
                               "line 11): invalid regular expression") for line in lines)
    assert lines[-1] == ("yarax: yara-x compiles 2 of 5 rules; 3 refused, 1 read with libyara's regexp "
                         "syntax only")
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "elkscan.yarax")


def test_with_on_error_fail_a_refused_rule_stops_start_up(compat_rules):
    with pytest.raises(ComponentError, match=r"yara-x refuses 3 of 5 rules, first .*not UTF-8.*set on_error: skip"):
        scan(compat_rules / "files", rules=[str(compat_rules / "rules")])


def test_its_own_syntax_refuses_what_only_libyaras_reads(compat_rules):
    rules = compat_rules / "rules" / "compat.yar"
    with pytest.raises(ComponentError, match=r"refuses 3 of 4 rules"):
        scan(compat_rules / "files", rules=[str(rules)], relaxed_re_syntax=False)


def test_rule_files_another_user_can_change_are_refused(tmp_path):
    (tmp_path / "rules.yar").write_text('rule A { condition: true }')
    os.chmod(tmp_path / "rules.yar", 0o666)
    (tmp_path / "f").mkdir()
    with pytest.raises(ComponentError, match="world-writable"):
        scan(tmp_path / "f", rules=[str(tmp_path / "rules.yar")])


def test_a_bundles_yara_rules_are_taken_on_reload(tmp_path):
    (tmp_path / "extra.yar").write_text('rule Bundle_Extra { strings: $a = "bundle-marker" condition: $a }')
    engine = YaraXEngine(YaraXEngine.Config(), _Session(tmp_path))
    engine.start()
    before = engine.version()
    engine.reload({"yara": [str(tmp_path / "extra.yar")], "clamav": ["ignored.ndb"]})
    assert engine.version() != before and engine.compiled.count == len(SAMPLES) // 2 + 1
    engine.reload({})
    assert engine.version() == before


class _Session:
    def __init__(self, base):
        self.base = base

    def resolve_path(self, path):
        return os.path.join(self.base, path)


class Killer:
    """Kills the worker process that judges ``kill.txt`` while it is at it (SIGKILL from outside)."""

    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(KillsOnName)


class KillsOnName(YaraXEngine):
    id = "yarax_kill"
    inline_below = 0  # every file in a worker process: the one it kills is not the test's


    def scan(self, subject):
        if subject.path.endswith("kill.txt"):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().scan(subject)


def test_a_killed_worker_process_makes_its_file_an_error_and_the_scan_goes_on(samples):
    (samples / "kill.txt").write_bytes(b"k" * 200)
    result = scan(samples, engine="yarax_kill", extra_plugins=[Killer()])
    killed = next(r for r in result.records if r.target.path.endswith("kill.txt"))
    assert killed.status == "error" and "was killed by SIGKILL" in killed.error
    assert len(result.detected) == sum(1 for _, rule in SAMPLES.values() if rule)
    assert result.summary.errors == 1


def test_yara_xs_own_timeout_is_an_error_on_the_record(tmp_path):
    """A scan YARA-X gives up (its ``timeout``) is an error, never clean; the next file is judged (on
    the thread: it is under ``inline_below``)."""
    (tmp_path / "slow.yar").write_text(
        'rule Slow { condition: for any i in (0..filesize) : (for any j in (0..filesize) : '
        '(uint8(i) == 7 and uint8(j) == 8)) }\n'
        'rule Fast { strings: $a = "fast-marker" condition: $a }')
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "big.bin").write_bytes(b"\0" * 200_000)
    (tmp_path / "f" / "fast.txt").write_bytes(b"x fast-marker x" * 20)
    result = scan(tmp_path / "f", rules=[str(tmp_path / "slow.yar")], timeout="1s")
    records = {os.path.basename(r.target.path): r for r in result.records}
    # YARA-X's own limit, before the runner's; or, in a worker process forked after this process's
    # first yara-x scan (an earlier test's; it has no heartbeat thread), the engine's alarm a second later
    assert records["big.bin"].status == "error" and records["big.bin"].errors[0].status == "failed"
    assert "TimeoutError" in records["big.bin"].error or "killed by SIGALRM" in records["big.bin"].error
    assert [d.signature for d in records["fast.txt"].detections] == ["Fast"]  # small: Slow ends in time


def test_detection_from_signature_shape():
    """What the engine builds for a rule (no scan): yara's naming of types, class and name."""
    detection = Detection.from_signature("yarax", "Linux_Trojan_Mirai_1a2b", yara_rule=True)
    assert (detection.types, detection.class_) == ("Linux", "Trojan")


def test_small_files_are_judged_on_the_threads_large_ones_in_worker_processes(tmp_path):
    """Under 64 KiB a file costs yara-x less to scan than to hand over: it is judged in the session."""
    from elkscan_yarax_backend.engine import YaraXEngine as Engine

    (tmp_path / "r.yar").write_text('rule Marker { strings: $a = "the-marker" condition: $a }')
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "small.txt").write_bytes(b"the-marker " * 10)
    (tmp_path / "f" / "large.txt").write_bytes(b"the-marker " * 10_000)
    calls = []
    scan_in = Engine.scan

    def recording(self, subject):
        calls.append((os.path.basename(subject.path), os.getpid()))
        return scan_in(self, subject)

    Engine.scan = recording
    try:
        result = scan(tmp_path / "f", rules=[str(tmp_path / "r.yar")])
    finally:
        Engine.scan = scan_in
    assert sorted(os.path.basename(path) for path in result.detected) == ["large.txt", "small.txt"]
    assert calls == [("small.txt", os.getpid())]  # large.txt was judged in a worker process
