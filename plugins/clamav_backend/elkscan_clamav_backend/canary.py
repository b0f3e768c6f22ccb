"""Proof that the daemon on a socket really judges: a buffer it must report, and one it must pass.

An impostor that answers ``OK`` to everything, or a clamd that loaded another database than the one it
should, fails this before any of its verdicts is taken. Both buffers are sent from memory (INSTREAM),
never written to a file that another scanner on the host would flag.
"""

from __future__ import annotations

import base64
import secrets

from attrs import frozen

from .protocol import ClamdClient, ClamdError

_EICAR_B64 = ("WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUh"
              "JEgrSCo=")
#: What every clamd must call clean.
CLEAN = b"elkscan canary: plain text that no signature matches\n"
#: The name of a managed clamd's own canary signature (clamd appends .UNOFFICIAL).
CANARY_SIGNATURE = "Elkscan.Canary-1"
#: The file that holds it, next to the rules in a managed clamd's private database directory.
CANARY_FILE = "elkscan-canary.ndb"


@frozen
class Canary:
    """A buffer clamd must report: as ``signature`` when set, as anything when not."""

    data: bytes
    what: str
    signature: str = ""

    def check(self, client: ClamdClient) -> None:
        """ClamdError unless clamd finds this buffer and passes the clean one."""
        found = client.scan_bytes(self.data).signatures
        if not found or (self.signature and not any(s in (self.signature, f"{self.signature}.UNOFFICIAL")
                                                    for s in found)):
            raise ClamdError(f"the daemon at {client.address} does not judge as clamd should: {self.what} "
                             f"came back {', '.join(found) + ' FOUND' if found else 'OK'}")
        reply = client.scan_bytes(CLEAN)
        if reply.signatures or reply.limits:
            raise ClamdError(f"the daemon at {client.address} does not judge as clamd should: a clean buffer "
                             f"came back {', '.join(reply.signatures + reply.limits)} FOUND")


def eicar_canary() -> Canary:
    """For a clamd elkscan does not manage: every freshclam database detects the EICAR test file."""
    return Canary(base64.b64decode(_EICAR_B64), "the EICAR test string")


def private_canary() -> tuple[Canary, str]:
    """For a managed clamd: a buffer new to this run and the ``.ndb`` line that detects it, so the
    check also proves that clamd loaded the database elkscan gave it."""
    data = b"elkscan canary " + secrets.token_hex(16).encode()
    return (Canary(data, "elkscan's canary buffer", CANARY_SIGNATURE),
            f"{CANARY_SIGNATURE}:0:*:{data.hex()}\n")
