"""Compiled hash indexes (``elkscan db hashes``): the file agrees with the text index, the engine maps
it whatever its name, two real processes share one copy, and damaged or forged files are refused."""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkscan_core import ComponentError, make_plugin_manager
from elkscan_core.cli import main
from elkscan_core.testing import run
from elkscan_hash_extractor.compiled import (ENTRY, HEADER, MAGIC, _DIGEST_AT, _file_digest, open_index,
                                             parse_index, write_index)
from elkscan_hash_extractor.hashlist import ANY_SIZE, HashListBuilder, HashListError

NOBODY = 65534
WIDTH = {"md5": 16, "sha1": 20, "sha256": 32}


def signatures(count: int, seed: int = 7) -> list[tuple[str, bytes, int, str]]:
    """``count`` signatures of all three algorithms, some digests twice with another size, some ``*``."""
    rng = random.Random(seed)
    lines: list[tuple[str, bytes, int, str]] = []
    for number in range(count):
        algorithm = rng.choice(["md5", "sha1", "sha256"])
        digest = rng.randbytes(WIDTH[algorithm])
        if number % 50 == 1:
            algorithm, digest = lines[-1][0], lines[-1][1]
        size = ANY_SIZE if number % 97 == 0 else rng.randrange(5, 1 << 20)
        lines.append((algorithm, digest, size, f"Unix.Test.Sig-{number}"))
    return lines


def write_lists(folder, lines) -> None:
    """The same signatures as an elkscan list, a ClamAV .hdb (MD5) and .hsb (SHA) and a .hdu."""
    folder.mkdir(exist_ok=True)
    text = {".hashes": [], ".hdb": [], ".hsb": [], ".hdu": []}
    for number, (algorithm, digest, size, name) in enumerate(lines):
        shown = "*" if size == ANY_SIZE else str(size)
        if number % 3 == 0:
            text[".hashes"].append(f"{algorithm}:{digest.hex()}:{shown}:{name}\n")
        elif number % 7 == 0:
            text[".hdu"].append(f"{digest.hex()}:{shown}:{name}:73\n")
        else:
            text[".hdb" if algorithm == "md5" else ".hsb"].append(f"{digest.hex()}:{shown}:{name}:73\n")
    for suffix, content in text.items():
        (folder / f"main{suffix}").write_text("".join(content))


def compile_lines(tmp_path, lines, name="full.idx"):
    lists = tmp_path / "lists"
    write_lists(lists, lines)
    output = tmp_path / name
    assert main(["db", "hashes", str(lists), "-o", str(output)]) == 0
    return output


def test_the_compiled_index_answers_as_the_text_index(tmp_path, capsys):
    lines = signatures(6000)
    output = compile_lines(tmp_path, lines)
    printed = capsys.readouterr().out
    assert f"{output}: 6,000 signatures from 4 file(s)" in printed
    assert f"sha256 {hashlib.sha256(output.read_bytes()).hexdigest()}" in printed
    assert output.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    digest, tables = open_index(str(output))
    builder = HashListBuilder()
    builder.add_files(str(p) for p in sorted((tmp_path / "lists").iterdir()))
    text = builder.build()
    assert {name: table.count for name, table in tables.items()} == {
        name: parts[0].count for name, parts in text.tables.items()}
    for algorithm, digest_, size, _ in lines:
        probe = 4 if size == ANY_SIZE else size
        assert sorted(tables[algorithm].find(digest_, probe)) == sorted(text.lookup(algorithm, digest_, probe))
        assert tables[algorithm].find(digest_, probe)  # every listed signature is found
    rng = random.Random(3)
    for _ in range(3000):
        size = rng.randrange(0, 1 << 20)
        for algorithm in WIDTH:
            assert tables[algorithm].may_have(size) == text.tables[algorithm][0].may_have(size)
            assert tables[algorithm].find(rng.randbytes(WIDTH[algorithm]), size) == []


def test_the_plugin_compiles_for_the_core_through_its_hook(tmp_path):
    """``elkscan db hashes`` asks the hash_extractor plugin (elkscan_compile_hashes): the core imports
    no plugin."""
    lists = tmp_path / "lists"
    write_lists(lists, signatures(30))
    (lists / "main.hashes").write_text((lists / "main.hashes").read_text() + "md5:bad:1:Broken\n")
    report = make_plugin_manager(["hash_extractor"]).hook.elkscan_compile_hashes(
        sources=[str(p) for p in sorted(lists.iterdir())], output=str(tmp_path / "out.idx"))
    assert sum(report["signatures"].values()) == 30 and len(report["skipped"]) == 1
    assert report["sha256"] == hashlib.sha256((tmp_path / "out.idx").read_bytes()).hexdigest()


def test_sizes_are_prefiltered_from_the_map(tmp_path):
    lines = [("md5", hashlib.md5(b"a").digest(), 100, "A"), ("md5", hashlib.md5(b"b").digest(), 300, "B")]
    _, tables = open_index(str(compile_lines(tmp_path, lines)))
    assert [tables["md5"].may_have(size) for size in (100, 200, 300, 356, 0)] == [True, False, True, False, False]


@pytest.fixture
def corpus(tmp_path):
    """A listed file, a clean one, and a compiled index named like a ClamAV database."""
    root = tmp_path / "scan"
    root.mkdir()
    listed, clean = root / "listed.bin", root / "clean.bin"
    listed.write_bytes(b"only the full set lists this\n" * 9)
    clean.write_bytes(b"nobody lists this\n")
    lines = signatures(500) + [("md5", hashlib.md5(listed.read_bytes()).digest(), listed.stat().st_size,
                                "Unix.Trojan.OnlyInTheFullSet-1")]
    return root, listed, compile_lines(tmp_path, lines, name="full.hdb")


def pipeline(root, files):
    return {"plugins": ["hash_extractor"],
            "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "exclude": [], "type_filter": False}}],
            "engines": [{"use": "hashlist", "with": {"files": files}}]}


def test_the_engine_maps_a_compiled_index_whatever_its_name_next_to_text_lists(corpus, tmp_path):
    root, listed, index = corpus
    clean = root / "clean.bin"
    text = tmp_path / "local.hashes"
    text.write_text(f"sha256:{hashlib.sha256(clean.read_bytes()).hexdigest()}:*:Txt.Test.Local-2\n")
    result = run(pipeline(root, [str(index), str(text)]))
    assert result.detected == {str(listed): ["Unix.Trojan.OnlyInTheFullSet-1"], str(clean): ["Txt.Test.Local-2"]}
    engine = result.session.find("engine", "hashlist")
    assert engine.version().startswith("hashlist 502 signatures sha256:")
    assert engine.index.mapped() > 0 and result.summary.errors == 0


def corrupt(index, how: str) -> str:
    data = bytearray(index.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    elif how == "a flipped bit":
        data[len(data) // 3] ^= 0x10
    elif how == "a forged section offset, resealed":
        struct.pack_into("<Q", data, HEADER.size + 32, len(data) + 4096)
        data[_DIGEST_AT:HEADER.size] = _file_digest(lambda o, n: bytes(data[o:o + n]), len(data))
    elif how == "a newer format":
        struct.pack_into("<I", data, 8, 99)
    index.write_bytes(bytes(data))
    return {"truncated": "the header says", "a flipped bit": "its SHA-256 is not the one",
            "a forged section offset, resealed": "section digests is out of place",
            "a newer format": "format 99; this elkscan reads format 1"}[how]


@pytest.mark.parametrize("how", ["truncated", "a flipped bit", "a forged section offset, resealed",
                                 "a newer format"])
def test_a_damaged_index_stops_start_up_naming_it_and_the_fix(corpus, how):
    root, _, index = corpus
    reason = corrupt(index, how)
    with pytest.raises(ComponentError) as error:
        run(pipeline(root, [str(index)]))
    message = str(error.value)
    assert str(index) in message and reason in message and "elkscan db hashes" in message


def test_an_index_another_user_could_replace_is_refused(corpus):
    """nobody owns the index: it would decide what every verifier calls malware."""
    root, _, index = corpus
    os.chown(index, NOBODY, NOBODY)
    with pytest.raises(ComponentError, match=re.escape(f"hash list {index} is owned by uid {NOBODY}")):
        run(pipeline(root, [str(index)]))


def test_db_hashes_refuses_packed_databases_untrusted_inputs_and_indexes(tmp_path, capsys):
    lists = tmp_path / "lists"
    write_lists(lists, signatures(20))
    (lists / "daily.cvd").write_bytes(b"ClamAV-VDB:01 Jan 2026 00-00 +0000:27000:1:90:x:y:z\x1f\x8b")
    assert main(["db", "hashes", str(lists), "-o", str(tmp_path / "x.idx")]) == 2
    assert "daily.cvd is a packed ClamAV database: unpack it first (sigtool --unpack" in capsys.readouterr().err
    (lists / "daily.cvd").unlink()
    assert main(["db", "hashes", str(lists), "-o", str(tmp_path / "x.idx")]) == 0
    assert main(["db", "hashes", str(tmp_path / "x.idx"), "-o", str(tmp_path / "y.idx")]) == 2
    assert "is already a compiled hash index" in capsys.readouterr().err
    os.chown(lists / "main.hdb", NOBODY, NOBODY)
    assert main(["db", "hashes", str(lists), "-o", str(tmp_path / "z.idx")]) == 2
    assert f"hash source {lists / 'main.hdb'} is owned by uid {NOBODY}" in capsys.readouterr().err
    assert not (tmp_path / "y.idx").exists() and not (tmp_path / "z.idx").exists()
    (tmp_path / "empty").mkdir()
    assert main(["db", "hashes", str(tmp_path / "empty"), "-o", str(tmp_path / "z.idx")]) == 2
    assert "no hash list in" in capsys.readouterr().err


_SHARE = """
import os, sys
from elkscan_hash_extractor.compiled import open_index
digest, tables = open_index(sys.argv[1])
table = tables["md5"]
print(table.find(bytes.fromhex(sys.argv[2]), int(sys.argv[3])), flush=True)
sys.stdin.readline()
"""


def test_two_processes_answer_from_one_mapped_copy(corpus):
    """Two real verifier processes map the same file: each answers, and the file's pages are shared
    (counted in both processes' Shared, not copied into either's private memory)."""
    _, listed, index = corpus
    md5, size = hashlib.md5(listed.read_bytes()).hexdigest(), listed.stat().st_size
    processes = [subprocess.Popen([sys.executable, "-c", _SHARE, str(index), md5, str(size)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "['Unix.Trojan.OnlyInTheFullSet-1']"
        for process in processes:
            mapping = _mapping_of(f"/proc/{process.pid}/smaps", str(index))
            assert mapping["Shared_Clean"] > 0 and mapping["Private_Dirty"] == 0
    finally:
        for process in processes:
            process.communicate("\n", timeout=60)


def _mapping_of(smaps: str, path: str) -> dict[str, int]:
    """The smaps fields (kB) of the mapping of ``path``."""
    fields: dict[str, int] = {}
    inside = False
    with open(smaps) as lines:
        for line in lines:
            parts = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = parts[-1] == path
            elif inside and len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


# -- fuzz: the parser of the file's bytes never fails other than with HashListError ----------------

@pytest.fixture(scope="module")
def seed_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed")
    builder = HashListBuilder()
    write_lists(folder, signatures(300, seed=11))
    builder.add_files(str(p) for p in sorted(folder.iterdir()))
    write_index(builder.take_pending(), str(folder / "seed.idx"))
    return (folder / "seed.idx").read_bytes()


def _reseal(data: bytearray) -> bytes:
    if len(data) >= HEADER.size:
        struct.pack_into("<Q", data, 24, len(data))
        data[_DIGEST_AT:HEADER.size] = _file_digest(lambda o, n: bytes(data[o:o + n]), len(data))
    return bytes(data)


def _exercise(data: bytes) -> None:
    try:
        _, tables = parse_index(data, "fuzzed.idx")
    except HashListError as error:
        assert "fuzzed.idx" in str(error) and "\n" not in str(error)
        return
    rng = random.Random(len(data))
    for table in tables.values():
        for probe in range(0, len(data) - table.width, max(1, len(data) // 40)):  # digests the file holds
            try:
                table.find(data[probe:probe + table.width], rng.choice([ANY_SIZE, 5, 6]))
                table.may_have(rng.randrange(0, 1 << 20))
            except HashListError as error:  # a corrupt name block or number, found on use
                assert "fuzzed.idx" in str(error)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_header_and_sections_resealed_only_ever_raise_hash_list_error(seed_index, data):
    """Header and table-directory fields overwritten, and the digest made right again: every offset and
    count is still checked against the file before any look-up."""
    content = bytearray(seed_index)
    directory_end = HEADER.size + 3 * ENTRY.size
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, directory_end - 8))
        value = data.draw(st.sampled_from([0, 1, 7, 8, 64, 65537, len(content), len(content) - 8, 1 << 31,
                                           (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1))
        content[at:at + 8] = value.to_bytes(8, "little")
    if data.draw(st.booleans()):
        del content[data.draw(st.integers(0, len(content))):]
    _exercise(_reseal(content))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_only_ever_raise_hash_list_error(seed_index, data):
    content = data.draw(st.binary(max_size=600).map(lambda b: MAGIC + b)
                        | st.binary(min_size=1, max_size=64).map(lambda b: seed_index[:200] + b)
                        | st.integers(0, len(seed_index)).map(lambda n: seed_index[:n]))
    _exercise(content)
