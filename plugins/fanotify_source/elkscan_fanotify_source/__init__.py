"""elkscan's fanotify source: file events, on-access scanning and anti-ransomware decoys (id ``fanotify``)."""

from __future__ import annotations
