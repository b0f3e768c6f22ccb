"""An elkscan enricher in a few lines: the Shannon entropy of each scanned file (packed or encrypted
payloads score close to 8 bits per byte)."""

import math
from collections import Counter

from elkscan_core import Enricher, hookimpl


class Entropy(Enricher):
    id = "entropy"
    wants = "all"  # every reported file, not only hits

    def enrich(self, subject, detections):
        data = subject.read(1 << 20)  # the first MiB, from the file the engines judged
        counts = Counter(data).values()
        bits = -sum(n / len(data) * math.log2(n / len(data)) for n in counts) if data else 0.0
        return {"entropy": round(bits, 3)}


@hookimpl
def elkscan_register_enrichers(registry):
    registry.add(Entropy)
