"""Records other hosts sent, made into digest targets: the verifier's half of fleet hash verification.

A host's ``hashes`` enricher puts a file's digests on its record and a delivery sink sends the record
(``format: jsonl``, docs/records.md); a source on the verifier (``nats``, ``kafka``) hands each record
document to ``digest_target``, and the engines that judge digests (``hashlist``) judge the file without
it. Documents come from the network: anything that is not such a record is refused with a one-line
reason, never half-read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .model import FINDING, RECORD_FIELDS, Receipt, Target
from .text import has_surrogates, hidden, unescaped_bytes

#: Documents larger than this are not records elkscan writes (a record is a few KiB).
MAX_DOCUMENT = 1 << 20
#: Nesting of objects and lists in a record; elkscan's own go four deep.
MAX_DEPTH = 32
#: Sizes up to this (a file size fits 63 bits).
MAX_SIZE = (1 << 63) - 1
#: Record field -> digest algorithm, with the digest's length in hex digits.
DIGEST_FIELDS = {"md5_hash": ("md5", 32), "sha1": ("sha1", 40), "sha256": ("sha256", 64)}
_HEX = frozenset("0123456789abcdef")


def digest_target(document: bytes, origin: str, receipt: Receipt | None = None) -> Target:
    """One record document (a JSON object as elkscan's delivery sinks write it) -> a digest target of the
    file it describes on its host: digests from ``md5_hash``, ``sha1``, ``sha256``, size from
    ``exe_size``, ``path`` and ``host`` from the document, the document's other facts as ``extra`` with
    ``host_record_id`` (the document's ``id``), and the source's ``receipt`` for its message. A record
    without any digest (an event, a detection the host sent without hashes) gives a target with
    ``skip="no digests"``. ValueError (one line) for a document that is not such a record."""
    record = _parse(document)
    for key in ("host", "path", "id"):  # elkscan writes them valid Unicode, with exact bytes in <key>_bytes
        if isinstance(record.get(key), str) and has_surrogates(record[key]):
            raise ValueError(f"{key} is not valid Unicode (a name that is not UTF-8 comes as {key}_bytes)")
    facts = _exact(record)
    host = _text(facts, "host")
    path = _text(facts, "path")
    record_id = _text(facts, "id")
    size = facts.get("exe_size")
    if size is not None and (type(size) is not int or not 0 <= size <= MAX_SIZE):
        raise ValueError(f"exe_size is not a size in bytes: {_brief(size)}")
    digests = {}
    for name, (algorithm, length) in DIGEST_FIELDS.items():
        value = facts.get(name)
        if value in (None, ""):  # "": the host could not read the file (Elkeid's value)
            continue
        if not isinstance(value, str) or len(value) != length or not _HEX.issuperset(value.lower()):
            raise ValueError(f"{name} is not {length} hex digits: {_brief(value)}")
        digests[algorithm] = value.lower()
    if digests and not host:
        raise ValueError("the record names no host: a file without its host cannot be reported")
    if digests and not path:
        raise ValueError("the record names no path")
    extra = {key: value for key, value in facts.items() if key not in RECORD_FIELDS}
    if record_id:
        extra["host_record_id"] = record_id
    return Target(path=path, origin=origin, size=size, kind=FINDING, extra=extra, digests=digests, host=host,
                  skip="" if digests else "no digests", receipt=receipt)


def _parse(document: bytes) -> dict[str, Any]:
    if not isinstance(document, (bytes, bytearray, memoryview)):
        raise ValueError(f"a record is bytes, got {type(document).__name__}")
    if len(document) > MAX_DOCUMENT:
        raise ValueError(f"{len(document)} bytes, over the {MAX_DOCUMENT} a record may take")
    try:
        text = bytes(document).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    try:
        record = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise ValueError("not a record: nested too deeply") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a record: a JSON {type(record).__name__}, expected an object")
    if _depth(record) > MAX_DEPTH:  # a sink renders facts recursively
        raise ValueError(f"not a record: nested more than {MAX_DEPTH} deep")
    return record


def _depth(record: dict[str, Any]) -> int:
    """How deep objects and lists nest in ``record`` (without recursion: it is what is being checked)."""
    deepest, level = 1, [(value, 2) for value in record.values() if isinstance(value, (dict, list))]
    while level and deepest <= MAX_DEPTH:
        item, depth = level.pop()
        deepest = max(deepest, depth)
        level.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
                     if isinstance(child, (dict, list)))
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name} is not a number JSON has")


def _exact(record: dict[str, Any]) -> dict[str, Any]:
    """The record's facts with each string that has ``<field>_bytes`` (a name that is not UTF-8, given
    lossily) back to its exact bytes, as ``os.fsdecode`` gives them: a record of that target renders the
    same ``_bytes`` again."""
    facts = dict(record)
    for key, value in record.items():
        if not key.endswith("_bytes") or key[:-6] not in record:
            continue
        del facts[key]
        if not isinstance(value, str):
            raise ValueError(f"{_brief(key)} is not a string")
        try:
            raw = unescaped_bytes(value)
        except ValueError:
            raise ValueError(f"{_brief(key)} is not an escaped name") from None
        facts[key[:-6]] = raw.decode("utf-8", "surrogateescape")
    return facts


def _text(facts: Mapping[str, Any], key: str) -> str:
    """A string field of the record ('' when absent); ValueError when it is not a string or, for
    ``host`` and ``id``, not a plain name."""
    value = facts.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string: {_brief(value)}")
    if key in ("host", "id") and not _plain_name(value):
        raise ValueError(f"{key} is not a name: {_brief(value)}")
    if "\0" in value:
        raise ValueError(f"{key} holds a NUL byte")
    return value


def _plain_name(value: str) -> bool:
    """At most 255 characters, none of them a space or one a terminal would obey rather than show."""
    if value.isascii():  # the common case, at C speed: printable ASCII but the space
        return len(value) <= 255 and value.isprintable() and " " not in value
    return len(value) <= 255 and not any(c.isspace() or hidden(c) for c in value)


def _brief(value: Any) -> str:
    """A value as an error message shows it: short, and on one line."""
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."
