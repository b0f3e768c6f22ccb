"""Split YARA source text into its rules, so that vetting can set one rule aside and keep the rest.

Rule files come from other people's repositories: this reads them as bytes and never fails on them
(``split`` returns None when the text is not what it understands, and the caller then treats the file
as one unit). The lexer knows what YARA's does at the top level and inside a rule body: ``//`` and
``/* */`` comments, ``"..."`` strings with escapes, ``/.../`` regular expressions (YARA divides with
``\\``, so a ``/`` outside a comment starts one), and balanced braces (hex strings). What it finds is
checked against the compiler by the caller: the rule names must be the ones yara compiled.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from attrs import frozen

_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_SPACE = re.compile(rb"\s+")
_IMPORT = re.compile(rb'import[ \t]+"[^"\n]*"')
_INCLUDE = re.compile(rb'include[ \t]+"[^"\n]*"')
_MODIFIERS = (b"private", b"global")


@frozen
class Rule:
    """One rule: its name, its text's span in the file, whether it is ``global``, and the names (of
    other rules in the file) its body mentions."""

    name: str
    start: int
    end: int
    is_global: bool
    mentions: frozenset[str]


@frozen
class Source:
    """A rule file split: its ``import`` lines, whether it ``include``s, and its rules in order."""

    imports: tuple[bytes, ...]
    includes: bool
    rules: tuple[Rule, ...]

    def closure(self, name: str) -> list[str]:
        """``name`` and the rules it needs, in file order: the rules it mentions, transitively, and
        every ``global`` rule (it gates all rules of its file)."""
        by_name = {rule.name: rule for rule in self.rules}
        needed, pending = set(), [name]
        pending += [rule.name for rule in self.rules if rule.is_global]
        while pending:
            current = pending.pop()
            if current in needed or current not in by_name:
                continue
            needed.add(current)
            pending.extend(by_name[current].mentions)
        return [rule.name for rule in self.rules if rule.name in needed]

    def text(self, data: bytes, names: Iterable[str]) -> bytes:
        """A rule file holding the imports and only the rules ``names`` (each with what it needs)."""
        keep: set[str] = set()
        for name in names:
            keep.update(self.closure(name))
        parts = [line + b"\n" for line in self.imports]
        parts += [data[rule.start:rule.end] + b"\n\n" for rule in self.rules if rule.name in keep]
        return b"".join(parts)


class _Unknown(Exception):
    """Text this splitter does not understand."""


def _skip_string(data: bytes, pos: int) -> int:
    """``pos`` is at an opening quote; return the position after the closing one."""
    pos += 1
    while pos < len(data):
        char = data[pos]
        if char == 0x5C:  # backslash
            pos += 2
            continue
        if char == 0x22:
            return pos + 1
        if char == 0x0A:
            raise _Unknown("newline in a string")
        pos += 1
    raise _Unknown("unterminated string")


def _skip_regex(data: bytes, pos: int) -> int:
    pos += 1
    while pos < len(data):
        char = data[pos]
        if char == 0x5C:
            pos += 2
            continue
        if char == 0x2F:
            pos += 1
            while pos < len(data) and (chr(data[pos]).isalpha()):  # flags: i s
                pos += 1
            return pos
        if char == 0x0A:
            raise _Unknown("newline in a regular expression")
        pos += 1
    raise _Unknown("unterminated regular expression")


def _skip_comment(data: bytes, pos: int) -> int | None:
    """After a comment starting at ``pos``, or None if none starts there."""
    if data.startswith(b"//", pos):
        end = data.find(b"\n", pos)
        return len(data) if end < 0 else end + 1
    if data.startswith(b"/*", pos):
        end = data.find(b"*/", pos + 2)
        if end < 0:
            raise _Unknown("unterminated comment")
        return end + 2
    return None


def _skip_blank(data: bytes, pos: int) -> int:
    while pos < len(data):
        match = _SPACE.match(data, pos)
        if match:
            pos = match.end()
            continue
        after = _skip_comment(data, pos)
        if after is None:
            return pos
        pos = after
    return pos


def _body(data: bytes, pos: int) -> tuple[int, set[str]]:
    """``pos`` is at a rule's ``{``; return the position after its closing ``}`` and the identifiers
    its body holds outside strings, regular expressions and comments."""
    depth, idents = 0, set()
    while pos < len(data):
        char = data[pos]
        if char == 0x22:
            pos = _skip_string(data, pos)
        elif char == 0x2F:
            after = _skip_comment(data, pos)
            pos = after if after is not None else _skip_regex(data, pos)
        elif char == 0x7B:
            depth += 1
            pos += 1
        elif char == 0x7D:
            depth -= 1
            pos += 1
            if depth == 0:
                return pos, idents
        elif char in b"$#@!" and pos + 1 < len(data):  # string identifiers are never rule names
            match = _IDENT.match(data, pos + 1)
            pos = match.end() if match else pos + 1
        else:
            match = _IDENT.match(data, pos)
            if match:
                idents.add(match.group().decode("ascii"))
                pos = match.end()
            else:
                pos += 1
    raise _Unknown("unterminated rule body")


def split(data: bytes) -> Source | None:
    """The rules of a YARA file, or None when the text is not one this splitter understands (the
    caller then keeps or sets aside the file whole)."""
    try:
        return _split(data)
    except (_Unknown, UnicodeDecodeError):
        return None


def _split(data: bytes) -> Source:
    imports: list[bytes] = []
    includes = False
    found: list[tuple[str, int, int, bool, set[str]]] = []
    pos = _skip_blank(data, 0)
    while pos < len(data):
        match = _IMPORT.match(data, pos)
        if match:
            imports.append(match.group())
            pos = _skip_blank(data, match.end())
            continue
        match = _INCLUDE.match(data, pos)
        if match:
            includes = True
            pos = _skip_blank(data, match.end())
            continue
        start, is_global = pos, False
        word = _IDENT.match(data, pos)
        while word and word.group() in _MODIFIERS:
            is_global = is_global or word.group() == b"global"
            pos = _skip_blank(data, word.end())
            word = _IDENT.match(data, pos)
        if not word or word.group() != b"rule":
            raise _Unknown("expected a rule")
        pos = _skip_blank(data, word.end())
        name = _IDENT.match(data, pos)
        if not name:
            raise _Unknown("a rule without a name")
        pos = _skip_blank(data, name.end())
        if data.startswith(b":", pos):  # tags
            pos = _skip_blank(data, pos + 1)
            while True:
                tag = _IDENT.match(data, pos)
                if not tag:
                    break
                pos = _skip_blank(data, tag.end())
        if not data.startswith(b"{", pos):
            raise _Unknown("expected a rule body")
        end, idents = _body(data, pos)
        found.append((name.group().decode("ascii"), start, end, is_global, idents))
        pos = _skip_blank(data, end)
    names = {entry[0] for entry in found}
    if len(names) != len(found):
        raise _Unknown("a rule name twice")
    rules = tuple(Rule(name, start, end, is_global, frozenset((idents & names) - {name}))
                  for name, start, end, is_global, idents in found)
    return Source(tuple(imports), includes, rules)
