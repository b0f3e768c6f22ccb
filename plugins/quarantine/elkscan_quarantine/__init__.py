"""elkscan's response to a detection: the ``quarantine`` sink moves judged files into a private vault,
by policy, and ``elkscan quarantine list|restore|purge`` manages what it holds."""

from __future__ import annotations

from .vault import Entry, Vault, VaultError

__all__ = ["Entry", "Vault", "VaultError"]
