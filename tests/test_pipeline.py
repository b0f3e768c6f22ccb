import pytest

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
    ({"version": 1, "limits": {"workers": 0}}, "limits.workers", "at least 1"),
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
