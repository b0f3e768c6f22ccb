"""rpm's database, through the ``rpm`` command: one line per file of every installed package,

    <name> TAB <version>-<release> TAB <arch> TAB <digest algorithm> TAB <file flags> TAB <digest> TAB <path>

(``QUERY``; ``rpm -qa --dump`` gives the same digests but not the package of each file). The digest
algorithm is per package (rpm's numbers: 1 MD5, 2 SHA-1, 8 SHA-256, ...; none given: MD5, as rpm 4
before file digests were configurable). Config files (flag 1) are exempt; ghost files (flag 64),
directories and links have no digest and are not indexed.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Iterable

from elkscan_core.trust import check_trusted, check_trusted_tree

from .files import lock_held, state
from .index import ALGORITHMS, IndexBuilder, Package

QUERY = ("[%{=NAME}\\t%{=VERSION}-%{=RELEASE}\\t%{=ARCH}\\t%{=FILEDIGESTALGO}\\t%{FILEFLAGS}\\t"
         "%{FILEDIGESTS}\\t%{FILENAMES}\\n]")
#: rpm's (OpenPGP's) hash algorithm numbers.
DIGEST_ALGORITHMS = {b"1": "md5", b"2": "sha1", b"8": "sha256", b"9": "sha384", b"10": "sha512", b"11": "sha224",
                     b"(none)": "md5", b"": "md5"}
CONFIG, GHOST = 1, 64
#: Where rpm keeps its database (``rpm --eval %_dbpath``), newest layout first.
DBPATHS = ("/var/lib/rpm", "/usr/lib/sysimage/rpm")
RPM = ("/usr/bin/rpm", "/bin/rpm")
TIMEOUT = 300.0


def parse_rpm_files(lines: Iterable[bytes], builder: IndexBuilder) -> None:
    """Add every file of ``QUERY``'s output to ``builder``; a malformed line is noted and skipped."""
    numbers: dict[tuple[bytes, bytes, bytes], int] = {}
    for count, line in enumerate(lines, 1):
        fields = builder.read(line).rstrip(b"\n").split(b"\t", 6)
        if len(fields) != 7:
            if line.strip():
                builder.problems.append(("rpm", f"line {count}: expected 7 tab-separated fields"))
            continue
        name, evr, arch, algorithm_number, flags, digest_hex, path = fields
        if not digest_hex or not path.startswith(b"/"):
            continue  # a directory, a link or a ghost: no content to verify
        algorithm = DIGEST_ALGORITHMS.get(algorithm_number)
        try:
            flag_bits = int(flags)
            digest = bytes.fromhex(digest_hex.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            flag_bits, digest = -1, b""
        if algorithm is None or flag_bits < 0 or len(digest) != ALGORITHMS[algorithm]:
            builder.problems.append(("rpm", f"line {count}: {name.decode('utf-8', 'replace')}: unknown "
                                            "digest algorithm, flags or digest"))
            continue
        if flag_bits & CONFIG:
            builder.exempt(path)
            continue
        if flag_bits & GHOST:
            continue
        key = (name, evr, arch)
        number = numbers.get(key)
        if number is None:
            number = numbers[key] = builder.package(Package(
                name.decode("utf-8", "replace"), evr.decode("utf-8", "replace"),
                "" if arch == b"(none)" else arch.decode("utf-8", "replace"), algorithm))
        builder.add(number, path, digest)


class RpmDatabase:
    """The rpm database, read through the ``rpm`` command into an ``IndexBuilder``."""

    manager = "rpm"

    def __init__(self, dbpath: str | None = None) -> None:
        self.dbpath = dbpath or next((p for p in DBPATHS if os.path.isdir(p)), DBPATHS[0])
        self.rpm = next((p for p in RPM if os.path.exists(p)), RPM[0])

    def check(self) -> None:
        """Refuse an rpm command or a database another user could change (UntrustedError)."""
        check_trusted(self.rpm, "rpm command")
        check_trusted_tree(self.dbpath, "rpm database")

    def state(self) -> tuple:
        try:
            names = sorted(os.listdir(self.dbpath))
        except OSError:
            names = []
        return (state(self.dbpath), tuple(names), state(*(os.path.join(self.dbpath, n) for n in names)))

    def busy(self) -> bool:
        return lock_held(os.path.join(self.dbpath, ".rpm.lock"))

    def load(self, builder: IndexBuilder) -> None:
        self.check()
        command = [self.rpm, "--dbpath", self.dbpath, "-qa", "--qf", QUERY]
        with tempfile.TemporaryFile() as errors, subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL,
                env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}) as process:
            timer = threading.Timer(TIMEOUT, process.kill)  # a hung rpm must not hang start-up
            timer.start()
            try:
                parse_rpm_files(process.stdout, builder)
                process.wait()
            finally:
                timer.cancel()
                process.kill()
            if process.returncode:
                errors.seek(0)
                said = errors.read(4096).decode("utf-8", "replace").strip().splitlines()
                raise OSError(f"{self.rpm} -qa failed (exit status {process.returncode})"
                              + (f": {said[-1]}" if said else ""))
