"""The agent's pipe protocol: 4-byte little-endian length + protobuf, in both directions.

Records are encoded by hand because the agent does not parse them as general protobuf: it expects
``08 <data_type> 10 <timestamp> 1a <len> <payload>`` in exactly that order, with field 3 present even
when empty (docs/elkeid-protocol.md section 2). Tasks are decoded tolerantly (any field order, unknown fields
skipped), so no protobuf runtime is needed.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator, Mapping

from attrs import frozen

#: A task frame larger than this is skipped rather than held in memory (tasks are tiny JSON).
MAX_TASK_SIZE = 16 * 1024 * 1024


class WireError(ValueError):
    """Bytes from the agent that are not a valid ``Task``; the reader reports them and goes on."""


@frozen
class Task:
    """``message Task { int32 data_type = 1; string object_name = 2; string data = 3; string token = 4; }``"""

    data_type: int = 0
    object_name: str = ""
    data: str = ""
    token: str = ""


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative values as their 64-bit two's complement, as protobuf does."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + varint(len(data)) + data


#: Surrogates that are not the ``surrogateescape`` form of a byte (a lone U+D800 from a task's JSON).
_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def utf8(value: str) -> bytes:
    """``value`` as protobuf's valid UTF-8. A name that is not UTF-8 (``os.fsdecode`` keeps its bytes as
    surrogates) goes out as Elkeid's ``to_string_lossy`` sends it: U+FFFD for each bad sequence."""
    try:
        return value.encode()
    except UnicodeEncodeError:
        raw = _LONE_SURROGATE.sub("\ufffd", value).encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "replace").encode()


def encode_payload(fields: Mapping[str, str]) -> bytes:
    """``Payload { map<string,string> fields = 1; }``: one ``0a len (0a klen key 12 vlen value)`` per item."""
    out = bytearray()
    for key, value in fields.items():
        entry = _length_delimited(0x0A, utf8(key)) + _length_delimited(0x12, utf8(value))
        out += _length_delimited(0x0A, entry)
    return bytes(out)


def encode_record(data_type: int, timestamp: int, fields: Mapping[str, str]) -> bytes:
    """One framed ``Record`` in the fixed order the agent's parser reads."""
    if data_type <= 0 or timestamp <= 0:
        raise ValueError(f"data_type and timestamp must be positive, got {data_type}, {timestamp}")
    body = (b"\x08" + varint(data_type) + b"\x10" + varint(timestamp)
            + _length_delimited(0x1A, encode_payload(fields)))
    return struct.pack("<I", len(body)) + body


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError(f"truncated varint at byte {pos}")
        if shift >= 70:
            raise WireError(f"varint longer than 10 bytes at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


_STRING_FIELDS = {2: "object_name", 3: "data", 4: "token"}


def decode_task(body: bytes) -> Task:
    """Parse a ``Task``; raise WireError saying what is wrong and at which byte."""
    values: dict[str, object] = {}
    pos = 0
    while pos < len(body):
        key, pos = _read_varint(body, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if number in (1, *_STRING_FIELDS) and wire_type != (0 if number == 1 else 2):
            raise WireError(f"field {number} has wire type {wire_type}, expected {0 if number == 1 else 2}")
        if wire_type == 0:
            value, pos = _read_varint(body, pos)
            if number == 1:
                value &= 0xFFFFFFFF  # int32: keep the low 32 bits, signed
                values["data_type"] = value - (1 << 32) if value >= 1 << 31 else value
        elif wire_type == 2:
            length, pos = _read_varint(body, pos)
            if pos + length > len(body):
                raise WireError(f"field {number} says {length} bytes but only {len(body) - pos} remain")
            chunk = body[pos:pos + length]
            pos += length
            if number in _STRING_FIELDS:
                try:
                    values[_STRING_FIELDS[number]] = chunk.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise WireError(f"field {_STRING_FIELDS[number]} is not UTF-8: {exc}") from None
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(body):
                raise WireError(f"truncated fixed-size field {number}")
        else:
            raise WireError(f"unsupported wire type {wire_type} for field {number} at byte {pos}")
    return Task(**values)  # type: ignore[arg-type]


def _read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``; None at end of file (a partial frame at EOF counts as EOF)."""
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frames(fd: int) -> Iterator[bytes | WireError]:
    """Frames from the agent until end of file. An oversized frame is skipped and reported as a
    WireError item, so the stream stays in step and the reader goes on."""
    while True:
        header = _read_exact(fd, 4)
        if header is None:
            return
        (length,) = struct.unpack("<I", header)
        if length > MAX_TASK_SIZE:
            remaining = length
            while remaining:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    return
                remaining -= len(chunk)
            yield WireError(f"a task frame of {length} bytes is over the {MAX_TASK_SIZE}-byte limit; skipped")
            continue
        body = _read_exact(fd, length)
        if body is None:
            return
        yield body
