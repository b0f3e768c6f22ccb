"""The decoys look like the documents they are named after, at sizes such files have, and say nothing
about being decoys (issue 11: the old ones were tiny and announced themselves in their text)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib

import pytest

from elkscan_core.filetype import category
from elkscan_fanotify_source import decoys, documents

KINDS = {"pdf": ("document", r"^PDF document, version 1\.5, 6 pages"),
         "png": ("image", r"^PNG image data, 420 x 300, 8-bit/color RGB"),
         "doc": ("document", r"^Composite Document File V2 Document.*Name of Creating Application: Microsoft Office Word"),
         "xls": ("document", r"^Composite Document File V2 Document.*Name of Creating Application: Microsoft Excel"),
         "csv": (None, r"^CSV text"),
         "txt": (None, r"^ASCII text")}
SIZES = {"pdf": (100_000, 1 << 20), "png": (100_000, 1 << 20), "doc": (20_000, 300_000),
         "xls": (20_000, 300_000), "csv": (10_000, 200_000), "txt": (2_000, 50_000)}


@pytest.fixture(scope="module")
def made() -> dict[str, bytes]:
    return documents.contents()


def test_each_decoy_is_what_its_extension_says_by_its_magic_and_by_file(made, tmp_path):
    for ext, data in made.items():
        kind, described = KINDS[ext]
        assert category(data[:64]) == kind, ext  # what a scanner's type sniffing sees
        low, high = SIZES[ext]
        assert low <= len(data) < high, (ext, len(data))
        if shutil.which("file"):
            path = tmp_path / f"report.{ext}"
            path.write_bytes(data)
            output = subprocess.run(["file", "-b", str(path)], capture_output=True, text=True).stdout
            assert re.search(described, output), (ext, output)


def test_no_decoy_says_what_it_is(made):
    for ext, data in made.items():
        for stream in [data] + _inflated_pdf_streams(data) * (ext == "pdf"):
            lowered = stream.lower()
            for word in (b"decoy", b"elkscan", b"elkeid", b"ransom", b"honeypot", b"alarm", b"canary"):
                assert word not in lowered, (ext, word)


def test_the_same_bytes_every_time_as_the_manifest_records(made):
    assert documents.contents() == made
    assert decoys.CONTENTS == {f"{decoys.DECOY_STEM}.{ext}": data for ext, data in made.items()}
    assert all(len(d) < decoys._MAX_DECOY_SIZE for d in made.values())  # checked whole when rewritten


def test_the_png_chunks_and_pixels_are_sound(made):
    data = made["png"]
    pos, idat = 8, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    assert len(zlib.decompress(idat)) == 300 * (1 + 420 * 3)


def test_the_pdf_cross_reference_points_at_its_objects(made):
    data = made["pdf"]
    start = int(data.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    assert data[start:start + 5] == b"xref\n"
    count = int(data[start:].split(b"\n")[1].split()[1])
    for number, line in enumerate(data[start:].split(b"\n")[3:2 + count], 1):
        offset = int(line.split()[0])
        assert data[offset:].startswith(b"%d 0 obj" % number)


def test_the_compound_files_hold_their_streams(made):
    for ext, wanted in (("doc", {"WordDocument", "1Table"}), ("xls", {"Workbook"})):
        data = made[ext]
        assert data[:8] == bytes.fromhex("d0cf11e0a1b11ae1") and len(data) % 512 == 0
        fat_count, sector = struct.unpack_from("<I", data, 44)[0], struct.unpack_from("<I", data, 48)[0]
        fat = b"".join(data[512 * (n + 1):512 * (n + 2)] for n in struct.unpack_from(f"<{fat_count}I", data, 76))
        names = set()
        while sector != 0xFFFFFFFE:  # the directory's chain of sectors, through the FAT
            for entry in range(4):
                raw = data[512 * (sector + 1) + 128 * entry:][:128]
                size = struct.unpack_from("<H", raw, 64)[0]
                if size:
                    names.add(raw[:size - 2].decode("utf-16-le"))
            sector = struct.unpack_from("<I", fat, 4 * sector)[0]
        assert wanted | {"Root Entry", "\x05SummaryInformation", "\x05DocumentSummaryInformation"} <= names


def _inflated_pdf_streams(data: bytes) -> list[bytes]:
    found = []
    for match in re.finditer(rb"stream\n(.*?)\nendstream", data, re.S):
        try:
            found.append(zlib.decompress(match[1]))
        except zlib.error:
            pass
    return found
