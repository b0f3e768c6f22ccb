"""Delivery: the shared mechanism of the sinks that send records elsewhere (docs/writing-plugins.md).

- ``DeliverySink``: records as documents (``format: jsonl`` or ``ecs``) with the host name; a detection
  already sent is held back for the pipeline's ``repeat_after`` (``repeats``).
- ``SpoolingSink``: for network sinks; implement ``send_batch(items)``. At-least-once delivery through a
  bounded on-disk ``spool``, with batches, retries (exponential backoff, jitter) and a call timeout.
"""

from .sink import (DeliveryConfig, DeliveryRejected, DeliverySink, RetryOptions, SpoolingConfig, SpoolingSink,
                   SpoolOptions)
from .spool import Item, Spool

__all__ = ["DeliveryConfig", "DeliveryRejected", "DeliverySink", "Item", "RetryOptions", "Spool",
           "SpoolOptions", "SpoolingConfig", "SpoolingSink"]
