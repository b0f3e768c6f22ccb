"""Rule bundles: versioned, password-protected zips of ClamAV signatures, YARA rules and a hash list.

Elkeid ships its rule database this way (docs/elkeid-protocol.md section 7): a zip encrypted with a
password, a text ``version`` file inside, and ``<name>.sign`` beside it holding the zip's hex SHA-256.
``open_bundle`` checks all three and extracts the files flat into a private directory, refusing
anything that could write outside it or exhaust the disk; ``build_bundle`` makes one the Elkeid way
from unpacked ClamAV databases (``sigtool --unpack`` output) and YARA files. The file format of each
kind is in docs/bundles.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs
from attrs import frozen

from .errors import ElkscanError
from .trust import UntrustedError, check_trusted, check_trusted_tree

#: Elkeid's bundle password (``clamav_default_passwd``); set your own for your bundles.
DEFAULT_PASSWORD = "clamav_default_passwd"

#: Elkeid keeps ``.ldb``/``.ndb`` signatures whose name's first dot-part is one of these.
SERVER_PLATFORMS: tuple[str, ...] = (
    "Txt", "Php", "Clamav", "Unix", "Legacy", "Html", "Java", "Archive", "Js", "Rtf", "Tif", "Symbos",
    "Py", "Rat", "Xml", "Multios", "Asp",
)

#: File name endings of each rule kind inside a bundle.
CLAMAV_SUFFIXES = (".ldb", ".ndb", ".hdb", ".hsb", ".mdb", ".msb", ".cdb", ".cvd", ".cld", ".cud",
                   ".fp", ".sfp", ".ign", ".ign2", ".ftm", ".idb", ".pdb", ".wdb", ".gdb", ".crb",
                   ".info", ".cfg", ".imp", ".cbc")
YARA_SUFFIXES = (".yar", ".yara")
HASHLIST_SUFFIX = ".hashes"
VERSION_FILE = "version"
NAME_MAX = 255  # bytes in one file name, on every Linux filesystem elkscan extracts to
_SIGN_MAX = 4096  # a .sign holds 64 hex digits; anything longer is not one


class BundleError(ElkscanError):
    """A rule bundle cannot be used; the message says which check failed and what to do."""


@frozen
class Limits:
    """Caps applied while extracting, so a hostile or broken archive cannot exhaust the disk."""

    max_entries: int = 10_000
    max_total_size: int = 1024 * 1024 * 1024
    max_ratio: float = 200.0


@frozen
class Bundle:
    """An extracted bundle: where its files are, its version, and its rule files by kind
    (``"clamav"``, ``"yara"``, ``"hashes"``), each a sorted list of absolute paths. ``encrypted``:
    every entry was encrypted, so the password was checked."""

    directory: str
    version: str
    rules: Mapping[str, Sequence[str]] = attrs.field(factory=dict)
    encrypted: bool = False


def rule_kind(name: str) -> str | None:
    """The kind of a rule file by its name, or None for a file no engine reads."""
    lower = name.lower()
    if lower.endswith(CLAMAV_SUFFIXES):
        return "clamav"
    if lower.endswith(YARA_SUFFIXES):
        return "yara"
    if lower.endswith(HASHLIST_SUFFIX):
        return "hashes"
    return None


def classify(paths: Iterable[str]) -> dict[str, list[str]]:
    """Group rule files by kind; files of no known kind are left out."""
    rules: dict[str, list[str]] = {"clamav": [], "yara": [], "hashes": []}
    for path in sorted(paths):
        kind = rule_kind(os.path.basename(path))
        if kind:
            rules[kind].append(path)
    return rules


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_regular(path: str, what: str) -> int:
    """A descriptor of ``path`` that is a regular file. Opened non-blocking, so a FIFO put in its place
    cannot hang the caller, and checked after opening, so what is read is what was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise BundleError(f"{what} {path} cannot be opened: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{what} {path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_sign(path: str | os.PathLike) -> str:
    """The hex SHA-256 in a ``<name>.sign`` file (whitespace trimmed, lowercased); refused when another
    user could change it."""
    with os.fdopen(_open_regular(os.fspath(path), "signature file"), "rb") as handle:
        _trusted(check_trusted, path, "bundle signature")
        data = handle.read(_SIGN_MAX)
    text = data.decode(errors="replace").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise BundleError(f"{path}: not a SHA-256 signature file (expected 64 hex digits)")
    return text


# -- opening -----------------------------------------------------------------------------------


def open_bundle(path: str | os.PathLike, *, password: str | bytes, version: str | None = None,
                sha256: str | None = None, dest: str | os.PathLike,
                limits: Limits = Limits()) -> Bundle:
    """Verify and extract a bundle into ``dest`` (created 0700; must be empty or new).

    Checks, in order: the archive's SHA-256 (when ``sha256`` is given), that it is a readable zip,
    that every entry is a plain file name within the caps, the password, and the ``version`` entry
    (when ``version`` is given). Each failure raises ``BundleError`` naming the bundle and the fix. A
    bundle another user could change is refused: it would decide the rules (``elkscan_core.trust``).
    """
    path = os.fspath(path)
    with os.fdopen(_open_regular(path, "rule bundle"), "rb") as handle:
        _trusted(check_trusted, path, "rule bundle")
        return _open(path, handle, password, version, sha256, dest, limits)


def _open(path: str, handle, password: str | bytes, version: str | None, sha256: str | None,
          dest: str | os.PathLike, limits: Limits) -> Bundle:
    if sha256 is not None:
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
        actual = digest.hexdigest()
        if actual != sha256.strip().lower():
            raise BundleError(f"rule bundle {path} has SHA-256 {actual}, expected {sha256.strip().lower()}: "
                              "the download is damaged or not the bundle you meant; fetch it again")
        handle.seek(0)
    secret = password.encode() if isinstance(password, str) else password
    import pyzipper

    try:
        archive = pyzipper.AESZipFile(handle)
    except Exception as exc:  # as in _read_entry: whatever parsing hostile bytes raises means damage
        raise BundleError(f"rule bundle {path} is truncated or not a zip archive ({exc}); "
                          "fetch it again") from None
    with archive:
        archive.setpassword(secret)
        entries = _checked_entries(path, archive.infolist(), limits, os.fstat(handle.fileno()).st_size)
        names = {info.filename for info in entries}
        if VERSION_FILE not in names:
            raise BundleError(f"rule bundle {path} has no '{VERSION_FILE}' file; it was not made by "
                              "'elkscan db build' or Elkeid's updater")
        found = _read_entry(path, archive, archive.getinfo(VERSION_FILE), limits.max_total_size)
        found_version = found.decode(errors="replace").strip()
        if version is not None and found_version != str(version).strip():
            raise BundleError(f"rule bundle {path} holds version {found_version!r}, expected "
                              f"{str(version).strip()!r}: the wrong bundle, or a stale copy")
        directory = _private_dir(dest)
        written: list[str] = []
        try:
            _extract(path, archive, entries, directory, limits, written)
        except BaseException:
            for target in written:  # a half-extracted bundle must not be mistaken for a whole one
                os.unlink(target)
            raise
    encrypted = all(info.flag_bits & 0x1 for info in entries)
    return Bundle(directory=directory, version=found_version, rules=classify(written), encrypted=encrypted)


def _extract(path: str, archive, entries: list[zipfile.ZipInfo], directory: str, limits: Limits,
             written: list[str]) -> None:
    total = 0
    for info in entries:
        target = os.path.join(directory, info.filename)
        data = _read_entry(path, archive, info, limits.max_total_size - total)
        total += len(data)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            written.append(target)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise BundleError(f"rule bundle {path}: cannot write {info.filename!r} into {directory}: "
                              f"{exc.strerror}") from None


def _trusted(check, path: str | os.PathLike, what: str) -> None:
    try:
        check(path, what)
    except UntrustedError as exc:
        raise BundleError(str(exc)) from None


def _private_dir(dest: str | os.PathLike) -> str:
    directory = os.path.abspath(os.fspath(dest))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"bundle destination {directory} is not a directory")
    if os.listdir(directory):
        raise BundleError(f"bundle destination {directory} is not empty; extract into a new directory")
    os.chmod(directory, 0o700)
    return directory


def _checked_entries(path: str, entries: list[zipfile.ZipInfo], limits: Limits,
                     archive_size: int) -> list[zipfile.ZipInfo]:
    """Refuse anything but a flat set of plain files within the caps, before extracting a byte. The
    expansion ratio is checked for each entry and for the whole archive, so a bomb split into many
    entries is refused too."""
    if len(entries) > limits.max_entries:
        raise BundleError(f"rule bundle {path} has {len(entries)} entries, more than the cap of "
                          f"{limits.max_entries}; refusing it")
    seen, declared = set(), 0
    for info in entries:
        name = info.filename
        mode = info.external_attr >> 16
        if (not name or "/" in name or "\\" in name or "\0" in name or name in (".", "..")
                or name.startswith(".") or info.is_dir()):
            raise BundleError(f"rule bundle {path} holds an unsafe entry {name!r}: a bundle may hold only "
                              "plain file names, no directories or paths; refusing it")
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise BundleError(f"rule bundle {path} holds an entry whose name is longer than {NAME_MAX} bytes "
                              f"({name[:40]!r}...); no filesystem can hold it; refusing it")
        if mode and not stat.S_ISREG(mode):
            raise BundleError(f"rule bundle {path} holds an unsafe entry {name!r}: it is a link or special "
                              "file, not a regular file; refusing it")
        if name in seen:
            raise BundleError(f"rule bundle {path} holds {name!r} twice; refusing it")
        seen.add(name)
        declared += info.file_size
        if declared > limits.max_total_size:
            raise BundleError(f"rule bundle {path} would extract to more than {limits.max_total_size} bytes; "
                              "refusing it (raise the size cap if the bundle is genuine)")
        if info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise BundleError(f"rule bundle {path}: entry {name!r} expands {info.file_size} bytes from "
                              f"{info.compress_size} (more than {limits.max_ratio:g}:1), a zip bomb; "
                              "refusing it")
    if declared > limits.max_ratio * max(archive_size, 1):
        raise BundleError(f"rule bundle {path} expands to {declared} bytes from {archive_size} (more than "
                          f"{limits.max_ratio:g}:1 over all its entries), a zip bomb; refusing it")
    return entries


def _read_entry(path: str, archive, info: zipfile.ZipInfo, budget: int) -> bytes:
    """One entry's bytes, decrypted and checked, reading no more than it declares or the budget."""
    cap = min(info.file_size, budget)
    try:
        with archive.open(info) as handle:
            data = handle.read(cap + 1)
    except RuntimeError as exc:  # pyzipper: "Bad password for file ..." (AES and ZipCrypto)
        if "password" in str(exc).lower():
            raise BundleError(f"rule bundle {path}: wrong password (check the password the bundle was "
                              "built with)") from None
        raise BundleError(f"rule bundle {path} cannot be read: {exc}") from None
    except NotImplementedError as exc:
        raise BundleError(f"rule bundle {path}: entry {info.filename!r} uses an unsupported method "
                          f"({exc})") from None
    except Exception as exc:
        # pyzipper parses hostile bytes: whatever it raises on them (BadZipFile, zlib.error, a KeyError
        # for an unknown AES strength, struct.error, ...) means a damaged archive, never a crash.
        # A CRC mismatch is what ZipCrypto's weak password check lets through 1 time in 256.
        hint = " or the password is wrong" if info.flag_bits & 0x1 and "CRC" in str(exc) else ""
        raise BundleError(f"rule bundle {path} is truncated or corrupt at {info.filename!r} ({exc}){hint}; "
                          "fetch it again") from None
    if len(data) > cap:
        raise BundleError(f"rule bundle {path}: entry {info.filename!r} is larger than it declares or "
                          "than the size cap; refusing it")
    if len(data) != info.file_size:
        raise BundleError(f"rule bundle {path} is truncated at {info.filename!r}; fetch it again")
    return data


# -- building ----------------------------------------------------------------------------------


@attrs.define
class BuildReport:
    """What ``build_bundle`` kept and dropped, per signature type, and what it wrote."""

    path: str = ""
    sign_path: str = ""
    sha256: str = ""
    version: str = ""
    kept: dict[str, int] = attrs.field(factory=dict)
    dropped: dict[str, int] = attrs.field(factory=dict)
    files: list[str] = attrs.field(factory=list)

    def count(self, table: dict[str, int], kind: str, n: int = 1) -> None:
        table[kind] = table.get(kind, 0) + n


_HASH_ALGOS = {32: "md5", 40: "sha1", 64: "sha256"}


def _platform(signature_name: str) -> str:
    return signature_name.split(".", 1)[0]


def _lines(path: Path) -> Iterable[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            line = line.rstrip("\r\n")
            if line and not line.startswith("#"):
                yield line


def hash_entry(line: str, suffix: str) -> tuple[str, str, str, str] | None:
    """Parse one ``.hdb`` (``md5:size:name``) or ``.hsb`` (``hash:size:name``) line, or None."""
    parts = line.split(":")
    if len(parts) < 3:
        return None
    digest, size, name = parts[0].lower(), parts[1], parts[2]
    algo = _HASH_ALGOS.get(len(digest))
    if algo is None or (suffix == ".hdb" and algo != "md5") or not re.fullmatch(r"[0-9a-f]+", digest):
        return None
    if not (size == "*" or size.isdigit()) or not name:
        return None
    return algo, digest, size, name


def _collect(paths: Iterable[str | os.PathLike], suffixes: tuple[str, ...]) -> list[Path]:
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            _trusted(check_trusted_tree, path, "bundle input")
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes))
        elif path.is_file():
            _trusted(check_trusted, path, "bundle input")
            found.append(path)
        else:
            raise BundleError(f"{path}: no such file or directory")
    return found


def build_bundle(output: str | os.PathLike, *, version: str, password: str | bytes = DEFAULT_PASSWORD,
                 clamav: Iterable[str | os.PathLike] = (), yara: Iterable[str | os.PathLike] = (),
                 platforms: Sequence[str] | None = SERVER_PLATFORMS) -> BuildReport:
    """Build a bundle at ``output`` (a ``.zip``) and ``<output without .zip>.sign`` beside it.

    ``clamav``: unpacked ClamAV database files or directories. ``.ldb``/``.ndb`` signatures whose
    platform prefix is in ``platforms`` (None: all) are merged into ``main.ldb``/``main.ndb``;
    ``.hdb``/``.hsb`` hash signatures with a kept prefix go into ``main.hashes`` (docs/bundles.md);
    every other signature type is dropped and counted. ``yara``: rule files or directories, each
    compiled to check it. Raises BundleError when an input is missing or a YARA file does not compile.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", version or ""):
        raise BundleError(f"bundle version {version!r} must be letters, digits, '.', '_' or '-'")
    keep = None if platforms is None else set(platforms)
    report = BuildReport(version=version)
    merged: dict[str, list[str]] = {".ldb": [], ".ndb": []}
    hashes: set[str] = set()
    for path in _collect(clamav, CLAMAV_SUFFIXES):
        suffix = path.suffix.lower()
        if suffix in (".cvd", ".cld", ".cud"):
            raise BundleError(f"{path} is a packed ClamAV database: unpack it first (sigtool --unpack "
                              f"{path.name}, in an empty directory) and pass that directory")
        for line in _lines(path):
            if suffix in (".ldb", ".ndb"):
                name = line.split(";" if suffix == ".ldb" else ":", 1)[0]
                if keep is None or _platform(name) in keep:
                    merged[suffix].append(line)
                    report.count(report.kept, suffix)
                else:
                    report.count(report.dropped, suffix)
            elif suffix in (".hdb", ".hsb"):
                entry = hash_entry(line, suffix)
                if entry is not None and (keep is None or _platform(entry[3]) in keep):
                    hashes.add(":".join(entry))
                    report.count(report.kept, suffix)
                else:
                    report.count(report.dropped, suffix)
            else:
                report.count(report.dropped, suffix)
    yara_files = _collect(yara, YARA_SUFFIXES)
    check_yara(yara_files)
    report.count(report.kept, ".yar", len(yara_files))

    contents: dict[str, bytes] = {VERSION_FILE: f"{version}\n".encode()}
    for suffix, lines in merged.items():
        if lines:
            contents[f"main{suffix}"] = ("\n".join(dict.fromkeys(lines)) + "\n").encode(
                "utf-8", "surrogateescape")
    if hashes:
        contents[f"main{HASHLIST_SUFFIX}"] = ("\n".join(sorted(hashes)) + "\n").encode()
    for index, path in enumerate(yara_files):
        # Elkeid names its one YARA file online_<version>.yar; several keep their names, numbered.
        name = (f"online_{version}{path.suffix.lower()}" if len(yara_files) == 1
                else f"online_{index:03d}_{path.name}")
        contents[name] = path.read_bytes()
    _write_zip(Path(output), contents, password)
    report.path = os.fspath(output)
    report.sha256 = sha256_file(output)
    report.sign_path = os.fspath(sign_path_for(output))
    Path(report.sign_path).write_text(report.sha256 + "\n")
    report.files = sorted(contents)
    return report


def sign_path_for(bundle_path: str | os.PathLike) -> Path:
    """``archive_db_default_1.zip`` -> ``archive_db_default_1.sign`` (Elkeid's layout)."""
    path = Path(bundle_path)
    return path.with_suffix(".sign") if path.suffix.lower() == ".zip" else path.with_name(path.name + ".sign")


#: The external variables the yara engine defines per file; rules may use them.
_YARA_EXTERNALS = {"filename": "", "filepath": "", "extension": "", "filetype": "", "owner": ""}


def check_yara(paths: Sequence[str | os.PathLike]) -> None:
    """Compile each YARA file as the yara engine will (its external variables defined), so a bundle
    that ``db build`` makes or ``db verify`` accepts loads; BundleError names the first that fails."""
    if not paths:
        return
    try:
        import yara
    except ImportError:
        raise BundleError("yara-python is needed to check YARA files; pip install yara-python") from None
    for path in paths:
        try:
            yara.compile(filepath=os.fspath(path), externals=_YARA_EXTERNALS)
        except yara.Error as exc:
            raise BundleError(f"{path}: YARA rules do not compile: {exc}") from None


def _write_zip(output: Path, contents: Mapping[str, bytes], password: str | bytes) -> None:
    """Write atomically: an AES-encrypted zip appears complete or not at all."""
    import pyzipper

    secret = password.encode() if isinstance(password, str) else password
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(fd)
    try:
        with pyzipper.AESZipFile(tmp, "w", compression=pyzipper.ZIP_DEFLATED,
                                 encryption=pyzipper.WZ_AES) as archive:
            archive.setpassword(secret)
            for name, data in sorted(contents.items()):
                info = archive.zipinfo_cls(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = pyzipper.ZIP_DEFLATED
                archive.writestr(info, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise
