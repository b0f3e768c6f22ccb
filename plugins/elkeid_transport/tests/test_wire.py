"""The pipe protocol: records byte-compatible with the agent's fixed-order parser and with protobuf;
tasks decoded whatever the field order, malformed ones reported."""

from __future__ import annotations

import os
import struct

import pytest

from elkscan_elkeid_transport.wire import Task, WireError, decode_task, encode_record, varint


def test_record_layout_is_the_fixed_order_the_agent_reads(parse_as_agent, decode):
    framed = encode_record(6001, 1_700_000_000, {"types": "Unix", "exe": "/usr/bin/é"})
    (length,) = struct.unpack_from("<I", framed)
    body = framed[4:]
    assert length == len(body)
    assert body[0] == 0x08 and body[1:3] == varint(6001) and body[3] == 0x10
    data_type, timestamp, payload, skipped = parse_as_agent(body)
    assert (data_type, timestamp, skipped) == (6001, 1_700_000_000, b"\x08\x10\x1a")
    assert payload.startswith(b"\x0a")
    (record,) = decode(framed)
    assert record.fields == {"types": "Unix", "exe": "/usr/bin/é"}


def test_an_empty_payload_is_still_sent(decode, bridge):
    framed = encode_record(6010, 1_700_000_000, {})
    assert framed.endswith(b"\x1a\x00")
    assert decode(framed)[0].fields == {}
    standard = bridge["Record"](data_type=6010, timestamp=1_700_000_000).SerializeToString()
    assert not standard.endswith(b"\x1a\x00")  # what a plain protobuf serializer would get wrong


def test_large_values_and_many_fields(decode):
    fields = {f"k{i}": "v" * i for i in range(300)}
    (record,) = decode(encode_record(1010, 4_000_000_000 - 1, fields))
    assert record.fields == fields


@pytest.mark.parametrize("data_type,timestamp", [(0, 1), (6000, 0), (-1, 5)])
def test_zero_data_type_or_timestamp_is_refused(data_type, timestamp):
    with pytest.raises(ValueError):
        encode_record(data_type, timestamp, {})


def test_tasks_decode_from_protobuf_in_any_field_order_with_unknown_fields(bridge):
    standard = bridge["Task"](data_type=6053, object_name="scanner", data='{"exe":"/x"}', token="t1")
    assert decode_task(standard.SerializeToString()) == Task(6053, "scanner", '{"exe":"/x"}', "t1")

    def ld(number: int, data: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(data)) + data

    reordered = (ld(4, b"tok") + varint(9 << 3) + varint(12345) + ld(3, b"{}") + varint(10 << 3 | 1) + b"\0" * 8
                 + ld(11, b"future") + varint(12 << 3 | 5) + b"\0" * 4 + varint(1 << 3) + varint(6057))
    assert decode_task(reordered) == Task(data_type=6057, data="{}", token="tok")
    negative = bridge["Task"](data_type=-5).SerializeToString()
    assert decode_task(negative).data_type == -5
    assert decode_task(b"") == Task()


@pytest.mark.parametrize("body,message", [
    (b"\x08", "truncated varint"),
    (b"\x1a\x05abc", "says 5 bytes but only 3 remain"),
    (b"\x1a\x02\xff\xfe", "not UTF-8"),
    (b"\x0a\x01x", "field 1 has wire type 2"),
    (b"\x0b", "field 1 has wire type 3"),
    (b"\x2b", "unsupported wire type 3 for field 5"),
    (b"\x00\x01", "field number 0"),
    (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
])
def test_malformed_tasks_say_what_is_wrong(body, message):
    with pytest.raises(WireError, match=message):
        decode_task(body)


def test_a_name_that_is_not_utf8_goes_out_as_elkeid_sends_it(decode):
    """Elkeid sends paths with Rust's ``to_string_lossy``: U+FFFD for each bad sequence, never a dropped
    record. Keys and values alike (a task's JSON may carry a lone surrogate)."""
    name = os.fsdecode(b"/srv/mal\xff.com")  # what os.scandir gives for that name
    fields = {"static_file": name, "argv": os.fsdecode(b"sh -c \xe2\x82"), "k\ud800": "v\udfff", "ok": "é"}
    (record,) = decode(encode_record(6003, 1_700_000_000, fields))
    assert record.fields == {"static_file": "/srv/mal\ufffd.com", "argv": "sh -c \ufffd", "k\ufffd": "v\ufffd",
                             "ok": "é"}
