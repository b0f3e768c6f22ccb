"""The spool on real files: what is appended is read back once acknowledged, survives reopening, is
bounded (the oldest dropped and counted), and a write torn by a crash is detected and skipped."""

import os
import stat
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_core.delivery.spool import ACK_FILE, Item, Spool, frame, parse_frames
from elkscan_core.trust import UntrustedError


def doc(n: int, pad: int = 40) -> bytes:
    return b'{"n": %d, "pad": "%s"}' % (n, b"x" * pad)


def fill(spool: Spool, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        assert spool.append(f"id{n}", doc(n))


def drain(spool: Spool, batch: int = 7) -> list[int]:
    seen = []
    while True:
        items, end = spool.read(batch)
        spool.ack(end)
        if not items:
            return seen
        seen += [int(item.id[2:]) for item in items]


def test_documents_come_back_in_order_once_and_acknowledged_ones_never_again(tmp_path):
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    fill(spool, 20)
    items, end = spool.read(5)
    assert [i.data for i in items] == [doc(n) for n in range(5)] and spool.depth == 20
    spool.ack(end)
    assert spool.depth == 15
    items, _ = spool.read(5)  # read, not acknowledged: delivery failed, say; then elkscan stops
    assert items[0].id == "id5"
    spool.close()
    again = Spool(str(tmp_path / "s"), 1 << 20)
    assert again.depth == 15 and drain(again) == list(range(5, 20)) and again.depth == 0
    again.close()
    assert drain(Spool(str(tmp_path / "s"), 1 << 20)) == []


def test_the_spool_is_private(tmp_path):
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    fill(spool, 3)
    spool.close()
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    for name in os.listdir(tmp_path / "s"):
        assert stat.S_IMODE(os.stat(tmp_path / "s" / name).st_mode) == 0o600, name
    os.chmod(tmp_path / "s", 0o755)  # a directory we own but that others could read is made private
    Spool(str(tmp_path / "s"), 1 << 20).close()
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
def test_a_spool_another_user_could_change_is_refused(tmp_path):
    os.chmod(tmp_path, 0o755)
    (tmp_path / "s").mkdir(mode=0o700)
    os.chown(tmp_path / "s", 65534, 65534)
    with pytest.raises(UntrustedError, match="owned by uid 65534"):
        Spool(str(tmp_path / "s"), 1 << 20)


def test_a_segment_replaced_by_a_link_is_not_followed(tmp_path):
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    fill(spool, 2)
    spool.close()
    (tmp_path / "elsewhere").write_bytes(frame("x", b"{}"))
    segment = next(p for p in (tmp_path / "s").iterdir() if p.suffix == ".seg")
    segment.unlink()
    segment.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        Spool(str(tmp_path / "s"), 1 << 20)


def test_a_full_spool_drops_the_oldest_and_counts_them(tmp_path):
    spool = Spool(str(tmp_path / "s"), 4096)  # segments of 512 bytes: 5 documents of 90 bytes each
    fill(spool, 100)
    assert spool.size <= 4096
    kept = drain(spool)
    assert spool.dropped == 100 - len(kept) > 0
    assert kept == list(range(100 - len(kept), 100))  # the newest, in order, none twice


def test_acknowledged_records_are_not_counted_as_dropped(tmp_path):
    spool = Spool(str(tmp_path / "s"), 4096)
    fill(spool, 40)
    assert spool.dropped == 0
    drain(spool)
    fill(spool, 40, start=40)
    assert spool.dropped == 0 and drain(spool) == list(range(40, 80))


def test_a_document_larger_than_the_spool_is_refused(tmp_path):
    spool = Spool(str(tmp_path / "s"), 1024)
    assert not spool.append("big", b"x" * 2000)
    assert spool.dropped == 1 and spool.depth == 0
    with pytest.raises(ValueError):
        spool.append("nl", b"two\nlines")
    with pytest.raises(ValueError):
        spool.append("not an id", b"{}")


def test_a_write_torn_by_a_crash_is_cut_off_and_the_spool_goes_on(tmp_path, caplog):
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    fill(spool, 10)
    spool.close()
    segment = max((tmp_path / "s").glob("*.seg"))
    whole = frame("id10", doc(10))
    with open(segment, "ab") as f:
        f.write(whole[: len(whole) // 2])  # the process died in the middle of this write
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    assert "torn by a crash" in caplog.text
    fill(spool, 5, start=10)  # appended after the cut, not after the garbage
    assert drain(spool) == list(range(15))


def test_a_damaged_line_in_the_middle_is_skipped_and_counted(tmp_path):
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    fill(spool, 10)
    spool.close()
    segment = max((tmp_path / "s").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    third = data.index(b'"n": 3')
    data[third + 6] ^= 0x01  # one flipped bit in the fourth document
    segment.write_bytes(bytes(data))
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    assert drain(spool) == [0, 1, 2, 4, 5, 6, 7, 8, 9] and spool.damaged == 1


def test_a_damaged_acknowledgement_redelivers_rather_than_loses(tmp_path, caplog):
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    fill(spool, 10)
    items, end = spool.read(4)
    spool.ack(end)
    spool.close()
    (tmp_path / "s" / ACK_FILE).write_bytes(b"\x00garbage")
    assert drain(Spool(str(tmp_path / "s"), 1 << 20)) == list(range(10))
    assert "damaged" in caplog.text


def test_delivered_segments_are_deleted(tmp_path):
    spool = Spool(str(tmp_path / "s"), 8192)
    fill(spool, 60)
    assert len(list((tmp_path / "s").glob("*.seg"))) > 3
    drain(spool)
    assert len(list((tmp_path / "s").glob("*.seg"))) == 1 and spool.depth == 0


# -- fuzz: the reader of what a crash (or anything) left on disk -------------------------------------

@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_frames_of_arbitrary_bytes(data):
    last = 0
    for item, end in parse_frames(data):
        assert last < end <= len(data) and data[end - 1:end] == b"\n"
        if item is not None:
            line = data[last:end - 1]
            assert line.endswith(item.data) and b"\n" not in item.data
            assert zlib.crc32(item.id.encode() + b" " + item.data) == int(line[:8], 16)
        last = end


ids = st.text("0123456789abcdef", max_size=32)
payloads = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" "))


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(st.tuples(ids, payloads), st.binary(max_size=60)), max_size=30))
def test_fuzz_intact_frames_survive_any_garbage_between_lines(parts):
    """Frames with garbage lines between them: every intact frame is found, nothing else is."""
    data, expected = b"", []
    for part in parts:
        if isinstance(part, tuple):
            data += frame(*part)
            expected.append(Item(*part))
        else:
            data += part.replace(b"\n", b"") + b"\n"
    found = [item for item, _ in parse_frames(data) if item is not None]
    assert found == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(st.binary(max_size=400), min_size=1, max_size=3), ack=st.binary(max_size=60),
       valid=st.lists(payloads, max_size=5))
def test_fuzz_a_spool_directory_with_arbitrary_contents_opens_and_reads(tmp_path_factory, segments, ack, valid):
    directory = tmp_path_factory.mktemp("fuzz")
    os.chmod(directory, 0o700)
    for number, data in enumerate(segments):
        body = b"".join(frame(f"v{i}", p) for i, p in enumerate(valid)) if number == 0 else b""
        (directory / f"{number:016d}.seg").write_bytes(body + data)
    (directory / ACK_FILE).write_bytes(ack)
    spool = Spool(str(directory), 1 << 20)
    depth = spool.depth
    seen = []
    while True:
        items, end = spool.read(3)
        spool.ack(end)
        if not items:
            break
        seen += items
    assert len(seen) <= depth and spool.depth == 0
    spool.append("after", b"{}")
    assert spool.read(10)[0][-1] == Item("after", b"{}")
    spool.close()


def test_two_sessions_never_share_a_spool(tmp_path):
    spool = Spool(str(tmp_path / "s"), 1 << 20)
    with pytest.raises(BlockingIOError):
        Spool(str(tmp_path / "s"), 1 << 20)
    spool.close()
    Spool(str(tmp_path / "s"), 1 << 20).close()


def test_a_write_that_fails_half_way_leaves_no_torn_line_behind(tmp_path):
    """A full disk (here RLIMIT_FSIZE: the kernel writes up to the limit, then refuses) must not leave
    half a frame for the next document to be glued to."""
    import resource
    import signal

    spool = Spool(str(tmp_path / "s"), 1 << 20)
    fill(spool, 3)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (spool.size + 30, limits[1]))
        with pytest.raises(OSError):
            spool.append("big", b"x" * 200)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    fill(spool, 2, start=3)
    assert drain(spool) == [0, 1, 2, 3, 4] and spool.damaged == 0
