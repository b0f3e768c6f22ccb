"""dpkg's database read into the index, from small databases written here: installed states, the
status journal, Multi-Arch names, diversions, conffiles, usr-merge aliases and malformed lines."""

from __future__ import annotations

import hashlib
import os

import pytest

from elkscan_core.trust import UntrustedError
from elkscan_pkgverify import Aliases, DpkgDatabase, IndexBuilder

MERGED = Aliases({b"/bin/": b"/usr/bin/", b"/sbin/": b"/usr/sbin/"})


def md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


def stanza(package, status="install ok installed", arch="amd64", version="1.0", **fields):
    lines = [f"Package: {package}", f"Status: {status}", f"Architecture: {arch}", f"Version: {version}"]
    for name, value in fields.items():
        lines.append(f"{name.replace('_', '-').title()}: {value}")
    return "\n".join(lines) + "\n"


def database(root, stanzas, md5sums, diversions="", journal=()):
    admin = root / "dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "status").write_text("\n".join(stanzas))
    for name, lines in md5sums.items():
        (admin / "info" / f"{name}.md5sums").write_bytes(b"".join(lines))
    if diversions:
        (admin / "diversions").write_text(diversions)
    if journal:
        (admin / "updates").mkdir()
        for number, text in enumerate(journal):
            (admin / "updates" / f"{number:04d}").write_text(text)
    return admin


def entry(data: bytes, path: str) -> bytes:
    return md5(data).hex().encode() + b"  " + path.encode() + b"\n"


def index_of(admin, aliases=MERGED):
    builder = IndexBuilder(aliases)
    DpkgDatabase(str(admin)).load(builder)
    return builder.build(), builder.problems


def owners(index, path):
    return [(package.name, digest) for package, digest in index.lookup(path)]


def test_installed_packages_files_are_found_under_either_name_of_a_merged_directory(tmp_path):
    admin = database(tmp_path, [stanza("coreutils")],
                     {"coreutils": [entry(b"cat", "bin/cat"), entry(b"env", "usr/bin/env")]})
    index, problems = index_of(admin)
    assert problems == [] and len(index) == 2
    assert owners(index, "/usr/bin/cat") == owners(index, "/bin/cat") == [("coreutils", md5(b"cat"))]
    assert owners(index, "/bin/env") == [("coreutils", md5(b"env"))]
    assert owners(index, "/usr/bin/ls") == []
    [(package, _)] = index.lookup("/bin/cat")
    assert (package.version, package.arch, package.algorithm) == ("1.0", "amd64", "md5")


def test_only_packages_whose_files_are_all_unpacked_count(tmp_path):
    states = {"a": "install ok installed", "b": "install ok unpacked", "c": "install ok half-configured",
              "d": "install reinstreq half-installed", "e": "deinstall ok config-files",
              "f": "install ok triggers-pending", "g": "purge ok not-installed"}
    admin = database(tmp_path, [stanza(name, status) for name, status in states.items()],
                     {name: [entry(name.encode(), f"usr/lib/{name}")] for name in states})
    index, _ = index_of(admin)
    assert sorted(p.name for p in index.packages) == ["a", "b", "c", "f"]


def test_the_status_journal_overrides_status(tmp_path):
    admin = database(tmp_path, [stanza("tool", "install ok installed"), stanza("gone")],
                     {"tool": [entry(b"t", "usr/bin/tool")], "gone": [entry(b"g", "usr/bin/gone")]},
                     journal=[stanza("gone", "purge ok not-installed"), stanza("tool", version="2.0")])
    index, _ = index_of(admin)
    assert [(p.name, p.version) for p in index.packages] == [("tool", "2.0")]
    assert owners(index, "/usr/bin/gone") == []


def test_multi_arch_same_packages_are_read_from_their_arch_qualified_list(tmp_path):
    admin = database(tmp_path, [stanza("libc6", multi_arch="same"), stanza("libc6", arch="i386", multi_arch="same"),
                                stanza("bash", multi_arch="foreign")],
                     {"libc6:amd64": [entry(b"64", "usr/lib/x86_64-linux-gnu/libc.so.6")],
                      "libc6:i386": [entry(b"32", "usr/lib/i386-linux-gnu/libc.so.6")],
                      "bash": [entry(b"bash", "bin/bash")]})
    index, _ = index_of(admin)
    assert owners(index, "/usr/lib/i386-linux-gnu/libc.so.6") == [("libc6", md5(b"32"))]
    assert [p.arch for p, _ in index.lookup("/lib/x86_64-linux-gnu/libc.so.6")] == []  # /lib is not merged here
    assert owners(index, "/usr/lib/x86_64-linux-gnu/libc.so.6") == [("libc6", md5(b"64"))]
    assert owners(index, "/usr/bin/bash") == [("bash", md5(b"bash"))]


def test_a_diverted_file_is_found_where_the_diversion_put_it(tmp_path):
    diversions = ("/usr/bin/pg_config\n/usr/bin/pg_config.libpq-dev\npostgresql-common\n"
                  "/bin/sh\n/bin/sh.distrib\ndash\n"
                  "/usr/bin/local-tool\n/usr/bin/local-tool.orig\n:\n")
    admin = database(tmp_path, [stanza("postgresql-common"), stanza("libpq-dev"), stanza("dash"), stanza("tools")],
                     {"postgresql-common": [entry(b"wrapper", "usr/bin/pg_config")],
                      "libpq-dev": [entry(b"real", "usr/bin/pg_config")],
                      "dash": [entry(b"dash", "bin/sh")],
                      "tools": [entry(b"tool", "usr/bin/local-tool")]},
                     diversions)
    index, _ = index_of(admin)
    assert owners(index, "/usr/bin/pg_config") == [("postgresql-common", md5(b"wrapper"))]
    assert owners(index, "/usr/bin/pg_config.libpq-dev") == [("libpq-dev", md5(b"real"))]
    assert owners(index, "/usr/bin/sh") == [("dash", md5(b"dash"))]  # the diverting package keeps its name
    assert owners(index, "/usr/bin/local-tool") == []  # a local diversion moves every package's file
    assert owners(index, "/usr/bin/local-tool.orig") == [("tools", md5(b"tool"))]


def test_conffiles_are_never_indexed_even_when_a_list_names_them(tmp_path):
    conffiles = "\n /etc/app.conf 0123456789abcdef0123456789abcdef\n /etc/old.conf 0123 obsolete\n /etc/with space.conf 4567"
    admin = database(tmp_path, [stanza("app", conffiles=conffiles)],
                     {"app": [entry(b"conf", "etc/app.conf"), entry(b"conf", "etc/with space.conf"),
                              entry(b"bin", "usr/bin/app")]})
    index, _ = index_of(admin)
    assert owners(index, "/etc/app.conf") == owners(index, "/etc/with space.conf") == []
    assert owners(index, "/usr/bin/app") == [("app", md5(b"bin"))]


def test_a_path_claimed_by_two_packages_has_both_digests(tmp_path):
    admin = database(tmp_path, [stanza("old"), stanza("new")],
                     {"old": [entry(b"old", "bin/moved")], "new": [entry(b"new", "usr/bin/moved")]})
    index, _ = index_of(admin)
    assert sorted(owners(index, "/usr/bin/moved")) == [("new", md5(b"new")), ("old", md5(b"old"))]


def test_malformed_lines_are_skipped_and_named(tmp_path):
    admin = database(tmp_path, [stanza("app")],
                     {"app": [b"not a line\n", b"zz" * 16 + b"  usr/bin/x\n", entry(b"ok", "usr/bin/ok"),
                              md5(b"y").hex().encode() + b"\tusr/bin/tab\n", entry(b"spaces", "usr/share/a b  c")]})
    index, problems = index_of(admin)
    assert [where for where, _ in problems] == ["info/app.md5sums"] * 3
    assert owners(index, "/usr/bin/ok") == [("app", md5(b"ok"))]
    assert owners(index, "/usr/share/a b  c") == [("app", md5(b"spaces"))]


def test_the_version_changes_with_the_database(tmp_path):
    admin = database(tmp_path, [stanza("app")], {"app": [entry(b"one", "usr/bin/app")]})
    first, _ = index_of(admin)
    again, _ = index_of(admin)
    (admin / "info" / "app.md5sums").write_bytes(entry(b"two", "usr/bin/app"))
    changed, _ = index_of(admin)
    assert first.digest == again.digest != changed.digest


@pytest.mark.parametrize("where", ["status", "info/app.md5sums", "info", "diversions"])
def test_a_database_another_user_could_change_is_refused(tmp_path, where):
    admin = database(tmp_path, [stanza("app")], {"app": [entry(b"one", "usr/bin/app")]}, "/a\n/b\napp\n")
    os.chmod(admin / where, os.stat(admin / where).st_mode | 0o020)
    with pytest.raises(UntrustedError, match="another user could change"):
        index_of(admin)


def test_a_linked_list_is_refused(tmp_path):
    admin = database(tmp_path, [stanza("app")], {})
    (tmp_path / "elsewhere.md5sums").write_bytes(entry(b"one", "usr/bin/app"))
    os.symlink(tmp_path / "elsewhere.md5sums", admin / "info" / "app.md5sums")
    with pytest.raises(UntrustedError, match="symbolic link"):
        index_of(admin)
