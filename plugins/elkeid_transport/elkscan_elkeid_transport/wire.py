"""The agent's pipe protocol: 4-byte little-endian length + protobuf, in both directions.

Records are encoded by hand because the agent does not parse them as general protobuf: it expects
``08 <data_type> 10 <timestamp> 1a <len> <payload>`` in exactly that order, with field 3 present even
when empty (docs/elkeid-protocol.md section 2). Tasks are decoded tolerantly (any field order, unknown fields
skipped), so no protobuf runtime is needed.
"""

from __future__ import annotations

import os
import re
import select
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Optional

from attrs import frozen

#: A task frame larger than this is never held in memory (tasks are tiny JSON): its length is taken
#: for a stream out of step.
MAX_TASK_SIZE = 16 * 1024 * 1024
#: Seconds a frame's body may take to arrive after its header before the stream is taken as out of step.
FRAME_STALL = 10.0


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


class FrameReader:
    """Task frames from the agent's pipe, until end of file (a partial frame at EOF counts as EOF).

    The agent writes each task whole, in one write. So a length over ``max_size`` (``0xFFFFFFFF``
    read as a length would swallow the next 4 GiB), or a body still incomplete ``stall`` seconds after
    its header, means the stream is out of step. That is yielded as a WireError, and the reader
    resynchronises: it drops bytes until they start a whole frame that decodes as a task ``accept``
    takes. A corrupted header costs the tasks it overlaps, never the plugin's hearing.
    """

    def __init__(self, fd: int, *, max_size: Optional[int] = None, stall: float = FRAME_STALL,
                 accept: Callable[[Task], bool] = lambda task: task.data_type > 0) -> None:
        self.fd, self.stall, self.accept = fd, stall, accept
        self.max_size = MAX_TASK_SIZE if max_size is None else max_size
        self.buf = bytearray()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def _fill(self, timeout: Optional[float] = None) -> Optional[bool]:
        """Append what the pipe has: True, False when nothing came within ``timeout`` s, None at EOF."""
        if timeout is not None and not self._poll.poll(max(0, int(timeout * 1000))):
            return False
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        return True

    def __iter__(self) -> Iterator[bytes | WireError]:
        while True:
            while len(self.buf) < 4:
                if self._fill() is None:
                    return
            (length,) = struct.unpack_from("<I", self.buf)
            if length > self.max_size:
                yield WireError(f"a task frame length of {length} bytes is over the {self.max_size}-byte "
                                "limit: the task stream is out of step; resynchronising on the next whole task")
                if not self._resync():
                    return
                continue
            deadline = time.monotonic() + self.stall
            while len(self.buf) < 4 + length:
                remaining = deadline - time.monotonic()
                got = self._fill(remaining) if remaining > 0 else False
                if got is None:
                    return
                if not got:
                    yield WireError(f"a task frame says {length} bytes but {len(self.buf) - 4} arrived in "
                                    f"{self.stall:g} s: the task stream is out of step; resynchronising on "
                                    "the next whole task")
                    if not self._resync():
                        return
                    break
            else:
                body = bytes(self.buf[4:4 + length])
                del self.buf[:4 + length]
                yield body

    def _judge(self, at: int) -> Optional[bool]:
        """Whether a whole frame holding an accepted task starts at ``at``: None while bytes are missing."""
        if len(self.buf) < at + 5:
            return None
        (length,) = struct.unpack_from("<I", self.buf, at)
        # a Task from the agent starts with its data_type (field 1, varint: tag 0x08)
        if self.buf[at + 4] != 0x08 or length > self.max_size:
            return False
        if len(self.buf) < at + 4 + length:
            return None
        try:
            return self.accept(decode_task(bytes(self.buf[at + 4:at + 4 + length])))
        except WireError:
            return False

    def _resync(self) -> bool:
        """Drop bytes (at least the first) until the buffer starts with a whole accepted frame; False at
        EOF. The earliest whole frame wins over an earlier candidate still waiting for bytes."""
        waiting: list[int] = []  # candidates whose bytes have not all arrived, in order
        scanned = 1  # offsets below this are judged
        while True:
            for at in [*waiting, *self._candidates(scanned)]:
                verdict = self._judge(at)
                if verdict:
                    del self.buf[:at]
                    return True
                if verdict is None and at not in waiting:
                    waiting.append(at)
                elif verdict is False and at in waiting:
                    waiting.remove(at)
            scanned = max(scanned, len(self.buf) - 4)
            keep = min([scanned, *waiting])
            del self.buf[:keep]
            waiting = [at - keep for at in waiting]
            scanned -= keep
            if self._fill() is None:
                return False

    def _candidates(self, start: int) -> Iterator[int]:
        """Offsets from ``start`` whose fifth byte is 0x08, the first byte of a task."""
        at = self.buf.find(b"\x08", start + 4)
        while at >= 0:
            yield at - 4
            at = self.buf.find(b"\x08", at + 1)


def read_frames(fd: int, **options) -> Iterator[bytes | WireError]:
    """``FrameReader(fd, **options)``: task frame bodies, and WireError items for what was skipped."""
    return iter(FrameReader(fd, **options))
