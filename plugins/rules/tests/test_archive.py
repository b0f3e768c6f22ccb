"""Downloaded archives are extracted only into a private directory, only when every entry is safe; and
the extractor is fuzzed on arbitrary and damaged archives (their bytes come from the network)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_core.bundle import Limits
from elkscan_rules.archive import ArchiveError, extract, safe_name

FUZZ_EXAMPLES = int(os.environ.get("ELKSCAN_FUZZ_EXAMPLES", "1000"))


def make_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def make_tar(entries: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["zip", "w", "w:gz", "w:bz2", "w:xz"])
def test_a_good_archive_is_extracted_privately(tmp_path, mode):
    entries = {"rules/a.yar": b"rule A { condition: true }", "rules/sub/b.yar": b"rule B { condition: true }"}
    data = make_zip(entries) if mode == "zip" else make_tar(entries, mode)
    (tmp_path / "in").write_bytes(data)
    written = extract(str(tmp_path / "in"), str(tmp_path / "out"), "test archive")
    assert sorted(written) == sorted(entries)
    for name, content in entries.items():
        path = tmp_path / "out" / name
        assert path.read_bytes() == content and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out" / "rules").stat().st_mode) == 0o700


def test_safe_names():
    assert safe_name("a/b.yar") and safe_name(".github/x.yar")
    for name in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a\\b", "a\0b", "x" * 256):
        assert not safe_name(name)


def test_a_failure_leaves_nothing(tmp_path):
    data = make_tar({"a.yar": b"x" * 1000, "b.yar": b"y" * 1000}, "w")
    (tmp_path / "in").write_bytes(data[:1500])  # cut inside the second entry
    with pytest.raises(ArchiveError):
        extract(str(tmp_path / "in"), str(tmp_path / "out"), "test archive")
    assert not (tmp_path / "out").exists()


def test_caps(tmp_path):
    (tmp_path / "many").write_bytes(make_zip({f"{i}.yar": b"x" for i in range(20)}))
    with pytest.raises(ArchiveError, match="more than 10 entries"):
        extract(str(tmp_path / "many"), str(tmp_path / "o1"), "a", Limits(max_entries=10))
    (tmp_path / "big").write_bytes(make_tar({"a.yar": os.urandom(5000)}, "w:gz"))
    with pytest.raises(ArchiveError, match="more than"):
        extract(str(tmp_path / "big"), str(tmp_path / "o2"), "a", Limits(max_total_size=4000))


_NAMES = st.sampled_from(["a.yar", "d/b.yar", "../x", "/abs", "d/", ".", "./c.yar", "x" * 300, "a\\b", "d/a.yar"])


@st.composite
def archives(draw):
    entries = draw(st.dictionaries(_NAMES, st.binary(max_size=200), max_size=4))
    kind = draw(st.sampled_from(["zip", "w", "w:gz", "w:bz2", "w:xz"]))
    data = make_zip(entries) if kind == "zip" else make_tar(entries, kind)
    how = draw(st.sampled_from(["whole", "cut", "flip"]))
    if how == "cut" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "flip" and data:
        index = draw(st.integers(0, len(data) - 1))
        data = data[:index] + bytes([data[index] ^ draw(st.integers(1, 255))]) + data[index + 1:]
    return data


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(archives(), st.binary(max_size=600),
                 st.binary(max_size=300).map(lambda b: b"PK\x03\x04" + b),
                 st.binary(max_size=300).map(lambda b: b"\x1f\x8b" + b)))
def test_fuzz_extract(tmp_path_factory, data):
    """Whole, cut and bit-flipped archives of every kind, and junk: extracted inside the directory, or
    ArchiveError and nothing left (1,000 examples by default; ELKSCAN_FUZZ_EXAMPLES)."""
    base = tmp_path_factory.mktemp("fuzz")
    (base / "in").write_bytes(data)
    out = base / "out"
    try:
        written = extract(str(base / "in"), str(out), "fuzz", Limits(max_total_size=1 << 20))
    except ArchiveError:
        assert not out.exists()
    else:
        for name in written:
            assert safe_name(name) and (out / name).is_file() and not (out / name).is_symlink()
        real = os.path.realpath(out)
        for directory, dirs, files in os.walk(out):
            for entry in dirs + files:
                assert os.path.realpath(os.path.join(directory, entry)).startswith(real + os.sep)
