"""The task frame reader: a stream out of step (a length over the cap, a body that never completes) is
reported and the reader gets back in step; hypothesis fuzzes the decoder and the reader."""

from __future__ import annotations

import os
import queue
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from elkscan_elkeid_transport.wire import MAX_TASK_SIZE, FrameReader, Task, WireError, decode_task

TASK_TYPES = {6050, 6051, 6052, 6053, 6054, 6057}


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def task_body(bridge, data_type: int = 6053, data: str = '{"exe": "/etc/hostname"}', token: str = "") -> bytes:
    return bridge["Task"](data_type=data_type, object_name="scanner", data=data, token=token).SerializeToString()


class Pipe:
    """A task pipe whose writer stays open (as the agent's does), read by a FrameReader on a thread."""

    def __init__(self, **options) -> None:
        self.r, self.w = os.pipe()
        self.items: queue.Queue = queue.Queue()
        options.setdefault("accept", lambda task: task.data_type in TASK_TYPES)
        self.reader = FrameReader(self.r, **options)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.reader:
                self.items.put(item)
        except BaseException as exc:  # reported to the test by next()
            self.items.put(exc)
        self.items.put(None)

    def write(self, data: bytes) -> None:
        threading.Thread(target=os.write, args=(self.w, data), daemon=True).start()  # may exceed the pipe

    def next(self, timeout: float = 5.0):
        item = self.items.get(timeout=timeout)
        if isinstance(item, BaseException) and not isinstance(item, WireError):
            raise item
        return item

    def close(self) -> list:
        """Hang up; everything the reader still yields (it must end at EOF)."""
        os.close(self.w)
        rest = []
        while (item := self.next()) is not None:
            rest.append(item)
        self.thread.join(5)
        os.close(self.r)
        return rest


def test_a_length_of_4_gib_is_reported_and_the_next_task_is_read(bridge):
    """Audit F2: 0xFFFFFFFF was taken as a 4 GiB frame that swallowed every later task, silently."""
    pipe = Pipe()
    body = task_body(bridge, token="after")
    pipe.write(b"\xff\xff\xff\xff" + frame(body))
    error = pipe.next()
    assert isinstance(error, WireError) and "4294967295 bytes is over the" in str(error)
    assert "resynchronising" in str(error)
    assert pipe.next() == body  # no end of file needed: the reader is back in step
    assert pipe.close() == []


def test_a_body_that_never_completes_is_reported_after_the_stall_and_the_reader_gets_back_in_step(bridge):
    pipe = Pipe(stall=0.3)
    pipe.write(frame(b"\x08\x05" + b"x" * 98)[:50])  # a header of 100 bytes, then half of it
    started = time.monotonic()
    error = pipe.next()
    assert isinstance(error, WireError) and "says 100 bytes but 46 arrived in 0.3 s" in str(error)
    assert time.monotonic() - started < 5
    body = task_body(bridge, token="next")
    pipe.write(frame(body))
    assert pipe.next() == body
    assert pipe.close() == []


def test_while_out_of_step_a_candidate_still_waiting_for_bytes_does_not_hold_back_a_whole_task(bridge):
    """``00 00 10 00 08`` looks like the start of a 1 MiB frame that will never complete."""
    pipe = Pipe()
    body = task_body(bridge, token="whole")
    pipe.write(b"\xff\xff\xff\xff" + b"junk\x00\x00\x10\x00\x08\x01" + frame(body))
    assert isinstance(pipe.next(), WireError)
    assert pipe.next() == body
    assert pipe.close() == []


def test_an_oversized_frame_of_17_mib_is_skipped_and_the_stream_stays_in_step(bridge):
    pipe = Pipe()
    body = task_body(bridge, token="after-big")
    pipe.write(frame(b"x" * (17 << 20)) + frame(body))
    assert "over the 16777216-byte limit" in str(pipe.next())
    assert pipe.next(timeout=30) == body
    assert pipe.close() == []


def test_a_partial_frame_at_end_of_file_is_end_of_file(bridge):
    pipe = Pipe()
    body = task_body(bridge)
    pipe.write(frame(body) + frame(body)[:7])
    assert pipe.next() == body
    time.sleep(0.2)
    assert pipe.close() == []


# -- fuzzing: only WireError, never a hang ----------------------------------------------------------

EXAMPLES = int(os.environ.get("ELKSCAN_FUZZ_EXAMPLES", 400))
counted: dict[str, int] = {}


def count(name: str) -> None:
    counted[name] = counted.get(name, 0) + 1


@settings(max_examples=EXAMPLES * 5, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decode_task_arbitrary_bytes_only_wire_errors(body):
    count("decode arbitrary bytes")
    try:
        task = decode_task(body)
    except WireError:
        return
    assert isinstance(task, Task)
    assert -(1 << 31) <= task.data_type < 1 << 31


@settings(max_examples=EXAMPLES, deadline=None)
@given(data_type=st.integers(-(1 << 31), (1 << 31) - 1), object_name=st.text(), data=st.text(), token=st.text())
def test_fuzz_decode_task_agrees_with_protobuf(bridge, data_type, object_name, data, token):
    count("decode protobuf tasks")
    body = bridge["Task"](data_type=data_type, object_name=object_name, data=data, token=token).SerializeToString()
    assert decode_task(body) == Task(data_type, object_name, data, token)


bodies = st.binary(max_size=200)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(bodies, max_size=8))
def test_fuzz_well_formed_streams_give_exactly_their_frames(items):
    count("well-formed streams")
    r, w = os.pipe()
    os.write(w, b"".join(frame(b) for b in items))
    os.close(w)
    out = list(FrameReader(r, stall=5))
    os.close(r)
    assert out == items


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, 64))
def test_fuzz_arbitrary_streams_end_at_end_of_file_with_frames_or_wire_errors(data, max_size):
    count("arbitrary streams")
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    started = time.monotonic()
    out = list(FrameReader(r, max_size=max_size, stall=5))
    os.close(r)
    assert time.monotonic() - started < 5  # the writer hung up: nothing is waited for
    assert all(isinstance(x, WireError) or (isinstance(x, bytes) and len(x) <= max_size) for x in out)
    assert sum(len(x) + 4 for x in out if isinstance(x, bytes)) <= len(data)


@settings(max_examples=EXAMPLES // 2, deadline=None)
@example(junk=b"4", header=0x02000000)  # both copies swallowed: heard at the agent's next task
@given(junk=st.binary(max_size=300), header=st.integers(MAX_TASK_SIZE + 1, (1 << 32) - 1))
def test_fuzz_a_stream_out_of_step_hears_the_next_task_while_the_agent_keeps_the_pipe_open(bridge, junk, header):
    """Garbage, a length over the cap, more garbage, then the same task twice: the reader must yield
    that task without waiting for end of file. The garbage may frame both copies into bogus bodies (junk
    b'4' makes a 52-byte length that swallows the first copy and the second's length): then the task the
    agent sends next is heard, so the test sends it again while nothing comes, as the agent would."""
    count("out-of-step streams (writer open)")
    pipe = Pipe(stall=0.2)
    probe = task_body(bridge, token="probe")
    pipe.write(junk + struct.pack("<I", header) + junk + frame(probe) * 2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            item = pipe.next(timeout=1)
        except queue.Empty:
            pipe.write(frame(probe))  # the agent's next task
            continue
        assert item is not None, "the reader ended without end of file"
        assert isinstance(item, (bytes, WireError))
        if isinstance(item, bytes):
            try:
                task = decode_task(item)  # junk may frame as a body that is no task: the source logs it
            except WireError:
                continue
            if task.token == "probe":
                break
    else:
        raise AssertionError("the task was never heard")
    pipe.close()


def test_zz_fuzz_counts():
    """Prints how many examples each fuzz test ran (pytest -s shows it)."""
    print(f"\nfuzz examples run: {counted}")
    assert not counted or all(n > 0 for n in counted.values())
