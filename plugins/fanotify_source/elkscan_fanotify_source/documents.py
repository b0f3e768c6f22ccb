"""The anti-ransomware decoys' content: ordinary-looking office files of ordinary sizes, made here.

A ransomware that skips tiny files, or files that say what they are, must find these worth encrypting:
a multi-page PDF report with a photo, a PNG photo, a Word 97 document and an Excel 97 workbook (OLE2
compound files with their summary information), a CSV export and a text file of notes. Each is
generated from a fixed seed, so every run (and every host) makes the same bytes, whose SHA-256 the
manifest records; none says anywhere that it is a decoy. Every file stays under 1 MiB (the size up to
which a rewrite is checked for an unchanged content).
"""

from __future__ import annotations

import random
import struct
import zlib

_SEED = 0x5EED2024
_WORDS = ("quarterly revenue forecast budget review customer account contract renewal pipeline margin "
          "region north south east west team meeting agenda action items owner deadline supplier invoice "
          "payment terms delivery schedule inventory warehouse shipment product launch marketing campaign "
          "headcount hiring plan training compliance audit finding risk mitigation approval board summary "
          "growth target variance actual estimate cost center project milestone status update priority "
          "strategy partner proposal pricing discount order volume capacity operations report analysis").split()
_NAMES = ("Anna Schmidt", "David Chen", "Maria Garcia", "James Wilson", "Sofia Rossi", "Li Wei", "Omar Haddad",
          "Emma Johnson", "Lukas Novak", "Priya Nair")
_REGIONS = ("North", "South", "East", "West", "Central")
_PRODUCTS = ("A-100", "A-200", "B-310", "C-450", "C-460", "D-900")
_EPOCH_2023 = 1672531200  # 2023-01-01, when the "documents" are dated


def _sentence(rnd: random.Random) -> str:
    words = [rnd.choice(_WORDS) for _ in range(rnd.randint(8, 18))]
    return " ".join(words).capitalize() + "."


def _paragraph(rnd: random.Random) -> str:
    return " ".join(_sentence(rnd) for _ in range(rnd.randint(3, 7)))


def _date(rnd: random.Random) -> str:
    day = rnd.randint(0, 364)
    month, day = divmod(day, 28)
    return f"2023-{month % 12 + 1:02d}-{day + 1:02d}"


# -- text and CSV --------------------------------------------------------------------------------


def notes() -> bytes:
    rnd = random.Random(_SEED + 1)
    lines = ["Project status notes", "", f"Prepared by {rnd.choice(_NAMES)}, {_date(rnd)}", ""]
    for section in ("Summary", "Open items", "Budget", "Next steps"):
        lines += [section, "-" * len(section), ""]
        lines += [_paragraph(rnd) for _ in range(3)]
        lines.append("")
    return "\n".join(lines).encode()


def figures() -> bytes:
    rnd = random.Random(_SEED + 2)
    rows = ["date,region,product,units,unit_price,revenue,owner"]
    for _ in range(900):
        units, price = rnd.randint(1, 480), rnd.choice((19.9, 24.5, 39.0, 129.0, 249.0, 999.0))
        rows.append(f"{_date(rnd)},{rnd.choice(_REGIONS)},{rnd.choice(_PRODUCTS)},{units},{price:.2f},"
                    f"{units * price:.2f},{rnd.choice(_NAMES)}")
    return ("\n".join(rows) + "\n").encode()


# -- pictures ------------------------------------------------------------------------------------


_NOISE = bytes(b & 0x3F for b in range(256))  # keeps 6 bits of a random byte


def _photo(rnd: random.Random, width: int, height: int) -> bytes:
    """RGB rows of a smooth scene with sensor noise: compresses about as little as a real photo. Each row
    is summed as one big integer, lane by lane: no lane goes over 255, so none carries into the next."""
    green = int.from_bytes(bytes(v for x in range(width) for v in (0, 100 + x * 90 // width, 0)), "big")
    rows = []
    for y in range(height):
        red, blue = 70 + y * 120 // height, 170 - y * 80 // height
        row = (green + int.from_bytes(bytes((red, 0, blue)) * width, "big")
               + int.from_bytes(rnd.randbytes(width * 3).translate(_NOISE), "big"))
        rows.append(row.to_bytes(width * 3, "big"))
    return b"".join(rows)


def photo_png() -> bytes:
    rnd = random.Random(_SEED + 3)
    width, height = 420, 300
    pixels = _photo(rnd, width, height)
    raw = b"".join(b"\0" + pixels[y * width * 3:(y + 1) * width * 3] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"pHYs", struct.pack(">IIB", 3780, 3780, 1))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


# -- PDF -----------------------------------------------------------------------------------------


def _pdf_text(text: str) -> bytes:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")


def report_pdf() -> bytes:
    rnd = random.Random(_SEED + 4)
    width, height = 320, 220
    image = zlib.compress(_photo(rnd, width, height), 9)
    pages = []
    for number in range(1, 7):
        lines, y = [b"BT /F2 16 Tf 72 740 Td (%s) Tj ET" % _pdf_text(f"Quarterly business review - part {number}")], 710
        if number == 1:
            lines.append(b"q 320 0 0 220 72 470 cm /Im1 Do Q")
            y = 450
        while y > 80:
            words = _sentence(rnd)
            lines.append(b"BT /F1 10 Tf 72 %d Td (%s) Tj ET" % (y, _pdf_text(words[:95])))
            y -= 14
        lines.append(b"BT /F1 8 Tf 290 40 Td (Page %d of 6) Tj ET" % number)
        pages.append(zlib.compress(b"\n".join(lines), 6))
    objects: list[bytes] = [b"", b""]  # 1: catalog, 2: page tree (filled in below)
    fonts = len(objects) + 1
    objects += [b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
                b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>"]
    picture = len(objects) + 1
    objects.append(b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB "
                   b"/BitsPerComponent 8 /Filter /FlateDecode /Length %d >>\nstream\n%s\nendstream"
                   % (width, height, len(image), image))
    kids = []
    for content in pages:
        objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(content), content))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R /Resources "
                       b"<< /Font << /F1 %d 0 R /F2 %d 0 R >> /XObject << /Im1 %d 0 R >> >> >>"
                       % (len(objects), fonts, fonts + 1, picture))
        kids.append(b"%d 0 R" % len(objects))
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(kids))
    info = len(objects) + 1
    objects.append(b"<< /Title (Quarterly business review) /Author (%s) /Creator (Microsoft Word) "
                   b"/Producer (Microsoft Word) /CreationDate (D:20230314091522+01'00') >>"
                   % _pdf_text(rnd.choice(_NAMES)))
    out, offsets = bytearray(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, info, xref)
    return bytes(out)


# -- OLE2 compound files (Word 97 and Excel 97) ----------------------------------------------------

_SECTOR, _MINI, _CUTOFF = 512, 64, 4096
_FREE, _END, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def _filetime(unix: int) -> bytes:
    return struct.pack("<Q", (unix + 11644473600) * 10_000_000)


def compound_file(streams: dict[str, bytes], stamp: int) -> bytes:
    """An OLE2 compound file (MS-CFB version 3) holding ``streams`` under its root storage: streams under
    4096 bytes in the mini stream, the others in 512-byte sectors."""
    names = sorted(streams, key=lambda n: (len(n), n.upper()))
    sectors: list[bytes] = []
    fat: list[int] = []

    def place(data: bytes, size: int) -> int:
        if not data:
            return _END
        start = len(sectors)
        count = -(-len(data) // size)
        for index in range(count):
            sectors.append(data[index * size:(index + 1) * size].ljust(size, b"\0"))
            fat.append(start + index + 1 if index < count - 1 else _END)
        return start

    mini_stream, mini_fat, starts = bytearray(), [], {}
    for name in names:
        data = streams[name]
        if len(data) < _CUTOFF:
            first = len(mini_stream) // _MINI
            count = -(-len(data) // _MINI)
            mini_stream += data.ljust(count * _MINI, b"\0")
            mini_fat += [first + i + 1 if i < count - 1 else _END for i in range(count)]
            starts[name] = first
    for name in names:
        if len(streams[name]) >= _CUTOFF:
            starts[name] = place(streams[name], _SECTOR)
    root_start = place(bytes(mini_stream), _SECTOR)
    mini_fat_start = place(b"".join(struct.pack("<I", v) for v in mini_fat), _SECTOR)

    # the directory: the root, then the streams as a balanced binary tree (all black)
    entries = [("Root Entry", 5, root_start, len(mini_stream))] + [
        (name, 2, starts[name], len(streams[name])) for name in names]
    links = {i: [_NOSTREAM, _NOSTREAM, _NOSTREAM] for i in range(len(entries))}  # left, right, child

    def tree(lo: int, hi: int) -> int:
        if lo > hi:
            return _NOSTREAM
        mid = (lo + hi) // 2
        links[mid][0], links[mid][1] = tree(lo, mid - 1), tree(mid + 1, hi)
        return mid

    links[0][2] = tree(1, len(entries) - 1)
    directory = bytearray()
    for index, (name, kind, start, size) in enumerate(entries):
        encoded = name.encode("utf-16-le") + b"\0\0"
        times = _filetime(stamp) * 2 if kind == 5 else b"\0" * 16
        directory += (encoded.ljust(64, b"\0") + struct.pack("<HBB3I", len(encoded), kind, 1, *links[index])
                      + b"\0" * 16 + b"\0" * 4 + times + struct.pack("<IQ", start, size))
    while len(directory) % _SECTOR:
        directory += (b"\0" * 64 + struct.pack("<HBB3I", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM)
                      + b"\0" * 36 + struct.pack("<IQ", 0, 0))
    directory_start = place(bytes(directory), _SECTOR)

    fat_sectors = 1
    while (len(sectors) + fat_sectors) * 4 > fat_sectors * _SECTOR:
        fat_sectors += 1
    first_fat = len(sectors)
    fat += [_FATSECT] * fat_sectors
    fat += [_FREE] * (fat_sectors * _SECTOR // 4 - len(fat))
    table = b"".join(struct.pack("<I", v) for v in fat)
    sectors += [table[i * _SECTOR:(i + 1) * _SECTOR] for i in range(fat_sectors)]
    difat = [first_fat + i for i in range(fat_sectors)] + [_FREE] * (109 - fat_sectors)
    header = (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 16
              + struct.pack("<5H6x9I", 0x3E, 3, 0xFFFE, 9, 6, 0, fat_sectors, directory_start, 0,
                            _CUTOFF, mini_fat_start if mini_fat else _END, -(-len(mini_fat) * 4 // _SECTOR),
                            _END, 0)
              + b"".join(struct.pack("<I", v) for v in difat))
    return header + b"".join(sectors)


_SUMMARY = bytes.fromhex("e0859ff2f94f6810ab9108002b27b3d9")  # FMTID_SummaryInformation
_DOC_SUMMARY = bytes.fromhex("02d5cdd59c2e1b10939708002b2cf9ae")  # FMTID_DocSummaryInformation


def property_set(fmtid: bytes, properties: dict[int, object]) -> bytes:
    """A property set stream (MS-OLEPS) with one section: str -> VT_LPSTR, int -> VT_I4 (1: VT_I2
    code page), ("time", unix) -> VT_FILETIME."""
    values = []
    for pid, value in properties.items():
        if isinstance(value, tuple):
            data = struct.pack("<I", 0x40) + _filetime(value[1])
        elif isinstance(value, str):
            text = value.encode("cp1252") + b"\0"
            data = struct.pack("<II", 0x1E, len(text)) + text.ljust(-(-len(text) // 4) * 4, b"\0")
        elif pid == 1:
            data = struct.pack("<IhH", 0x02, value, 0)
        else:
            data = struct.pack("<Ii", 0x03, value)
        values.append((pid, data))
    offset = 8 + 8 * len(values)
    index, body = bytearray(), bytearray()
    for pid, data in values:
        index += struct.pack("<II", pid, offset + len(body))
        body += data
    section = struct.pack("<II", offset + len(body), len(values)) + index + body
    return (struct.pack("<HHI", 0xFFFE, 0, 0x00020006) + b"\0" * 16 + struct.pack("<I", 1) + fmtid
            + struct.pack("<I", 48) + section)


def _summaries(rnd: random.Random, title: str, application: str, stamp: int, extra: dict) -> dict[str, bytes]:
    author = rnd.choice(_NAMES)
    return {
        "\x05SummaryInformation": property_set(_SUMMARY, {
            1: 1252, 2: title, 4: author, 7: "Normal.dotm" if "Word" in application else "",
            8: rnd.choice(_NAMES), 9: str(rnd.randint(2, 14)), 0x12: application,
            0x0C: ("time", stamp - 86400 * 9), 0x0D: ("time", stamp), 0x13: 0, **extra}),
        "\x05DocumentSummaryInformation": property_set(_DOC_SUMMARY, {1: 1252, 0x0F: "Northwind Traders"}),
    }


def word_doc() -> bytes:
    """A Word 97 document: its text in the WordDocument stream (8-bit, one piece), the piece table in
    1Table, and the summary information."""
    rnd = random.Random(_SEED + 5)
    text = "\r".join(["Supplier agreement - draft for review", ""] + [_paragraph(rnd) for _ in range(90)]) + "\r"
    body = text.encode("cp1252")
    fc_min = 0x800
    clx = (b"\x02" + struct.pack("<I", 4 * 2 + 8) + struct.pack("<II", 0, len(body))
           + struct.pack("<HIH", 0, (fc_min * 2) | 0x40000000, 0))
    table = clx.ljust(4096, b"\0")
    fib_base = struct.pack("<7HIBBHHII", 0xA5EC, 0x00C1, 0, 0x0409, 0, 0x1200, 0x00BF, 0, 0, 0, 0, 0, 0, 0)
    rg_w = struct.pack("<H", 14) + b"\0" * 28
    rg_lw = struct.pack("<H", 22) + struct.pack("<22I", fc_min + len(body), 0, 0, len(body), *([0] * 18))
    fc_lcb = [0] * (0x5D * 2)
    fc_lcb[33 * 2], fc_lcb[33 * 2 + 1] = 0, len(clx)  # fcClx / lcbClx: the piece table
    rg_fc = struct.pack("<H", 0x5D) + struct.pack(f"<{len(fc_lcb)}I", *fc_lcb) + struct.pack("<H", 0)
    fib = fib_base + rg_w + rg_lw + rg_fc
    document = fib.ljust(fc_min, b"\0") + body
    document = document.ljust(-(-len(document) // 512) * 512, b"\0")
    stamp = _EPOCH_2023 + rnd.randint(0, 300) * 86400
    words = len(text.split())
    return compound_file({"WordDocument": document, "1Table": table, **_summaries(
        rnd, "Supplier agreement", "Microsoft Office Word", stamp,
        {0x0E: 3, 0x0F: words, 0x10: len(body)})}, stamp)


def _record(kind: int, data: bytes = b"") -> bytes:
    return struct.pack("<HH", kind, len(data)) + data


def excel_xls() -> bytes:
    """An Excel 97 workbook (BIFF8): one sheet of figures, strings in a shared string table."""
    rnd = random.Random(_SEED + 6)
    header = ["Date", "Region", "Product", "Units", "Unit price", "Revenue"]
    strings = header + list(_REGIONS) + list(_PRODUCTS) + [f"2023-{m:02d}" for m in range(1, 13)]
    index = {s: i for i, s in enumerate(strings)}
    rows = [[index[h] for h in header]]
    numbers = []
    for _ in range(700):
        units, price = rnd.randint(1, 480), rnd.choice((19.9, 24.5, 39.0, 129.0, 249.0))
        rows.append([index[f"2023-{rnd.randint(1, 12):02d}"], index[rnd.choice(_REGIONS)],
                     index[rnd.choice(_PRODUCTS)]])
        numbers.append((units, price, round(units * price, 2)))

    def xf(style: bool) -> bytes:
        return _record(0x00E0, struct.pack("<HHHBBBBIIH", 0, 0, 0xFFF5 if style else 0x0001, 0x20, 0, 0, 0, 0,
                                           0, 0x20C0))

    sst = struct.pack("<II", len(strings) + 3 * (len(rows) - 1), len(strings)) + b"".join(
        struct.pack("<HB", len(s), 0) + s.encode("latin-1") for s in strings)
    globals_ = [_record(0x0809, struct.pack("<HHHHII", 0x0600, 0x0005, 0x2775, 0x07CD, 0x000100C9, 0x00000606)),
                _record(0x0042, struct.pack("<H", 1200)),
                _record(0x003D, struct.pack("<HHHHHHHHH", 0x0168, 0x001E, 0x3A5C, 0x23BE, 0x0038, 0, 0, 1, 0x0258))]
    font = struct.pack("<HHHHHBBBB", 200, 0, 0x7FFF, 400, 0, 0, 0, 0, 0) + struct.pack("<BB", 5, 1) + "Arial".encode("utf-16-le")
    globals_ += [_record(0x0031, font)] * 4
    globals_ += [xf(True)] * 15 + [xf(False)]
    globals_ += [_record(0x0293, struct.pack("<HBB", 0x8000, 0, 0xFF))]
    sheet_name = "Figures 2023"
    boundsheet_at = sum(map(len, globals_))
    boundsheet = _record(0x0085, struct.pack("<IBB", 0, 0, 0) + struct.pack("<BB", len(sheet_name), 0)
                         + sheet_name.encode("latin-1"))
    tail = [_record(0x00FC, sst), _record(0x000A)]
    sheet_at = boundsheet_at + len(boundsheet) + sum(map(len, tail))
    boundsheet = boundsheet[:4] + struct.pack("<I", sheet_at) + boundsheet[8:]
    sheet = [_record(0x0809, struct.pack("<HHHHII", 0x0600, 0x0010, 0x2775, 0x07CD, 0x000100C9, 0x00000606)),
             _record(0x0200, struct.pack("<IIHHH", 0, len(rows), 0, len(header), 0))]
    for row, cells in enumerate(rows):
        for col, string in enumerate(cells):
            sheet.append(_record(0x00FD, struct.pack("<HHHI", row, col, 15, string)))
        if row:
            for col, value in enumerate(numbers[row - 1], start=3):
                sheet.append(_record(0x0203, struct.pack("<HHHd", row, col, 15, float(value))))
    sheet += [_record(0x023E, struct.pack("<HHHHHHHHH", 0x06B6, 0, 0, 0x40, 0, 0, 0, 0, 0)), _record(0x000A)]
    workbook = b"".join(globals_) + boundsheet + b"".join(tail) + b"".join(sheet)
    stamp = _EPOCH_2023 + rnd.randint(0, 300) * 86400
    return compound_file({"Workbook": workbook, **_summaries(rnd, "Sales figures 2023", "Microsoft Excel",
                                                             stamp, {})}, stamp)


def contents() -> dict[str, bytes]:
    """Each decoy's content by extension (Elkeid's six)."""
    return {"csv": figures(), "png": photo_png(), "txt": notes(), "xls": excel_xls(), "doc": word_doc(),
            "pdf": report_pdf()}
