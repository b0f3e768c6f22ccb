"""The hash-list formats and the compact index, checked against a plain dict of the same signatures."""

from __future__ import annotations

import hashlib
import random

import pytest

from elkscan_hash_extractor.hashlist import ANY_SIZE, HashListBuilder, HashListError, parse_line


def build(tmp_path, text: str, name: str = "list.hashes"):
    path = tmp_path / name
    path.write_text(text)
    builder = HashListBuilder()
    builder.add_file(str(path))
    return builder, builder.build()


def test_all_three_line_formats(tmp_path):
    md5, sha1, sha256 = (hashlib.new(a, b"x").hexdigest() for a in ("md5", "sha1", "sha256"))
    _, index = build(tmp_path, f"""\
# elkscan hash list
md5:{md5}:1:Unix.Trojan.Md5Listed-1
sha256:{sha256.upper()}:*:Name:With:Colons

{md5}:1:Win.Trojan.FromHdb-2:73
{sha1}:*:Win.Trojan.FromHsb-3
""")
    assert len(index) == 4
    assert sorted(index.tables) == ["md5", "sha1", "sha256"]
    assert index.lookup("md5", bytes.fromhex(md5), 1) == ["Unix.Trojan.Md5Listed-1", "Win.Trojan.FromHdb-2"]
    assert index.lookup("md5", bytes.fromhex(md5), 2) == []  # the size is part of the signature
    assert index.lookup("sha256", bytes.fromhex(sha256), 12345) == ["Name:With:Colons"]
    assert index.lookup("sha1", bytes.fromhex(sha1), 7) == ["Win.Trojan.FromHsb-3"]
    assert index.algorithms_for(1) == ["md5", "sha1", "sha256"]


def test_files_of_sizes_no_signature_has_are_not_hashed(tmp_path):
    md5 = hashlib.md5(b"x").hexdigest()
    _, index = build(tmp_path, f"md5:{md5}:100:A\nmd5:{md5}:300:B\n")
    assert index.algorithms_for(100) == index.algorithms_for(300) == ["md5"]
    assert index.algorithms_for(200) == index.algorithms_for(0) == []


@pytest.mark.parametrize("line, reason", [
    ("md5:abc:1:N", "32 hex digits"),
    ("md5:" + "g" * 32 + ":1:N", "not hexadecimal"),
    ("md5:" + "a" * 30 + " b:1:N", "not hexadecimal"),
    ("md5:" + "a" * 32 + ":12x:N", "neither a number"),
    ("md5:" + "a" * 32 + ":1:", "no name"),
    ("md5:" + "a" * 32 + ":1", "expected <algo>"),
    ("a" * 33 + ":1:N", "neither MD5"),
    ("a" * 32 + ":" + str(ANY_SIZE) + ":N", "beyond the 4 GiB"),
    ("just some text", "expected <hex digest>"),
])
def test_malformed_lines_say_why(line, reason):
    with pytest.raises(ValueError, match=reason):
        parse_line(line.encode())


def test_bad_lines_are_skipped_with_their_line_numbers(tmp_path):
    md5 = hashlib.md5(b"x").hexdigest()
    builder, index = build(tmp_path, f"md5:{md5}:1:Good\nmd5:nothex:1:Bad\n\n{md5}:zz:Bad2\n")
    assert len(index) == 1
    assert [(number, reason.split(" ")[0]) for _, number, reason in builder.problems] == [
        (2, "a"), (4, "size")]


def test_a_file_without_one_valid_line_is_refused(tmp_path):
    path = tmp_path / "rules.yar"
    path.write_text("rule demo { condition: true }\n")
    with pytest.raises(HashListError, match=r"rules.yar holds no valid hash signature \(line 1: .*expected"):
        HashListBuilder().add_file(str(path))
    with pytest.raises(HashListError, match="cannot read hash list .*missing.hdb"):
        HashListBuilder().add_file(str(tmp_path / "missing.hdb"))


def test_index_agrees_with_a_dict_on_thousands_of_signatures(tmp_path):
    rng = random.Random(7)
    reference: dict[tuple[str, bytes], list[tuple[int, str]]] = {}
    lines = []
    for number in range(6000):
        algorithm = rng.choice(["md5", "sha1", "sha256"])
        digest = rng.randbytes({"md5": 16, "sha1": 20, "sha256": 32}[algorithm])
        if number % 500 == 1:  # a few digests listed twice, with another size
            algorithm, digest = lines[-1][0], lines[-1][1]
        size = ANY_SIZE if number % 97 == 0 else rng.randrange(5, 1 << 20)
        name = f"Unix.Test.Sig-{number}"
        lines.append((algorithm, digest, size, name))
        reference.setdefault((algorithm, digest), []).append((size, name))
    text = "".join(f"{a}:{d.hex()}:{'*' if s == ANY_SIZE else s}:{n}\n" for a, d, s, n in lines)
    _, index = build(tmp_path, text)
    assert len(index) == len(lines)
    for (algorithm, digest), entries in reference.items():
        for size, _ in entries:
            probe = 4 if size == ANY_SIZE else size
            expected = sorted(n for s, n in entries if s in (probe, ANY_SIZE))
            assert sorted(index.lookup(algorithm, digest, probe)) == expected
    for _ in range(2000):
        assert index.lookup("md5", rng.randbytes(16), rng.randrange(5, 1 << 20)) == []
    assert index.algorithms_for(123) == ["md5", "sha1", "sha256"]  # each table has some "*" entries
