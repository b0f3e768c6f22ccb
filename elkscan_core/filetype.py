"""Recognise, from a file's first 64 bytes, the kinds a periodic scan skips as Elkeid does: images,
audio, video, fonts, office documents, e-books and archives. Executables (ELF, PE, Mach-O), scripts,
HTML/XML and anything unknown are scanned."""

from __future__ import annotations

HEAD_SIZE = 64

# (offset, magic bytes, category). Order matters only where one magic is a prefix of another.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image"), (0, b"\xff\xd8\xff", "image"), (0, b"GIF87a", "image"),
    (0, b"GIF89a", "image"), (0, b"BM", "image"), (0, b"II*\x00", "image"), (0, b"MM\x00*", "image"),
    (0, b"\x00\x00\x01\x00", "image"), (0, b"8BPS", "image"), (0, b"\x76\x2f\x31\x01", "image"),
    (0, b"\xff\x0a", "image"), (0, b"\x00\x00\x00\x0cjXL ", "image"),
    (0, b"ID3", "audio"), (0, b"\xff\xfb", "audio"), (0, b"\xff\xf3", "audio"), (0, b"\xff\xf2", "audio"),
    (0, b"fLaC", "audio"), (0, b"OggS", "audio"), (0, b"MThd", "audio"), (0, b"#!AMR", "audio"),
    (0, b"\x1aE\xdf\xa3", "video"), (0, b"FLV\x01", "video"), (0, b"\x00\x00\x01\xba", "video"),
    (0, b"\x00\x00\x01\xb3", "video"), (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "video"),
    (0, b"wOFF", "font"), (0, b"wOF2", "font"), (0, b"OTTO", "font"), (0, b"\x00\x01\x00\x00\x00", "font"),
    (0, b"ttcf", "font"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "document"), (0, b"{\\rtf", "document"),
    (0, b"%PDF-", "document"), (0, b"%!PS", "document"), (60, b"BOOKMOBI", "ebook"),
    (0, b"AT&TFORM", "ebook"),
    (0, b"PK\x03\x04", "archive"), (0, b"PK\x05\x06", "archive"), (0, b"\x1f\x8b", "archive"),
    (0, b"BZh", "archive"), (0, b"\xfd7zXZ\x00", "archive"), (0, b"7z\xbc\xaf\x27\x1c", "archive"),
    (0, b"Rar!\x1a\x07", "archive"), (0, b"\x28\xb5\x2f\xfd", "archive"), (0, b"\xed\xab\xee\xdb", "archive"),
    (0, b"!<arch>\n", "archive"), (0, b"MSCF", "archive"), (0, b"LZIP", "archive"),
    (0, b"\x1f\x9d", "archive"), (0, b"\x1f\xa0", "archive"), (0, b"\x04\x22\x4d\x18", "archive"),
    (0, b"SQLite format 3\x00", "archive"), (0, b"hsqs", "archive"),
)
_RIFF = {b"WAVE": "audio", b"AVI ": "video", b"WEBP": "image"}
_FTYP_AUDIO = (b"M4A ", b"M4B ", b"F4A ")
_FTYP_IMAGE = (b"heic", b"heix", b"mif1", b"avif", b"heim", b"heis")

# The magics at offset 0 by their first byte (a walk asks for every file: one dict look-up instead of
# fifty comparisons), and the others; each with its place in _MAGIC, where the first match wins.
_AT_START: dict[bytes, list[tuple[int, bytes, str]]] = {}
for _order, (_offset, _magic, _kind) in enumerate(_MAGIC):
    if not _offset:
        _AT_START.setdefault(_magic[:1], []).append((_order, _magic, _kind))
_ELSEWHERE = tuple((order, offset, magic, kind) for order, (offset, magic, kind) in enumerate(_MAGIC) if offset)


def category(head: bytes) -> str | None:
    """The skip-worthy category of a file that starts with ``head``, or None when it is scanned."""
    if head[:4] == b"RIFF":
        return _RIFF.get(head[8:12])
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "audio" if brand in _FTYP_AUDIO else "image" if brand in _FTYP_IMAGE else "video"
    first = next(((order, kind) for order, magic, kind in _AT_START.get(head[:1], ())
                  if head.startswith(magic)), None)
    for order, offset, magic, kind in _ELSEWHERE:
        if (first is None or order < first[0]) and head.startswith(magic, offset):
            return kind
    return first[1] if first else None
