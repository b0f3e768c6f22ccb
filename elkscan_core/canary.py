"""Canaries: what each engine must detect, as an engine declares it or a pipeline entry names it (the
EICAR test string unless either says otherwise). canary_watch.py shows them to the engines while a
session runs.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Mapping
from typing import Any

from attrs import frozen

from .errors import ConfigError
from .model import Detection
from .trust import check_trusted

_EICAR_B64 = ("WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUh"
              "JEgrSCo=")
#: A canary sample a pipeline names is held in memory: it must be small.
MAX_SAMPLE = 1 << 20


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file, decoded at run time (no repository file holds it); by
    binascii, which base64.b64decode calls, without importing base64 and struct at every start."""
    return binascii.a2b_base64(_EICAR_B64)


@frozen
class Canary:
    """A buffer an engine must detect: as one of ``signatures`` when given, as anything when not."""

    data: bytes
    what: str
    signatures: tuple[str, ...] = ()

    def problem(self, detections: tuple[Detection, ...]) -> str:
        """What is wrong with the engine's answer to this buffer ('' when it is right)."""
        found = [d.signature for d in detections]
        if not found:
            return f"{self.what} came back clean"
        if self.signatures and not set(found) & set(self.signatures):
            return f"{self.what} came back as {', '.join(found)}, not {' or '.join(self.signatures)}"
        return ""


EICAR = Canary(eicar(), "the EICAR test string")


def from_pipeline(value: Any, resolve, where: str) -> Canary | None | str:
    """An engine entry's ``canary:`` as the session uses it: a Canary, None (``none``: opted out) or
    ``"default"`` (the engine's own). A sample file steers a health verdict: it must be ours."""
    if value is None:
        return "default"
    if value == "none":
        return None
    if value == "eicar":
        return EICAR
    path = resolve(value["file"])
    check_trusted(path, "canary sample")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SAMPLE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the canary sample {path}: {exc.strerror}", f"{where}.canary.file") from None
    if not data or len(data) > MAX_SAMPLE:
        raise ConfigError(f"the canary sample {path} must hold 1 byte to 1 MiB", f"{where}.canary.file")
    signature = value.get("signature")
    return Canary(data, f"the canary sample {os.path.basename(path)}", (signature,) if signature else ())


def check_value(value: Any, where: str) -> None:
    """Validate the shape of an engine entry's ``canary:`` (the file is read when the engine is built)."""
    if value in ("none", "eicar"):
        return
    if isinstance(value, Mapping) and isinstance(value.get("file"), str) and value["file"]:
        unknown = set(value) - {"file", "signature"}
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}", f"{where}.canary",
                              "a canary takes file and signature")
        if not isinstance(value.get("signature", ""), str):
            raise ConfigError("expected the name of the signature the sample must be reported as",
                              f"{where}.canary.signature")
        return
    raise ConfigError("expected none, eicar or {file: <sample>, signature: <name>}", f"{where}.canary",
                      "see docs/metrics.md#canaries")
