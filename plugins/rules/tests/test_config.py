"""The rules config: what it accepts, ``file:line`` errors for what it does not, and a fuzz test (the
parser must answer any bytes with a config or a ConfigError, never another exception)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_core.errors import ConfigError
from elkscan_core.trust import UntrustedError
from elkscan_rules.config import PRESETS, load_config, parse_config

FUZZ_EXAMPLES = int(os.environ.get("ELKSCAN_FUZZ_EXAMPLES", "1000"))


def test_a_full_config(tmp_path):
    config = parse_config(b"""
sources:
  - {name: sigbase, preset: signature-base, ref: v1.0}
  - {name: forge, preset: yara-forge}
  - {name: elastic, preset: elastic, git: https://mirror.example.org/protections-artifacts.git}
  - {name: mine, git: /srv/rules.git, path: yara/}
  - {name: one, url: https://example.org/r.yar, sha256: %s}
  - {name: local, dir: rules}
  - {name: clamav, freshclam: true}
vetting:
  budget: 2ms
  profile_bytes: 4MiB
  baseline: {packages: false, paths: [benign], max_files: 10}
limits: {download_size: 10MiB, download_timeout: 30s}
state_dir: state
password_env: RULES_PASSWORD
""" % (b"a" * 64), "rules.yaml", str(tmp_path))
    by_name = {s.name: s for s in config.sources}
    assert by_name["sigbase"].kind == "git" and by_name["sigbase"].location == PRESETS["signature-base"]["git"]
    assert by_name["sigbase"].path == "yara" and by_name["sigbase"].ref == "v1.0"
    assert by_name["forge"].kind == "url" and by_name["forge"].location.endswith("yara-forge-rules-core.zip")
    assert by_name["elastic"].location.startswith("https://mirror.") and by_name["elastic"].path == "yara/rules"
    assert by_name["mine"].path == "yara"
    assert by_name["local"].location == str(tmp_path / "rules")
    assert by_name["clamav"].kind == "freshclam"
    assert config.vetting.budget == 0.002 and config.vetting.profile_bytes == 4 * 2**20
    assert config.vetting.baseline.paths == (str(tmp_path / "benign"),) and not config.vetting.baseline.packages
    assert config.limits.download_size == 10 * 2**20 and config.limits.download_timeout == 30
    assert config.state_dir == str(tmp_path / "state") and config.password_env == "RULES_PASSWORD"


@pytest.mark.parametrize("text,line,message", [
    (b"sources:\n  - {name: a, dir: /x}\n  - {name: a, dir: /y}\n", 3, "used twice"),
    (b"sources:\n  - name: a\n    dir: /x\n    colour: red\n", 4, "unknown key 'colour'"),
    (b"sources:\n  - {name: a, dir: /x, git: /y}\n", 2, "more than one kind"),
    (b"sources:\n  - {name: a, preset: elastic, url: https://x.org/a.zip}\n", 2, "more than one kind"),
    (b"sources:\n  - {name: a, preset: nope}\n", 2, "unknown preset"),
    (b"sources:\n  - {name: A B, dir: /x}\n", 2, "lower-case"),
    (b"sources:\n  - {name: a}\n", 2, "needs one of"),
    (b"sources:\n  - {name: a, url: ftp://x.org/r.yar}\n", 2, "must be https"),
    (b"sources:\n  - {name: a, url: http://x.org/r.yar}\n", 2, "must be https"),
    (b"sources:\n  - {name: a, git: /x, ref: --upload-pack=evil}\n", 2, "ref is a git branch"),
    (b"sources:\n  - {name: a, dir: /x, path: ../up}\n", 2, "without '..'"),
    (b"sources:\n  - {name: a, url: https://x.org/a.zip, sha256: abc}\n", 2, "64 hex digits"),
    (b"sources:\n  - {name: a, freshclam: false}\n", 2, "leave the source out"),
    (b"sources:\n  - {name: a, freshclam: http://mirror.example.org}\n", 2, "must be https"),
    (b"sources: []\n", 1, "non-empty list"),
    (b"vetting: {}\n", 1, "needs 'sources:'"),
    (b"sources:\n  - {name: a, dir: /x}\nvetting:\n  budget: fast\n", 4, "vetting.budget"),
    (b"sources:\n  - {name: a, dir: /x}\nvetting:\n  baseline: {max_files: 0}\n", 4, "max_files"),
    (b"sources:\n  - {name: a, dir: /x}\nlimits: {download_size: -1}\n", 3, "download_size"),
    (b"sources:\n  - {name: a, dir: /x\n", 3, "invalid YAML"),
    (b"sources:\n  - {name: !!python/object:os.system a, dir: /x}\n", 2, "name"),
])
def test_errors_name_the_line(text, line, message):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "rules.yaml")
    assert f"rules.yaml:{line}" in str(info.value) and message in str(info.value)


def test_an_alias_bomb_is_refused_not_walked():
    text = b"a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for index in range(1, 9):
        text += f"{chr(97 + index)}: &{chr(97 + index)} [*{chr(96 + index)}, *{chr(96 + index)}, " \
                f"*{chr(96 + index)}, *{chr(96 + index)}, *{chr(96 + index)}]\n".encode()
    text += b"sources: [*i]\n"
    with pytest.raises(ConfigError, match="too large"):
        parse_config(text, "rules.yaml")


def test_a_config_another_user_can_change_is_refused(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("sources:\n  - {name: a, dir: /x}\n")
    path.chmod(0o666)
    with pytest.raises(UntrustedError, match="world-writable"):
        load_config(path)
    path.chmod(0o600)
    assert load_config(path).sources[0].name == "a"


_KEYS = ["sources", "vetting", "limits", "state_dir", "password_env", "name", "preset", "git", "url", "dir",
         "freshclam", "ref", "path", "sha256", "budget", "baseline", "packages", "paths", "max_files"]
_scalars = st.one_of(st.sampled_from(["elastic", "yara-forge", "https://x.org/a.zip", "/tmp", "5ms", "-1",
                                      "true", "~", "''", "0", "1e400", "a" * 70]),
                     st.text(max_size=12))
_yamlish = st.recursive(
    _scalars.map(lambda s: s if s else "''"),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5).map(
            lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}")),
    max_leaves=20)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300), _yamlish.map(lambda s: ("sources: " + s).encode()),
                 st.dictionaries(st.sampled_from(_KEYS), _yamlish, max_size=4).map(
                     lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()).encode())))
def test_fuzz_the_config_parser(data):
    """Any bytes: a config or a ConfigError (1,000 examples by default; ELKSCAN_FUZZ_EXAMPLES)."""
    try:
        config = parse_config(data, "fuzz.yaml")
    except ConfigError as exc:
        assert "\n" not in str(exc).strip() or "fuzz.yaml" in str(exc)
    else:
        assert config.sources
