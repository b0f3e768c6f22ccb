"""The database parsers on arbitrary bytes: they never raise, and what they index is well formed.
500 examples each in the suite; 20,000 each ran clean when they were written (raise EXAMPLES to repeat)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from elkscan_pkgverify import Aliases, IndexBuilder
from elkscan_pkgverify.dpkg import conffiles, parse_diversions, parse_md5sums, parse_stanzas
from elkscan_pkgverify.rpm import parse_rpm_files

#: Bytes shaped like the databases' lines (hex, separators, paths), mixed with anything.
pieces = st.sampled_from([b"  ", b" *", b"\t", b"\n", b"\n\n", b" ", b":", b"/", b"usr/bin/", b"Package: ",
                          b"Status: install ok installed\n", b"Conffiles:\n /etc/x ", b"obsolete", b"(none)",
                          b"8", b"1", b"0", b"64", b"d41d8cd98f00b204e9800998ecf8427e", b"\xff\xfe", b"\0"])
shaped = st.lists(st.one_of(pieces, st.binary(max_size=12)), max_size=60).map(b"".join)
EXAMPLES = 500


@settings(max_examples=EXAMPLES, deadline=None)
@given(shaped)
def test_dpkg_parsers_take_any_bytes(data):
    for fields in parse_stanzas(data):
        assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in fields.items())
        list(conffiles(fields.get(b"conffiles", b"")))
    problems: list[str] = []
    for path, digest in parse_md5sums(data, problems):
        assert path.startswith(b"/") and len(digest) == 16 and b"\n" not in path
    assert all(isinstance(k, bytes) and len(v) == 2 for k, v in parse_diversions(data, problems).items())


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(shaped, max_size=8))
def test_rpm_parser_takes_any_lines(lines):
    builder = IndexBuilder(Aliases({b"/bin/": b"/usr/bin/"}))
    parse_rpm_files(lines, builder)
    index = builder.build()
    for position in range(len(index)):
        package = index.packages[index.owners[position]]
        assert package.algorithm in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
