"""elkscan's file facts and hash matching: the ``hashes`` enricher (Elkeid's file set) and the
``hashlist`` engine (signatures that are digests of whole files)."""

from __future__ import annotations

from .digests import exe_hash, file_facts, read_digests
from .hashlist import HashIndex, HashListBuilder

__all__ = ["HashIndex", "HashListBuilder", "exe_hash", "file_facts", "read_digests"]
