import math
import os
import subprocess
import sys

import attrs
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_core import ConfigError, Duration, Percent, Size, load_pipeline
from elkscan_core.pipeline import Limits, parse_pipeline, structure


@pytest.mark.parametrize("text,value", [("18MiB", 18 * 1024**2), ("512KiB", 512 * 1024), ("1G", 10**9),
                                        (4096, 4096), ("10 MB", 10**7)])
def test_sizes_parse(text, value):
    assert Size.parse(text) == value


@pytest.mark.parametrize("text,value", [("5s", 5), ("500ms", 0.5), ("24h", 86400), ("10m", 600), (3, 3)])
def test_durations_parse(text, value):
    assert Duration.parse(text) == value


def test_percent_parses():
    assert Percent.parse("10%") == pytest.approx(0.1)


@pytest.mark.parametrize("bad", ["18 parsecs", "-1", "lots", True])
def test_bad_sizes_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="size"):
        Size.parse(bad)


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "version: 1\nsources:\n  - use: dirscan\n   with: {\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert f"{path}:4:" in str(info.value) and "invalid YAML" in str(info.value)


def test_missing_pipeline_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read pipeline"):
        load_pipeline(tmp_path / "nope.yaml")


@pytest.mark.parametrize("data,where,message", [
    ({"version": 2}, "version", "unsupported"),
    ({"version": 1, "bogus": 1}, "<pipeline>", "unknown key"),
    ({"version": 1, "engines": {"use": "yara"}}, "engines", "expected a list"),
    ({"version": 1, "engines": [{"with": {}}]}, "engines[0]", "missing 'use"),
    ({"version": 1, "engines": [{"use": "yara", "whith": {}}]}, "engines[0]", "unknown key"),
    ({"version": 1, "engines": [{"use": "yara"}, {"use": "clamav", "with": [1]}]}, "engines[1].with",
     "expected a mapping"),
    ({"version": 1, "limits": {"workers": "two"}}, "limits.workers", "whole number"),
    ({"version": 1, "limits": {"cpu": "fast"}}, "limits.cpu", "percentage"),
    ({"version": 1, "limits": {"workers": 0}}, "limits.workers", "needs 1 to 256 workers, got 0"),
    ({"version": True}, "version", "unsupported"),
    ({"version": 1, "plugins": "yara"}, "plugins", "list of plugin names"),
])
def test_structural_errors_name_the_yaml_path(data, where, message):
    with pytest.raises(ConfigError) as info:
        parse_pipeline(data)
    assert info.value.where == where
    assert message in info.value.message


def test_limits_parse_units():
    limits = structure({"cpu": "10%", "memory": "64MiB", "workers": 3}, Limits, "limits")
    assert (limits.cpu, limits.memory, limits.workers) == (pytest.approx(0.1), 64 * 1024**2, 3)


def test_env_stands_in_for_secrets(monkeypatch):
    monkeypatch.setenv("ELKSCAN_TEST_NICE", "ignored")
    with pytest.raises(ConfigError, match="whole number"):
        structure({"nice": {"$env": "ELKSCAN_TEST_NICE"}}, Limits, "limits")
    with pytest.raises(ConfigError, match="ELKSCAN_NOT_SET") as info:
        structure({"ionice": {"$env": "ELKSCAN_NOT_SET"}}, Limits, "limits")
    assert info.value.where == "limits.ionice"


def test_shipped_default_pipeline_parses():
    from elkscan_core.cli import builtin_pipeline

    pipeline = load_pipeline(builtin_pipeline())
    assert [s.use for s in pipeline.sources] == ["dirscan", "procscan"]
    assert "yara_backend" in pipeline.plugins


# -- the reliability audit's A rows: each bad input first, then what it must give -----------------


@pytest.mark.parametrize("workers", [0, -1, 257, 50000, 100000000000000000000])
def test_worker_counts_are_bounded(workers):
    """``workers: 50000`` hung the scan and ``10**20`` aborted Python (A4, A5)."""
    with pytest.raises(ConfigError) as info:
        parse_pipeline({"version": 1, "limits": {"workers": workers}})
    assert (info.value.where, info.value.message) == ("limits.workers", f"needs 1 to 256 workers, got {workers}")


def test_a_worker_count_changed_after_loading_is_checked_too():
    """``elkscan scan -w -1`` replaced a validated value and scanned nothing, exit 0 (A24)."""
    with pytest.raises(ConfigError, match=r"^workers: needs 1 to 256 workers, got -1$"):
        attrs.evolve(Limits(), workers=-1)


@pytest.mark.parametrize("queue", [0, -5])
def test_the_queue_holds_at_least_one_target(queue):
    """``queue.Queue(0)`` is unbounded: the flat-memory promise was silently dropped (A6)."""
    with pytest.raises(ConfigError, match="at least 1 target") as info:
        parse_pipeline({"version": 1, "limits": {"queue": queue}})
    assert info.value.where == "limits.queue"


@pytest.mark.parametrize("value,message", [
    (math.nan, "expected a duration such as '5s', got nan"),
    (math.inf, "a duration must be a finite number, got inf"),
    (10**400, "a duration must be a finite number"),
    ("99999999999999999999999d", "a duration can be at most 3650d (ten years)"),
])
def test_durations_that_no_timer_takes_are_refused_when_loaded(value, message):
    """``timeout: .nan`` passed ``validate`` and then failed every file (A9)."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Duration.parse(value)


def test_nan_and_infinity_from_yaml_are_refused_with_their_option(tmp_path):
    path = tmp_path / "p.yaml"
    for text, where, message in [("cpu: .nan", "limits.cpu", "expected a percentage"),
                                 ("memory: .inf", "limits.memory", "a size must be a finite number, got inf")]:
        path.write_text(f"version: 1\nlimits: {{{text}}}\n")
        with pytest.raises(ConfigError) as info:
            load_pipeline(path)
        assert info.value.where == f"{path}: {where}" and message in info.value.message


def test_an_infinite_size_is_a_clear_error_not_an_unknown_one():
    """``max_file_size: .inf`` said "unknown error (cannot convert float infinity to integer)" (A10)."""
    with pytest.raises(ValueError, match=r"^a size must be a finite number, got inf$"):
        Size.parse(math.inf)
    assert Size.parse("99999999999999999999999999GiB") > 2**64  # a huge finite size stays "no limit"


@pytest.mark.parametrize("name", [["a", "b"], {"a": 1}, 5, "", "A=B", "\ud800"])
def test_env_takes_a_variable_name_only(name):
    """``{$env: [a, b]}`` was a TypeError traceback with exit code 1 (A14)."""
    with pytest.raises(ConfigError, match=r"\$env takes the name of an environment variable") as info:
        structure({"ionice": {"$env": name}}, Limits, "limits")
    assert info.value.where == "limits.ionice"


@pytest.mark.parametrize("section", ["limits", "sinks"])
def test_env_cannot_stand_for_a_whole_mapping_of_options(tmp_path, section):
    """``with: {$env: HOME}`` said "'str' object has no attribute 'keys'" (A15)."""
    sink = "{use: stdout, with: {$env: HOME}}" if section == "sinks" else "stdout"
    limits = "{$env: HOME}" if section == "limits" else "{}"
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\nplugins: [stdout_sink]\nsinks: [{sink}]\nlimits: {limits}\n")
    from elkscan_core.cli import main

    if section == "limits":
        with pytest.raises(ConfigError, match="\\$env stands in for one option's value, not for all of them"):
            load_pipeline(path)
    else:
        assert main(["validate", str(path)]) == 2


def test_a_choice_among_fixed_words_is_one_clean_line(tmp_path, capsys):
    """attrs' ``validators.in_`` printed its raw tuple, ``Attribute(name='format', ...)`` and all (UX C)."""
    from elkscan_core.cli import main

    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nplugins: [stdout_sink]\nsinks: [{use: stdout, with: {format: csv}}]\n")
    assert main(["validate", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"elkscan: error: {path}: sinks[0].with.format: must be one of auto, jsonl, table, ecs "
                     "(got 'csv') (see docs/pipeline.md)")


@pytest.mark.parametrize("content,message", [
    (b"version: 1\nstate_dir: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 22)"),
    (b"version: 1\nlimits: " + b"[" * 5000 + b"]" * 5000 + b"\n",
     "nested too deeply|exceeded maximum nesting depth"),  # the pure-Python loader; libyaml
])
def test_files_yaml_cannot_read_are_config_errors(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pipeline(path)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """511 bytes whose aliases share nine lists nine levels deep: 9**9 items when walked or printed
    (``validate`` hung). The loader resolves each shared list once and quotes values cut short."""
    lists = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]"
                                                   for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("version: 1\nplugins: [stdout_sink]\nsinks: [stdout]\n"
                    f"limits: {{workers: [{', '.join(lists)}]}}\n")
    result = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "validate", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "limits.workers: expected a whole number, got [['x', 'x', 'x', 'x', ...]" in result.stderr
    assert len(result.stderr) < 400


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, None])
def test_a_unit_is_a_number_or_a_string(value):
    with pytest.raises(ValueError, match="expected a duration such as '5s', got "):
        Duration.parse(value)


# -- fuzzing: whatever the data, a ConfigError that reads as one line -----------------------------

LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
          | st.sampled_from(["5s", "18MiB", "10%", "-1", "idle", "auto", "csv", "3d", "0", "HOME", "$env"]))
ENV = st.builds(lambda name: {"$env": name}, st.sampled_from(["HOME", "PATH", "ELKSCAN_FUZZ_UNSET"]) | LEAVES)
KEYS = st.text(max_size=6) | st.sampled_from(["$env", "use", "with"])


def _values():
    return st.recursive(LEAVES | ENV, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6)


VALUES = _values()
LIMIT_KEYS = [f.name for f in attrs.fields(Limits)]
OPTIONS = VALUES | ENV | st.dictionaries(st.text(max_size=8), VALUES, max_size=3)
COMPONENT = (st.sampled_from(["yara", "dirscan", "stdout"])
             | st.fixed_dictionaries({"use": st.sampled_from(["yara", "stdout"]) | VALUES},
                                     optional={"with": OPTIONS, "optional": VALUES, "bogus": VALUES})
             | VALUES)
PIPELINE = st.fixed_dictionaries({}, optional={
    "version": st.just(1) | VALUES,
    "plugins": st.lists(st.text(max_size=10), max_size=3) | VALUES,
    "limits": st.dictionaries(st.sampled_from(LIMIT_KEYS) | st.text(max_size=6), VALUES, max_size=4)
              | ENV | VALUES,
    "state_dir": st.text(max_size=10) | VALUES,
    "sources": st.lists(COMPONENT, max_size=3) | VALUES,
    "engines": st.lists(COMPONENT, max_size=3) | VALUES,
    "sinks": st.lists(COMPONENT, max_size=3) | VALUES,
    "extra": VALUES,
}) | VALUES


@attrs.frozen
class FuzzedOptions:
    """Every kind of option a component declares: units, choices, optionals, lists, nesting."""

    size: Size = Size(1)
    timeout: Duration = Duration(1)
    share: Percent | None = None
    format: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "jsonl", "table")))
    count: int = 1
    names: list[str] = attrs.Factory(list)
    roots: dict[str, int] = attrs.Factory(dict)
    flag: bool = False
    limits: Limits = Limits()


def assert_one_clean_line(error: ConfigError) -> None:
    text = str(error)
    assert "\n" not in text and "Attribute(" not in text and "unknown error" not in text, text


@pytest.mark.parametrize("section,use,option,value", [
    ("engines", "yara", "rules", "/etc/elkscan/rules"), ("sources", "dirscan", "exclude", "/proc"),
    ("sources", "dirscan", "exclude", {"/proc": 1})])
def test_a_list_option_refuses_a_single_string_rather_than_taking_its_characters(section, use, option, value):
    """`rules: /etc/rules` would otherwise name the rule directories `/`, `e`, `t`, ...: the first of
    them is the whole filesystem."""
    from elkscan_core.plugins import make_plugin_manager
    from elkscan_core.runner import build_session

    pipeline = parse_pipeline({"version": 1, "plugins": ["yara_backend"],
                               section: [{"use": use, "with": {option: value}}]})
    with pytest.raises(ConfigError) as info:
        build_session(pipeline, make_plugin_manager(pipeline.plugins))
    assert info.value.where.endswith(f"{section}[0].with.{option}")
    assert "expected a list" in info.value.message
    if isinstance(value, str):
        assert "write one item as [item]" in info.value.message


@settings(max_examples=400, deadline=None)
@given(PIPELINE)
def test_fuzzed_pipelines_only_ever_raise_config_error(data):
    try:
        parse_pipeline(data)
    except ConfigError as error:
        assert_one_clean_line(error)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in attrs.fields(FuzzedOptions)]) | st.text(max_size=6),
                       VALUES, max_size=5) | ENV | VALUES)
def test_fuzzed_component_options_only_ever_raise_config_error(data):
    try:
        structure(data, FuzzedOptions, "engines[0].with")
    except ConfigError as error:
        assert_one_clean_line(error)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(PIPELINE.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode("utf-8", "surrogatepass")),
                 st.binary(max_size=200),
                 st.text(alphabet="{}[]:,-!&*|>'\"# \nab1.$%@`\t?", max_size=80).map(str.encode)))
def test_fuzzed_pipeline_files_only_ever_raise_config_error(fuzz_dir, content):
    path = fuzz_dir / "pipeline.yaml"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    try:
        load_pipeline(path)
    except ConfigError as error:
        assert_one_clean_line(error)
