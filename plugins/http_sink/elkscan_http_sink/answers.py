"""What an endpoint answers, read as untrusted bytes: the verdict of a status code, ``Retry-After``, a
short printable excerpt of a body, and the per-record verdicts of an Elasticsearch ``_bulk`` answer.

Every function here takes whatever a server (or whatever sits in front of it) sends and either returns
a bounded, well-formed value or raises ``ValueError``; tests/test_answers.py fuzzes them.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import re
from typing import Any, NamedTuple, Optional

from elkscan_core.text import visible

#: The verdicts: delivered, try again later, refused for good.
DELIVERED, RETRY, REFUSED = "delivered", "retry", "refused"
#: 4xx that say nothing against the records themselves: a timeout, too many requests, and credentials
#: refused (a token that expired or was rotated: the records wait in the spool until it is fixed).
_RETRY_4XX = {401, 403, 407, 408, 429}
EXCERPT = 200  # characters of a body quoted in a message
_SECONDS = re.compile(r"[0-9]{1,12}")
_LONGEST_WAIT = 7 * 86400.0


def verdict(status: int) -> str:
    """2xx delivered; 408, 429, 401, 403, 407 and 5xx (and anything else: 1xx, 3xx) retried; other 4xx
    refused for good."""
    if 200 <= status < 300:
        return DELIVERED
    if 400 <= status < 500 and status not in _RETRY_4XX:
        return REFUSED
    return RETRY


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date; RFC 9110 10.2.3),
    at least 0 and at most a week; None when absent or not understood."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return min(float(value), _LONGEST_WAIT)
    if len(value) > 64 or not value.isascii():
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # Python < 3.10 returns None for some junk
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    try:
        wait = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return min(max(wait, 0.0), _LONGEST_WAIT)


def excerpt(body: bytes, limit: int = EXCERPT) -> str:
    """The start of a body for a one-line message: at most ``limit`` characters, bytes that are not
    UTF-8 as ``\\xHH``, control and format characters (newlines, escapes, bidi overrides) escaped."""
    text = visible(body[:limit * 4].decode("utf-8", "surrogateescape"))
    return text[:limit] + "..." if len(text) > limit or len(body) > limit * 4 else text


class ItemVerdict(NamedTuple):
    """One record's fate in a ``_bulk`` answer: a verdict and, when not delivered, why (one line)."""

    verdict: str
    reason: str = ""


def bulk_verdicts(body: bytes, ids: list[str]) -> list[ItemVerdict]:
    """The verdict of each record of a ``_bulk`` request whose answer was a 2xx, in the order sent
    (``ids``). ``errors: false``: all delivered. Else each item's ``status``: 2xx, and 409 (``create`` of
    an id already indexed: a redelivery), delivered; 408, 429, 5xx retried; other 4xx refused. Raises
    ValueError when the answer is not a ``_bulk`` answer for exactly these records."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("errors"), bool):
        raise ValueError("no 'errors' flag")
    if answer["errors"] is False:
        return [ItemVerdict(DELIVERED)] * len(ids)
    items = answer.get("items")
    if not isinstance(items, list) or len(items) != len(ids):
        raise ValueError(f"{len(items) if isinstance(items, list) else 'no'} items for {len(ids)} records")
    return [_item(item, expected) for item, expected in zip(items, ids)]


def _item(item: Any, expected: str) -> ItemVerdict:
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError("an item is not one action")
    (result,) = item.values()
    if not isinstance(result, dict):
        raise ValueError("an item is not a mapping")
    status = result.get("status")
    if type(status) is not int or not 100 <= status <= 599:
        raise ValueError("an item has no status")
    if "_id" in result and result["_id"] != expected:
        raise ValueError("the items are not the records sent, in order")
    if 200 <= status < 300 or status == 409:
        return ItemVerdict(DELIVERED)
    code = RETRY if status in (408, 429) or status >= 500 else REFUSED if status >= 400 else RETRY
    return ItemVerdict(code, f"HTTP {status} {_error(result.get('error'))}".rstrip())


def _error(error: Any) -> str:
    """``error.type: error.reason`` (or an older server's error string), short and printable."""
    if isinstance(error, dict):
        kind, reason = error.get("type"), error.get("reason")
        parts = [str(p) for p in (kind, reason) if isinstance(p, (str, int, float)) and not isinstance(p, bool)]
        text = ": ".join(parts)
    elif isinstance(error, str):
        text = error
    else:
        return ""
    return excerpt(text.encode("utf-8", "surrogatepass"), EXCERPT)
