"""Delivery: the shared mechanism of the sinks that send records elsewhere (docs/writing-plugins.md).

- ``DeliverySink``: records as documents (``format: jsonl`` or ``ecs``) with the host name; a detection
  already sent is held back for the pipeline's ``repeat_after`` (``repeats``).
- ``SpoolingSink``: for network sinks; implement ``send_batch(items)``. At-least-once delivery through a
  bounded on-disk ``spool``, with batches, retries (exponential backoff, jitter) and a call timeout;
  ``send_batch`` raises ``RetryLater`` for a wait the endpoint asked for, ``DeliveryRejected`` for records
  refused for good.
"""

from .sink import (DeliveryConfig, DeliveryRejected, DeliverySink, RetryLater, RetryOptions, SpoolingConfig,
                   SpoolingSink, SpoolOptions)
from .spool import Item, Spool

__all__ = ["DeliveryConfig", "DeliveryRejected", "DeliverySink", "Item", "RetryLater", "RetryOptions", "Spool",
           "SpoolOptions", "SpoolingConfig", "SpoolingSink"]
