"""Text from the scanned host made safe to print: file names are bytes, and may hold anything.

Paths reach elkscan through ``os.fsdecode``, so a byte that is not UTF-8 (``0xff``) is a lone surrogate
(``'\\udcff'``) in the string. Such a string cannot be written as UTF-8; these helpers give its lossy
text (U+FFFD), its exact bytes in an escaped form (``bad\\xff.com``), and a visible form for people
where control and format characters (newline, ESC, bidi overrides) are shown as escapes, not obeyed.
"""

from __future__ import annotations

import re
import unicodedata

_SURROGATE = re.compile("[\ud800-\udfff]")
#: Control, format (bidi overrides, zero-width), line/paragraph separator and surrogate characters.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def has_surrogates(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None  # isascii: a fast no for most


def raw_bytes(text: str) -> bytes:
    """The bytes a string stands for: ``os.fsdecode``'s escapes back to the bytes they came from.

    Any other lone surrogate (a string that did not come from a file name) is kept as its own
    (invalid) UTF-8 bytes, so nothing is lost.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return b"".join(c.encode("utf-8", "surrogateescape" if "\udc80" <= c <= "\udcff" else "surrogatepass")
                        for c in text)


def lossy(text: str) -> str:
    """Valid Unicode for any string: bytes that are not UTF-8 become U+FFFD, as Elkeid sends them."""
    return raw_bytes(text).decode("utf-8", "replace") if has_surrogates(text) else text


def escaped_bytes(raw: bytes) -> str:
    """Exact bytes as text: valid UTF-8 as itself, a backslash as ``\\\\``, other bytes as ``\\xHH``.

    Reversed by ``unescaped_bytes`` (or ``printf '%b'``).
    """
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(r"\\(?:(\\)|x([0-9a-fA-F]{2}))")


def unescaped_bytes(text: str) -> bytes:
    """The exact bytes ``escaped_bytes`` gave as ``text``; ValueError for any other backslash (text from
    elsewhere is checked, never guessed at)."""
    parts, end = [], 0
    for match in _ESCAPE.finditer(text):
        parts.append(_plain_utf8(text[end:match.start()]))
        parts.append(b"\\" if match.group(1) else bytes((int(match.group(2), 16),)))
        end = match.end()
    parts.append(_plain_utf8(text[end:]))
    return b"".join(parts)


def _plain_utf8(text: str) -> bytes:
    if "\\" in text:
        raise ValueError("a backslash that is neither \\\\ nor \\xHH")
    return text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError


def hidden(char: str) -> bool:
    """Would a terminal obey this character rather than show it (or show nothing)?"""
    if " " <= char < "\x7f":
        return False
    return char < " " or unicodedata.category(char) in _HIDDEN_CATEGORIES


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a name that is not UTF-8 (os.fsdecode)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def visible(text: str) -> str:
    """Text for a terminal: control and format characters, backslashes and undecodable bytes escaped
    (``\\n``, ``\\x1b``, ``\\u202e``, ``\\xff``), so a file name can neither forge a row nor colour
    the terminal, and no two different names print the same."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) if c == "\\" or hidden(c) else c for c in text)


def cells(text: str) -> int:
    """Terminal columns ``text`` takes (wide East Asian characters two, combining marks none)."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def shorten(text: str, width: int, keep_end: int = 0) -> str:
    """``text`` in at most ``width`` columns, cut in the middle with ``...``: two thirds of the room go
    to the end, or at least ``keep_end`` columns of it when there is room (a path's file name)."""
    if cells(text) <= width:
        return text
    if width <= 3:
        return "." * max(width, 0)
    budget = width - 3
    tail_budget = max(budget - budget // 3, min(keep_end, budget - 1))
    tail, used = "", 0
    for char in reversed(text):
        if used + cells(char) > tail_budget:
            break
        tail, used = char + tail, used + cells(char)
    head, used = "", cells(tail)
    for char in text:
        if used + cells(char) > budget:
            break
        head, used = head + char, used + cells(char)
    return f"{head}...{tail}"


def pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` columns (never cut)."""
    return text + " " * max(width - cells(text), 0)
