"""Splitting YARA files into rules: checked against the real compiler on tricky text, and fuzzed (rule
files are other people's bytes)."""

from __future__ import annotations

import os

import yara
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_rules.yarasrc import split

FUZZ_EXAMPLES = int(os.environ.get("ELKSCAN_FUZZ_EXAMPLES", "1000"))
#: Each generated example compiles every rule of it: fewer by default.
COMPILE_EXAMPLES = int(os.environ.get("ELKSCAN_FUZZ_EXAMPLES", "300"))
EXTERNALS = {name: "" for name in ("filename", "filepath", "extension", "filetype", "owner")}

TRICKY = rb'''
import "math"
// a comment with rule Fake { }
/* rule AlsoFake { condition: true } */
private rule Helper : tag1 tag2 {
  meta:
    note = "braces } { and // and /* in a string \" still"
  strings:
    $re = /a{2,3}[}{]\/b/is
    $hex = { 4D 5A [2-4] ( 90 | 91 ) ?? }
  condition:
    any of them
}
global rule Gate { condition: filesize < 100MB }
rule Uses_Helper
{
  strings: $s = "x}" wide ascii
  condition: Helper and $s and math.entropy(0, filesize) >= 0 and 10 \ 2 == 5
}
rule Alone { condition: false }
'''


def names(data: bytes) -> list[str]:
    return [rule.identifier for rule in yara.compile(source=data.decode(), externals=EXTERNALS)]


def test_split_agrees_with_the_compiler_and_keeps_what_a_rule_needs():
    source = split(TRICKY)
    assert [rule.name for rule in source.rules] == names(TRICKY) == ["Helper", "Gate", "Uses_Helper", "Alone"]
    assert source.imports == (b'import "math"',) and not source.includes
    assert source.closure("Uses_Helper") == ["Helper", "Gate", "Uses_Helper"]
    assert source.closure("Alone") == ["Gate", "Alone"]  # a global rule gates every rule of its file
    only = source.text(TRICKY, ["Alone"])
    assert names(only) == ["Gate", "Alone"]
    assert names(source.text(TRICKY, ["Uses_Helper"])) == ["Helper", "Gate", "Uses_Helper"]


def test_text_it_does_not_understand_is_none():
    assert split(b"rule A { condition: true") is None
    assert split(b"rule A { condition: true } rule A { condition: false }") is None
    assert split(b'rule A { strings: $a = "unterminated\n" condition: $a }') is None
    assert split(b"\xff\xfe garbage") is None
    assert split(b"") is not None and split(b"").rules == ()


_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in {"rule", "private", "global", "import", "include", "true", "false", "and", "or",
                        "not", "any", "all", "of", "them", "for", "in", "at", "filesize", "entrypoint",
                        "condition", "strings", "meta", "contains", "matches", "wide", "ascii", "nocase",
                        "fullword", "xor", "base64", "base64wide", "private", "none", "defined", "icontains",
                        "startswith", "endswith", "istartswith", "iendswith", "iequals", "with", "int8",
                        "int16", "int32", "uint8", "uint16", "uint32", "int8be", "int16be", "int32be",
                        "uint8be", "uint16be", "uint32be"})
_STRINGS = st.sampled_from(['"a}b"', '"q\\"{"', "/x\\/y{1,2}/", "{ 41 42 [1-2] 43 }", '"//not" nocase',
                            '"/*x*/" wide'])


@st.composite
def rule_files(draw):
    names_ = draw(st.lists(_NAMES, min_size=1, max_size=5, unique=True))
    parts = []
    for index, name in enumerate(names_):
        strings = draw(st.lists(_STRINGS, max_size=3))
        modifier = draw(st.sampled_from(["", "private ", "global "]))
        earlier = names_[:index]
        uses = draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True)) if earlier else []
        condition = " and ".join(["filesize >= 0", *uses, *(["any of them"] if strings else [])])
        body = "".join(f"    $s{i} = {s}\n" for i, s in enumerate(strings))
        comment = draw(st.sampled_from(["", "// } rule X {\n", "/* { */\n"]))
        parts.append(f"{comment}{modifier}rule {name} {{\n" + (f"  strings:\n{body}" if body else "")
                     + f"  condition:\n    {condition}\n}}\n")
    return "\n".join(parts).encode()


@settings(max_examples=COMPILE_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(rule_files())
def test_fuzz_split_generated_rule_files_as_the_compiler_does(data):
    """Generated valid files: the same rules as yara, and each rule's text compiles alone with what it
    needs (300 examples by default)."""
    source = split(data)
    assert source is not None
    assert [rule.name for rule in source.rules] == names(data)
    for rule in source.rules:
        assert rule.name in names(source.text(data, [rule.name]))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=400), st.builds(lambda a, b: a + b, rule_files(), st.binary(max_size=20)),
                 rule_files().flatmap(lambda d: st.integers(0, len(d)).map(lambda n: d[:n]))))
def test_fuzz_split_never_fails_on_any_bytes(data):
    """Arbitrary, cut and appended-to files: a split or None, never an exception (1,000 examples)."""
    source = split(data)
    if source is not None:
        for rule in source.rules:
            assert 0 <= rule.start < rule.end <= len(data)
