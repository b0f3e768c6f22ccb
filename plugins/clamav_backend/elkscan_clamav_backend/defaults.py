"""The default rule bundle: the project's own ClamAV signatures and YARA rules, built on demand.

No binary bundle is kept in the repository; the Elkeid package builder and the tests call
``build_default_bundle`` (or ``elkscan db build --default``) to make one from the sources.
"""

from __future__ import annotations

import os
from importlib.resources import files

from elkscan_core.bundle import DEFAULT_PASSWORD, YARA_SUFFIXES, BuildReport, build_bundle

from .engine import default_signatures, digest_files


def default_yara_rules() -> list[str]:
    """The yara_backend plugin's shipped rules, or none when that plugin is not installed."""
    try:
        folder = files("elkscan_yara_backend.rules")
    except ModuleNotFoundError:
        return []
    return sorted(str(p) for p in folder.iterdir() if p.name.lower().endswith(YARA_SUFFIXES))


def default_version() -> str:
    """A version that changes exactly when the default rules change: ``default-<12 hex digits>``."""
    return "default-" + digest_files(default_signatures() + default_yara_rules())[:12]


def build_default_bundle(output: str | os.PathLike, *, password: str | bytes = DEFAULT_PASSWORD,
                         version: str | None = None) -> BuildReport:
    """Build the default bundle at ``output`` (+ ``.sign``); every signature is kept, none trimmed."""
    return build_bundle(output, version=version or default_version(), password=password,
                        clamav=default_signatures(), yara=default_yara_rules(), platforms=None)
