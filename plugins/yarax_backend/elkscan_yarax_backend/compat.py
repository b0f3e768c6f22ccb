"""Compile rule files with YARA-X, and name every rule it does not read as libyara does.

YARA-X is a rewrite of YARA; most rule sets compile unchanged, but it refuses some rules libyara takes
(``entrypoint``, duplicate modifiers, escapes it does not know in regular expressions, short ``base64``
strings, text that is not UTF-8) and reads some regular expressions only in its relaxed syntax, which
is libyara's. A refused rule is a rule that detects nothing, so none may disappear quietly: each one
gets a line (rule, file, line, why), and so does each rule that needs libyara's regexp syntax.

Rules are found and trust-checked by the yara engine's code (``elkscan_yara_backend.ruleset``): the same
specs (files, directories, globs, ``builtin``), the same StrictModes rules, the same includes.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from importlib.metadata import version as package_version

import attrs
from attrs import frozen

from elkscan_core import ComponentError
from elkscan_core.builtin_hashes import sha256
from elkscan_yara_backend import ruleset

#: A rule's declaration (comments blanked first): its name and where it starts.
_RULE = re.compile(r"^[ \t]*(?:(?:private|global)[ \t]+)*rule[ \t]+([A-Za-z_][A-Za-z0-9_]*)", re.M)
_COMMENT = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:[^"\\\n]|\\.)*"', re.S)
#: A regular expression in a rule (a string or a ``matches`` operand): only such files can read differently.
_REGEXP = re.compile(r"(?:=|\bmatches)\s*/")


@functools.lru_cache(maxsize=None)
def yara_x_version() -> str:
    """The installed yara-x's version (the package has no ``__version__``); read once: ``version()``
    is asked for every file."""
    return package_version("yara-x")


@frozen
class Compiled:
    rules: object  # yara_x.Rules
    digest: str
    files: tuple[str, ...]
    externals: frozenset[str]  # the external variables some condition refers to
    count: int  # rules compiled
    declared: int  # rules the files declare
    refused: tuple[str, ...]  # one line for each rule (or file) YARA-X refuses
    relaxed: tuple[str, ...]  # one line for each rule read only with libyara's regexp syntax
    _version: str = attrs.field(init=False, default=attrs.Factory(
        lambda self: f"yara-x {yara_x_version()} rules {self.digest[:16]}", takes_self=True))

    @property
    def version(self) -> str:
        """The engine's ``version()``: yara-x's and the rules' digest (a stored string: asked per file)."""
        return self._version

    def summary(self) -> str:
        return (f"yara-x compiles {self.count} of {self.declared} rules; {len(self.refused)} refused, "
                f"{len(self.relaxed)} read with libyara's regexp syntax only")


def load(specs: Iterable[str], *, relaxed: bool = True, resolve=lambda p: p) -> Compiled:
    """Find, trust-check and compile the rules named by ``specs`` (as the yara engine does)."""
    import yara_x

    paths = ruleset.expand(specs, resolve)
    sha = sha256(f"yara-x {yara_x_version()} relaxed {relaxed} externals {ruleset.EXTERNALS}".encode())
    externals: set[str] = set()
    for path, data in ruleset.with_includes(paths):
        sha.update(path.encode() + b"\0" + sha256(data).digest())
        externals.update(ruleset.externals_in(data))
    texts, refused = _decode(paths)
    rules, errors = _compile(yara_x, texts, relaxed)
    compiled = {(rule.namespace, rule.identifier) for rule in rules}
    declared = 0
    for path, text in texts.items():
        found = _declared(text)
        declared += len(found)
        refused.extend(_why(path, name, line, end, errors) for name, line, end in found
                       if (path, name) not in compiled)
    declared += sum(len(_declared(_latin(p))) for p in paths if p not in texts)
    differ = _relaxed_only(yara_x, texts, compiled) if relaxed else []
    return Compiled(rules, sha.hexdigest(), tuple(paths), frozenset(externals), len(compiled), declared,
                    tuple(refused), tuple(differ))


def _decode(paths: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Each file's text. YARA-X takes rules as UTF-8 text: a file that is not UTF-8 (a Latin-1 string
    literal) would have its strings match other bytes than libyara's, so it is refused, by name."""
    texts, refused = {}, []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            texts[path] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            names = [name for name, _, _ in _declared(_latin(path))]
            refused.append(f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); YARA-X "
                           f"reads rules as UTF-8 and would match other bytes: refuses its {len(names)} "
                           f"rule(s) {', '.join(names)}")
    return texts, refused


def _latin(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("latin-1")


def _compile(yara_x, texts: dict[str, str], relaxed: bool) -> tuple[object, list[dict]]:
    """The compiled rules and every error met: a rule with an error is left out (and named later)."""
    compiler = yara_x.Compiler(relaxed_re_syntax=relaxed, ignore_invalid_rules=True)
    for name in ruleset.EXTERNALS:
        compiler.define_global(name, "")
    for path, text in texts.items():
        compiler.add_include_dir(os.path.dirname(path))
        compiler.new_namespace(path)
        try:
            compiler.add_source(text, origin=path)
        except yara_x.CompileError:
            pass  # kept in errors(); the rules it left out are named
    errors = list(compiler.errors())
    return compiler.build(), errors


def _declared(text: str) -> list[tuple[str, int, int]]:
    """Rules a file declares: name, first line, last line (before the next rule)."""
    blank = _COMMENT.sub(lambda m: m[0] if m[0].startswith('"') else re.sub(r"[^\n]", " ", m[0]), text)
    starts = [(m[1], blank.count("\n", 0, m.start()) + 1) for m in _RULE.finditer(blank)]
    ends = [line - 1 for _, line in starts[1:]] + [blank.count("\n") + 1]
    return [(name, line, end) for (name, line), end in zip(starts, ends)]


def _why(path: str, name: str, line: int, end: int, errors: list[dict]) -> str:
    """One line: the refused rule, where, and YARA-X's first error inside it."""
    for error in errors:
        label = (error.get("labels") or [{}])[0]
        if label.get("code_origin") == path and line <= error.get("line", 0) <= end:
            detail = f": {label['text']}" if label.get("text") else ""
            return f"rule {name} ({path}, line {line}): {error.get('title', 'error')}{detail}"
    earlier = next((e for e in errors if (e.get("labels") or [{}])[0].get("code_origin") == path
                    and e.get("line", 0) < line), None)
    if earlier is not None:  # a syntax error above it ended the file for YARA-X
        return f"rule {name} ({path}, line {line}): not read after the error at line {earlier['line']}: " \
               f"{earlier.get('title', 'error')}"
    return f"rule {name} ({path}, line {line}): not compiled"


def _relaxed_only(yara_x, texts: dict[str, str], compiled: set[tuple[str, str]]) -> list[str]:
    """Rules that YARA-X compiles only with ``relaxed_re_syntax`` (libyara's regexp syntax): its own
    syntax would read their regular expressions otherwise or refuse them."""
    candidates = {path: text for path, text in texts.items() if _REGEXP.search(text)}
    if not candidates:
        return []
    strict, errors = _compile(yara_x, candidates, relaxed=False)
    strictly = {(rule.namespace, rule.identifier) for rule in strict}
    lines = []
    for path, text in candidates.items():
        for name, line, end in _declared(text):
            if (path, name) in compiled and (path, name) not in strictly:
                lines.append(_why(path, name, line, end, errors).replace(
                    f"rule {name} ", f"rule {name} is read with libyara's regexp syntax only ", 1))
    return lines


def require_all(compiled: Compiled) -> None:
    """``on_error: fail``: a rule YARA-X refuses stops start-up, as a rule file yara cannot compile."""
    if compiled.refused:
        raise ComponentError(f"yara-x refuses {len(compiled.refused)} of {compiled.declared} rules, first "
                             f"{compiled.refused[0]} (fix them, or set on_error: skip to scan without them)")
    if not compiled.count:
        raise ComponentError("no rule compiles under yara-x")
