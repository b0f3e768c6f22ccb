"""Rule bundles: building the Elkeid way, opening with every check, and every kind of damage refused
with its own clear message."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_core.bundle import (BundleError, Limits, build_bundle, open_bundle, read_sign, sha256_file,
                                 sign_path_for)
from elkscan_core.cli import main
from elkscan_core.errors import ElkscanError

PASSWORD = "clamav_default_passwd"


@pytest.fixture
def unpacked(tmp_path) -> Path:
    """A small stand-in for ``sigtool --unpack`` output: server and Windows signatures of each type."""
    folder = tmp_path / "unpacked"
    folder.mkdir()
    (folder / "daily.ndb").write_text("Unix.Trojan.Keep-1:0:*:6b656570\nWin.Trojan.Drop-1:0:*:64726f70\n"
                                      "Php.Webshell.Keep-2:0:*:3c3f706870\n")
    (folder / "main.ldb").write_text("Unix.Tool.Keep-3;Engine:51-255,Target:0;0;6b656570\n"
                                     "Win.Tool.Drop-4;Engine:51-255,Target:0;0;64726f70\n")
    md5 = hashlib.md5(b"x").hexdigest()
    sha256 = hashlib.sha256(b"y").hexdigest()
    (folder / "main.hdb").write_text(f"{md5}:1:Unix.Trojan.HashKeep-5\n{md5}:1:Win.Trojan.HashDrop-6\n")
    (folder / "main.hsb").write_text(f"{sha256}:*:Unix.Trojan.ShaKeep-7:73\n")
    (folder / "main.mdb").write_text("1024:0123456789abcdef0123456789abcdef:Win.Trojan.Section-8\n")
    return folder


@pytest.fixture
def yara_file(tmp_path) -> Path:
    path = tmp_path / "rules.yar"  # uses an external variable that the yara engine defines per file
    path.write_text('rule Unix_Test_Rule { strings: $a = "marker" condition: $a and filetype != "PNG" }\n')
    return path


@pytest.fixture
def bundle(tmp_path, unpacked, yara_file):
    return build_bundle(tmp_path / "out" / "archive_db_default_20240101.zip", version="20240101",
                        clamav=[unpacked], yara=[yara_file])


def test_build_keeps_server_signatures_and_exports_hashes(bundle, tmp_path):
    assert bundle.kept == {".ndb": 2, ".ldb": 1, ".hdb": 1, ".hsb": 1, ".yar": 1}
    assert bundle.dropped == {".ndb": 1, ".ldb": 1, ".hdb": 1, ".mdb": 1}
    assert bundle.files == ["main.hashes", "main.ldb", "main.ndb", "online_20240101.yar", "version"]
    assert read_sign(bundle.sign_path) == sha256_file(bundle.path) == bundle.sha256
    assert Path(bundle.sign_path).name == "archive_db_default_20240101.sign"

    opened = open_bundle(bundle.path, password=PASSWORD, version="20240101", sha256=bundle.sha256,
                         dest=tmp_path / "x")
    assert opened.version == "20240101"
    assert [os.path.basename(p) for p in opened.rules["clamav"]] == ["main.ldb", "main.ndb"]
    assert [os.path.basename(p) for p in opened.rules["yara"]] == ["online_20240101.yar"]
    hashes = Path(opened.rules["hashes"][0]).read_text().splitlines()
    assert hashes == sorted([f"md5:{hashlib.md5(b'x').hexdigest()}:1:Unix.Trojan.HashKeep-5",
                             f"sha256:{hashlib.sha256(b'y').hexdigest()}:*:Unix.Trojan.ShaKeep-7"])
    assert "Win." not in Path(opened.directory, "main.ndb").read_text()
    assert stat.S_IMODE(os.stat(opened.directory).st_mode) == 0o700


def test_build_with_every_platform(tmp_path, unpacked):
    report = build_bundle(tmp_path / "all.zip", version="1", clamav=[unpacked], platforms=None)
    assert report.kept[".ndb"] == 3 and ".ndb" not in report.dropped


def test_build_asks_for_unpacked_databases(tmp_path):
    packed = tmp_path / "daily.cvd"
    packed.write_bytes(b"ClamAV-VDB:...")
    with pytest.raises(BundleError, match="packed ClamAV database: unpack it first"):
        build_bundle(tmp_path / "b.zip", version="1", clamav=[tmp_path])


def test_build_refuses_yara_that_does_not_compile(tmp_path):
    broken = tmp_path / "broken.yar"
    broken.write_text("rule Broken { condition: $missing }\n")
    with pytest.raises(BundleError, match="do not compile"):
        build_bundle(tmp_path / "b.zip", version="1", yara=[broken])
    assert not (tmp_path / "b.zip").exists()


# -- damage ------------------------------------------------------------------------------------


def test_wrong_password(bundle, tmp_path):
    with pytest.raises(BundleError, match="wrong password"):
        open_bundle(bundle.path, password="guess", dest=tmp_path / "x")


def test_wrong_version(bundle, tmp_path):
    with pytest.raises(BundleError, match="holds version '20240101', expected '20240202'"):
        open_bundle(bundle.path, password=PASSWORD, version="20240202", dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing is extracted from a bundle that failed a check


def test_wrong_hash(bundle, tmp_path):
    with pytest.raises(BundleError, match="has SHA-256 .* expected 0+: the download is damaged"):
        open_bundle(bundle.path, password=PASSWORD, sha256="0" * 64, dest=tmp_path / "x")


def test_truncated_archive(bundle, tmp_path):
    truncated = tmp_path / "truncated.zip"
    data = Path(bundle.path).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or not a zip archive"):
        open_bundle(truncated, password=PASSWORD, dest=tmp_path / "x")


def test_corrupt_entry(bundle, tmp_path):
    damaged = tmp_path / "damaged.zip"
    data = bytearray(Path(bundle.path).read_bytes())
    with zipfile.ZipFile(bundle.path) as archive:
        info = archive.getinfo("main.ndb")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2 + 20
    data[middle] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="truncated or corrupt|wrong password"):
        open_bundle(damaged, password=PASSWORD, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []


def _plain_zip(path: Path, entries: list[tuple[str, bytes, int]]) -> Path:
    """An unencrypted zip with given names and unix modes (a hostile bundle needs no password)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return path


@pytest.mark.parametrize("name", ["../../etc/cron.d/x", "/etc/passwd", "rules/../../x", "sub/main.ndb",
                                  "..", ".hidden", "a\\..\\b"])
def test_traversal_entries_are_refused(tmp_path, name):
    hostile = _plain_zip(tmp_path / "hostile.zip", [("version", b"1\n", stat.S_IFREG | 0o644),
                                                     (name, b"x", stat.S_IFREG | 0o644)])
    with pytest.raises(BundleError, match="unsafe entry"):
        open_bundle(hostile, password=PASSWORD, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_symlink_entry_is_refused(tmp_path):
    hostile = _plain_zip(tmp_path / "link.zip", [("version", b"1\n", stat.S_IFREG | 0o644),
                                                  ("main.ndb", b"/etc/shadow", stat.S_IFLNK | 0o777)])
    with pytest.raises(BundleError, match="unsafe entry 'main.ndb': it is a link"):
        open_bundle(hostile, password=PASSWORD, dest=tmp_path / "x")


def test_zip_bomb_ratio_is_refused(tmp_path):
    bomb = _plain_zip(tmp_path / "bomb.zip", [("version", b"1\n", stat.S_IFREG | 0o644),
                                              ("main.ndb", b"\0" * (64 << 20), stat.S_IFREG | 0o644)])
    with pytest.raises(BundleError, match="a zip bomb"):
        open_bundle(bomb, password=PASSWORD, dest=tmp_path / "x")


def test_entry_count_and_total_size_caps(tmp_path):
    many = _plain_zip(tmp_path / "many.zip", [(f"f{i}.ndb", b"x", stat.S_IFREG | 0o644) for i in range(20)])
    with pytest.raises(BundleError, match="more than the cap of 10"):
        open_bundle(many, password=PASSWORD, dest=tmp_path / "x", limits=Limits(max_entries=10))
    with pytest.raises(BundleError, match="more than 10 bytes"):
        open_bundle(many, password=PASSWORD, dest=tmp_path / "y", limits=Limits(max_total_size=10))


def test_destination_must_be_new_or_empty(bundle, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        open_bundle(bundle.path, password=PASSWORD, dest=tmp_path / "used")


def test_bundle_error_is_an_elkscan_error():
    assert issubclass(BundleError, ElkscanError)


# -- ZipCrypto (Elkeid's bundles) --------------------------------------------------------------


def _zipcrypto_zip(path: Path, entries: dict[str, bytes], password: bytes) -> Path:
    """A stored zip encrypted with traditional PKWARE encryption (what ``zip -P`` writes)."""

    def crc_update(crc: int, byte: int) -> int:
        return zlib.crc32(bytes([byte]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def encrypt(data: bytes) -> bytes:
        keys = [0x12345678, 0x23456789, 0x34567890]

        def update(byte: int) -> None:
            keys[0] = crc_update(keys[0], byte)
            keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
            keys[2] = crc_update(keys[2], keys[1] >> 24)

        for byte in password:
            update(byte)
        out = bytearray()
        for byte in data:
            temp = (keys[2] | 2) & 0xFFFF
            out.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
            update(byte)
        return bytes(out)

    body, central = bytearray(), bytearray()
    for name, data in entries.items():
        crc = zlib.crc32(data)
        payload = encrypt(os.urandom(11) + bytes([crc >> 24]) + data)
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 1, 0, 0, 0, crc, len(payload), len(data),
                             len(name), 0)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x0314, 20, 1, 0, 0, 0, crc, len(payload),
                               len(data), len(name), 0, 0, 0, 0, (stat.S_IFREG | 0o644) << 16,
                               len(body)) + name.encode()
        body += header + name.encode() + payload
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + end))
    return path


def test_zipcrypto_bundle_opens_and_rejects_a_wrong_password(tmp_path):
    rules = b"Unix.Test.Zc-1:0:*:6b656570\n"
    legacy = _zipcrypto_zip(tmp_path / "legacy.zip", {"version": b"7\n", "main.ndb": rules}, PASSWORD.encode())
    opened = open_bundle(legacy, password=PASSWORD, version="7", dest=tmp_path / "x")
    assert Path(opened.rules["clamav"][0]).read_bytes() == rules
    with pytest.raises(BundleError, match="wrong password"):
        open_bundle(legacy, password="not-it", dest=tmp_path / "y")


# -- the command line --------------------------------------------------------------------------


def test_db_commands(tmp_path, unpacked, yara_file, capsys):
    out = tmp_path / "b.zip"
    assert main(["db", "build", str(out), "--version", "42", "--clamav", str(unpacked),
                 "--yara", str(yara_file)]) == 0
    printed = capsys.readouterr().out
    assert "version 42" in printed and ".ndb   kept        2  dropped        1" in printed
    assert sign_path_for(out).exists()

    assert main(["db", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "version 42" in info and "matches" in info and "main.hashes" in info

    assert main(["db", "verify", str(out), "--version", "42"]) == 0
    assert "OK, version 42 (checked password, entries, sha256, version, yara)" in capsys.readouterr().out
    assert main(["db", "verify", str(out), "--version", "43"]) == 2
    assert "expected '43'" in capsys.readouterr().err
    assert main(["db", "verify", str(out), "--password", "nope"]) == 2
    assert "wrong password" in capsys.readouterr().err
    sign_path_for(out).write_text("0" * 64 + "\n")
    assert main(["db", "verify", str(out)]) == 2
    assert "the download is damaged" in capsys.readouterr().err


# -- the reliability audit's D rows: each hostile bundle first, then the clean refusal ------------


def _raw_zip(path: Path, entries: list[tuple[str, bytes, int, int]], *, shared: bool = False) -> Path:
    """A zip written by hand: (name, deflated payload, crc, size) per entry. With ``shared``, every
    central-directory record points at the first entry's data (an overlapping-entries bomb)."""
    body, central = bytearray(), bytearray()
    for name, payload, crc, size in entries:
        offset = 0 if shared and body else len(body)
        if not (shared and body):
            body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(payload), size,
                                len(name), 0) + name.encode() + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x0314, 20, 0, 8, 0, 0, crc, len(payload),
                               size, len(name), 0, 0, 0, 0, (stat.S_IFREG | 0o644) << 16, offset) + name.encode()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + end))
    return path


def _deflated(data: bytes) -> tuple[bytes, int, int]:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush(), zlib.crc32(data), len(data)


def test_many_entries_of_one_mib_of_zeros_are_a_zip_bomb(tmp_path):
    """D8: 1,000 entries of exactly 1 MiB of zeros (a 1.1 MB zip) passed, as the ratio was only checked
    for entries over 1 MiB; every agent would have written 1000 MiB from a 1 MB download."""
    zeros = _deflated(b"\0" * (1 << 20))
    bomb = _raw_zip(tmp_path / "bomb.zip", [("version", *_deflated(b"1\n"))]
                    + [(f"part{i:04d}.ndb", *zeros) for i in range(1000)])
    assert bomb.stat().st_size < 1_200_000
    with pytest.raises(BundleError, match=r"entry 'part0000.ndb' expands 1048576 bytes from \d+ .*a zip bomb"):
        open_bundle(bomb, password=PASSWORD, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_entries_sharing_their_data_are_a_zip_bomb_over_the_whole_archive(tmp_path):
    """Each entry expands 1:1, but 2,000 of them point at the same 64 KiB: 131 MB from 176 kB."""
    noise = _deflated(os.urandom(64 << 10))
    bomb = _raw_zip(tmp_path / "shared.zip", [(f"f{i:04d}.ndb", *noise) for i in range(2000)], shared=True)
    with pytest.raises(BundleError, match=r"expands to 131072000 bytes from \d+ .*over all its entries"):
        open_bundle(bomb, password=PASSWORD, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_an_entry_name_no_filesystem_can_hold_is_refused(tmp_path, capsys):
    """D9: a 300-character entry name was an ENAMETOOLONG traceback, exit 1 ("detections")."""
    long = _plain_zip(tmp_path / "long.zip", [("version", b"1\n", stat.S_IFREG | 0o644),
                                               ("a" * 296 + ".yar", b"rule x { condition: false }",
                                                stat.S_IFREG | 0o644)])
    assert main(["db", "verify", str(long)]) == 2
    assert "holds an entry whose name is longer than 255 bytes" in capsys.readouterr().err
    assert not list(tmp_path.glob("elkscan-db-*"))


def test_a_sign_that_is_a_directory_is_a_clear_error(bundle, capsys):
    """D16: ``<name>.sign`` being a directory was an IsADirectoryError traceback, exit 1."""
    sign = Path(bundle.sign_path)
    sign.unlink()
    sign.mkdir()
    assert main(["db", "verify", bundle.path]) == 2
    assert f"signature file {sign} is not a regular file" in capsys.readouterr().err


def test_a_sign_that_is_a_fifo_does_not_hang(bundle):
    """D17: ``<name>.sign`` being a FIFO blocked ``db verify`` forever (nothing ever writes to it)."""
    sign = Path(bundle.sign_path)
    sign.unlink()
    os.mkfifo(sign)
    result = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "db", "verify", bundle.path],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"signature file {sign} is not a regular file" in result.stderr


def test_a_bundle_that_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "fifo.zip")
    with pytest.raises(BundleError, match="rule bundle .*fifo.zip is not a regular file"):
        open_bundle(tmp_path / "fifo.zip", password=PASSWORD, dest=tmp_path / "x")


def test_an_unencrypted_bundle_does_not_claim_a_checked_password(tmp_path, capsys):
    """D20: ``db verify`` said "checked password" for a zip that has none."""
    plain = _plain_zip(tmp_path / "plain.zip", [("version", b"3\n", stat.S_IFREG | 0o644),
                                                 ("main.ndb", b"Unix.Test.Plain-1:0:*:6b656570\n",
                                                  stat.S_IFREG | 0o644)])
    assert main(["db", "verify", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "checked entries; not encrypted, so no password to check" in out and "password," not in out


def test_an_encrypted_bundle_reports_its_checked_password(bundle, tmp_path):
    assert open_bundle(bundle.path, password=PASSWORD, dest=tmp_path / "x").encrypted


def test_an_unknown_aes_strength_is_damage_not_a_crash(bundle, tmp_path):
    """Found by the fuzz test below: an AES extra field of strength 0 made pyzipper raise KeyError."""
    data = Path(bundle.path).read_bytes()
    field = b"\x01\x99\x07\x00\x02\x00AE\x03"  # WinZip AES extra field, AE-2, strength 3 (256 bit)
    assert field in data
    damaged = tmp_path / "strength0.zip"
    damaged.write_bytes(data.replace(field, field[:-1] + b"\x00"))
    with pytest.raises(BundleError, match="truncated or corrupt"):
        open_bundle(damaged, password=PASSWORD, dest=tmp_path / "x")


# -- fuzzing: whatever the bytes, a BundleError ------------------------------------------------


def _mutations(seed: bytes):
    """Bytes near a real bundle: truncated, bytes flipped, bytes inserted or deleted."""
    def mutate(edits):
        data = bytearray(seed)
        for kind, where, value in edits:
            where %= max(len(data), 1)
            if kind == 0:
                data[where:where + 1] = bytes([value])
            elif kind == 1:
                data[where:where] = bytes([value]) * (value % 7 + 1)
            elif kind == 2:
                del data[where:where + value % 64 + 1]
            else:
                del data[where:]
        return bytes(data)
    return st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)),
                    min_size=1, max_size=6).map(mutate)


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory):
    """Two real bundles to mutate: AES-encrypted (``elkscan db build``) and a plain zip."""
    folder = tmp_path_factory.mktemp("seeds")
    (folder / "in.ndb").write_text("Unix.Test.Fuzz-1:0:*:6b656570\n")
    aes = build_bundle(folder / "aes.zip", version="9", clamav=[folder / "in.ndb"], platforms=None)
    plain = _plain_zip(folder / "plain.zip", [("version", b"9\n", stat.S_IFREG | 0o644),
                                              ("main.ndb", b"Unix.Test.Fuzz-1:0:*:6b656570\n" * 20,
                                               stat.S_IFREG | 0o644)])
    return Path(aes.path).read_bytes(), plain.read_bytes(), folder


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bundles_only_ever_raise_bundle_error(fuzz_seeds, data):
    aes, plain, folder = fuzz_seeds
    content = data.draw(st.binary(max_size=400) | _mutations(aes) | _mutations(plain))
    path = folder / "fuzzed.zip"
    path.write_bytes(content)
    sign_path_for(path).write_bytes(content[:80])
    dest = Path(tempfile.mkdtemp(dir=folder))
    try:
        try:
            read_sign(sign_path_for(path))
        except BundleError:
            pass
        expected = data.draw(st.none() | st.just(hashlib.sha256(content).hexdigest()))
        open_bundle(path, password=PASSWORD, sha256=expected, dest=dest / "x")
    except ElkscanError as error:
        assert "\n" not in str(error)
    finally:
        shutil.rmtree(dest)


def test_verify_compiles_the_yara_files_as_the_engine_will_load_them(tmp_path, capsys):
    """D21: ``db verify`` said OK for a bundle whose YARA file does not compile (the reload would fail)."""
    good = ("online_1.yar", b'rule Unix_Test_Ok { strings: $a = "ok" condition: $a and filetype != "PNG" }\n',
            stat.S_IFREG | 0o644)
    ok = _plain_zip(tmp_path / "ok.zip", [("version", b"1\n", stat.S_IFREG | 0o644), good])
    assert main(["db", "verify", str(ok)]) == 0
    assert "checked entries, yara" in capsys.readouterr().out
    broken = _plain_zip(tmp_path / "broken.zip", [("version", b"1\n", stat.S_IFREG | 0o644),
                                                   ("online_1.yar", b"rule broken { condition: ", stat.S_IFREG | 0o644)])
    assert main(["db", "verify", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken}: online_1.yar: YARA rules do not compile" in err and "elkscan-db-" not in err
