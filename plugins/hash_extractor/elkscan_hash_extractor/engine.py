"""The ``hashlist`` engine: detects files whose whole-file digest is on a hash list.

Hash lists come from the pipeline (``files:``) and from rule bundles (``reload()``: the bundle's hash
lists and its ClamAV ``.hdb``/``.hsb`` files, which Elkeid drops to save memory and elkscan keeps in a
compact index), or compiled indexes (``elkscan db hashes``, ``compiled.py``) answered from a memory
map that every verifier process shares. A file is hashed only when some signature has its size, so on most files the engine
costs one bisect; when it is hashed, every algorithm that could match comes from one read pass.

It also judges files it cannot read (``judge_digests``): a fleet verifier's digest targets, records other
hosts sent with their files' digests. Each detection's ``meta`` names the list that matched and the
algorithm.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import attrs
from attrs import frozen

from elkscan_core import ComponentError, Detection, Engine, Outcome, Size, Subject
from elkscan_core.trust import UntrustedError, check_trusted

from .compiled import is_compiled, open_index
from .digests import DEFAULT_CHUNK, read_digests
from .hashlist import ALGORITHMS, HashIndex, HashListBuilder, HashListError

log = logging.getLogger("elkscan.hashlist")
#: Extensions of ClamAV databases this engine reads itself (whole-file MD5 and SHA hashes).
CLAMAV_HASH_EXTENSIONS = (".hdb", ".hsb")


def positive_size(_instance, attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be above 0, got {value}")


@frozen
class HashlistConfig:
    """``files``: hash lists (paths or globs, relative to the pipeline file); ``chunk``: read size."""

    files: list[str] = attrs.field(factory=list)
    chunk: Size = attrs.field(default=Size(DEFAULT_CHUNK), validator=positive_size)


class HashlistEngine(Engine):
    """Matches MD5, SHA-1 and SHA-256 of whole files against the loaded hash lists."""

    id = "hashlist"
    Config = HashlistConfig
    #: It knows only the files its lists name: a pipeline that wants it checked names a listed sample
    #: (``canary: {file: ...}``).
    canary = None
    judges_digests = True

    def __init__(self, config: HashlistConfig, session) -> None:
        super().__init__(config, session)
        self.configured: list[str] = []
        self.index = HashIndex({})

    def check(self) -> None:
        """Find, trust-check and parse the lists, as ``start`` would; the index is not kept."""
        self._start_index(self._lists())

    def start(self) -> None:
        self.configured = self._lists()
        self.index = self._start_index(self.configured)

    def _start_index(self, paths: Sequence[str]) -> HashIndex:
        try:
            return self._load(paths)
        except HashListError as exc:
            raise ComponentError(str(exc)) from None

    def _lists(self) -> list[str]:
        """The configured lists, each refused when a user other than root or this one could change it:
        lines another user wrote would be read as root and could raise false alarms or fill memory."""
        paths = self._expand(self.config.files)
        try:
            for path in paths:
                if os.path.lexists(path):  # a missing one is reported by the reader, with its name
                    check_trusted(path, "hash list")
        except UntrustedError as exc:
            raise ComponentError(str(exc)) from None
        return paths

    def _expand(self, patterns: Sequence[str]) -> list[str]:
        paths = []
        for number, pattern in enumerate(patterns):
            resolved = pattern if os.path.isabs(pattern) else self.session.resolve_path(pattern)
            is_glob = any(char in resolved for char in "*?[")
            found = sorted(glob.glob(resolved)) if is_glob else [resolved]
            if not found:
                raise ComponentError(f"files[{number}] {pattern!r} matches no file; check the path "
                                     "(relative paths start at the pipeline file's directory)")
            paths.extend(found)
        return paths

    def _load(self, paths: Sequence[str]) -> HashIndex:
        """Text lists are parsed into one in-memory index; a compiled index (told by its magic,
        whatever its name) is mapped and answers from the map, shared with other processes."""
        builder, mapped = HashListBuilder(), []
        for path in paths:
            if is_compiled(path):
                mapped.append(open_index(path))
            else:
                builder.add_file(path)
        index = builder.build()
        if mapped:
            import hashlib  # here, not at import: it loads OpenSSL (docs/performance.md)

            for _, tables in mapped:
                for algorithm, table in tables.items():
                    index.tables.setdefault(algorithm, []).append(table)
            index.digest = hashlib.sha256(" ".join([index.digest, *(d for d, _ in mapped)]).encode()).hexdigest()
        by_file: dict[str, list[str]] = {}
        for path, number, reason in builder.problems:
            by_file.setdefault(path, []).append(f"line {number}: {reason}")
        for path, problems in by_file.items():
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            self.session.report(Outcome(self.id, "failed", target=path,
                                        message=f"skipped {len(problems)} malformed line(s): {shown}"))
        log.info("hashlist: %d signatures from %d file(s) in %.1f MB (and %.1f MB mapped)", len(index),
                 len(paths), index.memory() / 1e6, index.mapped() / 1e6)
        return index

    def reload(self, rules: Mapping[str, Sequence[str]]) -> None:
        """Take a new bundle's hash lists (``hashes``, and ``.hdb``/``.hsb`` among ``clamav``); the
        pipeline's own ``files`` stay loaded. On an error the old lists stay in use."""
        bundled = list(rules.get("hashes", []))
        bundled += [p for p in rules.get("clamav", []) if p.lower().endswith(CLAMAV_HASH_EXTENSIONS)]
        self.index = self._load([*self.configured, *bundled])  # HashListError keeps the old index

    def version(self) -> str:
        index = self.index
        return f"hashlist {len(index)} signatures sha256:{index.digest[:16]}"

    def scan(self, subject: Subject) -> list[Detection]:
        index = self.index  # one consistent index for the whole call, even during a reload
        size = subject.size
        algorithms = index.algorithms_for(size)
        if not algorithms:
            return []
        _, digests = read_digests(subject.fd, size, algorithms, chunk=self.config.chunk)
        hex_digests = {name: digest.hex() for name, digest in digests.items()}
        return self._detections(index, digests, size, {"digests": hex_digests})

    def judge_digests(self, digests: Mapping[str, str], size: Optional[int]) -> list[Detection]:
        """A file known by its digests (hex) and size: what ``scan`` would find in it. Without a size
        (None), a digest matches whatever size its signature gives: a second file with the MD5, SHA-1 or
        SHA-256 of a listed one cannot be made. ValueError for a digest that is not hex of its width."""
        raw = {}
        for name, value in digests.items():
            width = ALGORITHMS.get(name)
            if width is None:
                continue  # an algorithm no list has
            try:
                digest = bytes.fromhex(value) if isinstance(value, str) and value.isascii() else b""
            except ValueError:
                digest = b""
            if len(digest) != width:
                raise ValueError(f"{name} digest {value!r:.80} is not {2 * width} hex digits")
            raw[name] = digest
        return self._detections(self.index, raw, size, {})

    def _detections(self, index: HashIndex, digests: Mapping[str, bytes], size: Optional[int],
                    meta: Mapping[str, object]) -> list[Detection]:
        """One detection per signature matched by any of ``digests`` (raw), naming its list file."""
        detections, seen = [], set()
        for name, digest in digests.items():
            for signature, listed in index.matches(name, digest, size):
                if signature not in seen:
                    seen.add(signature)
                    detections.append(Detection.from_signature(
                        self.id, signature, meta={"algorithm": name, "list": listed, **meta}))
        return detections
