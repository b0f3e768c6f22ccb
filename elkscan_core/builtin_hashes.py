"""SHA-256 and BLAKE2b from CPython's own implementations instead of OpenSSL's.

``import hashlib`` loads OpenSSL's libcrypto (about 3.5 MB resident, relocated pages that are the
process's own) even when only a digest of a few hundred bytes is needed. What a scan hashes on its way
(record ids, the verdict cache's keys, the rules' identity at start) is small, so the built-in
implementations do it. Bulk hashing of files (the hashes enricher, hash lists) still uses hashlib, loaded
when first needed (docs/performance.md, "Memory: what a scan holds").
"""

from __future__ import annotations

try:
    from _blake2 import blake2b
except ImportError:  # a Python built without its own BLAKE2 (never seen): OpenSSL's
    from hashlib import blake2b

try:
    from _sha2 import sha256  # Python 3.12 and later
except ImportError:
    try:
        from _sha256 import sha256  # Python 3.9 to 3.11
    except ImportError:  # built with --without-builtin-hashlib-hashes
        from hashlib import sha256

__all__ = ["blake2b", "sha256"]
