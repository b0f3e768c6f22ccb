"""The SHA-256 the source reports for a written file (``file_hash``), read through an open fd."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1024 * 1024


def sha256_fd(fd: int, limit: int) -> str:
    """SHA-256 of the whole file read through ``fd``; "" when it is larger than ``limit`` or unreadable."""
    digest = hashlib.sha256()
    try:
        if os.fstat(fd).st_size > limit:
            return ""
        offset = 0
        while True:
            chunk = os.pread(fd, _CHUNK, offset)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)
            offset += len(chunk)
            if offset > limit:
                return ""
    except OSError:
        return ""
