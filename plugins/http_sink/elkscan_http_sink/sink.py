"""The ``http`` sink: records POSTed in batches, through the delivery spool, as JSON lines or a JSON array,
or for a receiver named by ``preset``: Elasticsearch's ``_bulk`` API or Splunk's HTTP Event Collector.

A 2xx answer delivers a batch; 408, 429, 5xx, refused credentials, redirects and connection failures
are retried (``Retry-After`` kept within ``retry.max``); any other 4xx refuses the batch for good. An
Elasticsearch ``_bulk`` answer judges each record: those refused for good are dropped and counted, those
that failed for now are sent again, alone; a batch is delivered only once all of it is.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from typing import Any, Optional
from urllib.parse import SplitResult, urlsplit, urlunsplit

import attrs
from attrs import field, frozen

from elkscan_core import ComponentError, ConfigError, Record
from elkscan_core.delivery import DeliveryRejected, Item, RetryLater, SpoolingConfig, SpoolingSink
from elkscan_core.render import json_line
from elkscan_core.trust import UntrustedError, check_trusted

from .answers import REFUSED, RETRY, bulk_verdicts, excerpt, parse_retry_after, verdict
from .client import Client

log = logging.getLogger("elkscan.http_sink")

ELASTICSEARCH, SPLUNK = "elasticsearch", "splunk"
#: Where a preset posts when the URL names no path, and how its ``token`` is sent.
_PATHS = {ELASTICSEARCH: "/_bulk", SPLUNK: "/services/collector/event"}
_SCHEMES = {ELASTICSEARCH: "ApiKey", SPLUNK: "Splunk", None: "Bearer"}
#: Only what a _bulk answer needs to judge each record (the rest can be megabytes).
_FILTER = "filter_path=errors,items.*._id,items.*.status,items.*.error.type,items.*.error.reason"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 5.6.2)
_OURS = {"host", "content-length", "transfer-encoding", "connection"}
_INDEX = re.compile(r"[a-z0-9][a-z0-9._+-]{0,254}")  # an Elasticsearch index or data stream name
ANSWER_LIMIT = 64 << 10  # bytes of an answer read (only an excerpt is shown)
_BULK_LIMIT, _BULK_PER_RECORD = 1 << 20, 512  # a _bulk answer: 1 MiB plus this much per record


def _url(_instance, attribute, value: str) -> None:
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 (raises ValueError for a port that is not one)
    except ValueError as exc:
        raise ConfigError(f"not a URL ({exc})", attribute.name) from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("expected http://host[:port][/path] or https://...", attribute.name)
    if url.username is not None or url.password is not None:
        raise ConfigError("credentials do not go in the URL (they would be in the spool's name and in "
                          "errors)", attribute.name, "use token: or headers: {Authorization: {$env: NAME}}")
    if url.fragment:
        raise ConfigError("a URL sent to a server has no #fragment", attribute.name)


def _header_value(value: Any, where: str) -> None:
    """A header value is sent as Latin-1 on one line; the message never shows it (it may be a secret)."""
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {type(value).__name__} (not shown)", where,
                          "quote it in YAML")
    if any(c in value for c in "\r\n\0") or not all(ord(c) < 256 for c in value):
        raise ConfigError("the value holds a line break, a NUL or a character outside Latin-1 (not shown)",
                          where)


def _headers(_instance, attribute, value: dict) -> None:
    for name, text in value.items():
        if not _TOKEN.fullmatch(name):
            raise ConfigError(f"{name!r} is not a header name", attribute.name)
        if name.lower() in _OURS:
            raise ConfigError(f"{name} is set by the sink", attribute.name)
        _header_value(text, f"{attribute.name}.{name}")


def _token(_instance, attribute, value: Any) -> None:
    if value is not None:
        _header_value(value, attribute.name)


@frozen(kw_only=True)
class HttpConfig(SpoolingConfig):
    """``url``, ``preset`` (``elasticsearch``, ``splunk``), ``body`` (``jsonl``, ``array``; without a
    preset), ``headers`` and ``token`` (never shown), ``index``, ``sourcetype``, ``ca_file``, ``tls_verify``."""

    url: str = field(validator=_url)
    preset: Optional[str] = field(default=None, validator=attrs.validators.optional(
        attrs.validators.in_((ELASTICSEARCH, SPLUNK))))
    body: Optional[str] = field(default=None, validator=attrs.validators.optional(
        attrs.validators.in_(("jsonl", "array"))))
    #: Values typed Any so that cattrs never shows one in an error: each is checked by _header_value.
    headers: dict[str, Any] = field(factory=dict, validator=_headers, repr=False)
    token: Any = field(default=None, validator=_token, repr=False)
    index: Optional[str] = None
    sourcetype: Optional[str] = None
    ca_file: Optional[str] = None
    tls_verify: bool = True

    def __attrs_post_init__(self) -> None:
        https = urlsplit(self.url).scheme == "https"
        if self.body is not None and self.preset is not None:
            raise ConfigError(f"the {self.preset} preset sets the body", "body")
        if self.index is not None:
            if self.preset is None:
                raise ConfigError("index is for preset: elasticsearch or splunk", "index")
            if self.preset == ELASTICSEARCH and not _INDEX.fullmatch(self.index):
                raise ConfigError(f"{self.index!r} is not an index name (lower case letters, digits, . _ + -)",
                                  "index")
        if self.sourcetype is not None and self.preset != SPLUNK:
            raise ConfigError("sourcetype is for preset: splunk", "sourcetype")
        if self.token is not None and any(name.lower() == "authorization" for name in self.headers):
            raise ConfigError("token makes the Authorization header; give one or the other", "token")
        if not https and (self.ca_file is not None or not self.tls_verify):
            raise ConfigError("ca_file and tls_verify are for an https:// url", "ca_file" if self.ca_file else
                              "tls_verify")
        if self.ca_file is not None and not self.tls_verify:
            raise ConfigError("a ca_file with tls_verify: false would not be used", "ca_file")


def post_url(config: HttpConfig) -> SplitResult:
    """Where batches go: the URL, with the preset's path when it names none (and, for Elasticsearch,
    the ``filter_path`` that keeps its answer small)."""
    url = urlsplit(config.url)
    path, query = url.path, url.query
    if config.preset is not None and path in ("", "/"):
        path = _PATHS[config.preset]
    if config.preset == ELASTICSEARCH and "filter_path=" not in query:
        query = f"{query}&{_FILTER}" if query else _FILTER
    return url._replace(path=path, query=query)


class HttpSink(SpoolingSink):
    """Batches of records POSTed to one URL, through the spool."""

    id = "http"
    Config = HttpConfig

    def destination(self) -> str:
        return urlunsplit(post_url(self.config))

    # -- starting ------------------------------------------------------------------------------

    def check(self) -> None:
        super().check()
        if self.config.ca_file is not None:
            self._trusted_ca_file()

    def start(self) -> None:
        self._context = self._tls()  # before the spool is taken: a bad ca_file refuses to start cleanly
        config = self.config
        if urlsplit(config.url).scheme == "http" and (config.token is not None or config.headers):
            log.warning("%s: headers (credentials?) go over plain http to %s; use https", self.name,
                        urlsplit(config.url).hostname)
        super().start()

    def _trusted_ca_file(self) -> str:
        path = self.session.resolve_path(self.config.ca_file)
        try:
            check_trusted(path, f"{self.name}: ca_file")
        except UntrustedError as exc:
            raise ComponentError(str(exc)) from None
        except OSError as exc:
            raise ComponentError(f"ca_file {path}: {exc.strerror or exc}") from None
        return path

    def _tls(self) -> Optional[ssl.SSLContext]:
        config = self.config
        if urlsplit(config.url).scheme != "https":
            return None
        if not config.tls_verify:
            log.warning("%s: tls_verify: false: the server's certificate is not checked, so anyone on the "
                        "way can read and change what is sent", self.name)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif config.ca_file is not None:
            path = self._trusted_ca_file()
            try:
                context = ssl.create_default_context(cafile=path)  # that CA only, not the system's
            except (OSError, ssl.SSLError) as exc:
                raise ComponentError(f"ca_file {path}: no certificate read ({exc})") from None
        else:
            context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def open(self) -> None:
        config = self.config
        headers = {"Content-Type": "application/json" if config.preset == SPLUNK or config.body == "array"
                   else "application/x-ndjson"}
        if config.token is not None:
            headers["Authorization"] = f"{_SCHEMES[config.preset]} {config.token}"
        headers.update(config.headers)
        self.client = Client(post_url(config), self._context, config.timeout, headers)
        index = config.index if config.index is not None else (
            "elkscan" if urlsplit(config.url).path in ("", "/") else None)
        self._action = (b'{"create":{"_index":%s,"_id":' % json.dumps(index).encode() if index is not None
                        else b'{"create":{"_id":')
        self._batch: Optional[list[str]] = None  # the ids of the batch under way
        self._left: list[Item] = []  # its records not delivered yet
        self._refused: list[tuple[str, str]] = []  # its records refused for good: (id, why)

    def release(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    # -- documents (the writer thread) ---------------------------------------------------------

    def document(self, record: Record) -> Optional[bytes]:
        """Splunk: the HEC event envelope around the document (time, host, source, sourcetype, index),
        made when the record is accepted, so it keeps the time it was found."""
        if self.config.preset != SPLUNK:
            return super().document(record)
        fields = self.fields(record)
        if fields is None:
            return None
        target = record.target
        host = target.host if target is not None and target.host else self.session.host  # where the file is
        event = {"time": round(record.timestamp, 3), "host": host, "source": "elkscan"}
        if self.config.sourcetype is not None:
            event["sourcetype"] = self.config.sourcetype
        if self.config.index is not None:
            event["index"] = self.config.index
        event["event"] = fields
        return json_line(event, ascii_only=self.ascii_only)[:-1].encode("utf-8")

    # -- delivery (the delivery thread) --------------------------------------------------------

    def body(self, items: list[Item]) -> bytes:
        preset = self.config.preset
        if preset == ELASTICSEARCH:  # an action line naming the record's id, then the document
            return b"".join(b'%s"%s"}}\n%s\n' % (self._action, item.id.encode("ascii"), item.data)
                            for item in items)
        if preset == SPLUNK:
            return b"".join(item.data for item in items)
        if self.config.body == "array":
            return b"[" + b",".join(item.data for item in items) + b"]"
        return b"".join(item.data + b"\n" for item in items)

    def send_batch(self, items: list[Item]) -> None:
        ids = [item.id for item in items]
        if ids != self._batch:  # a new batch (one that failed comes back as it was)
            self._batch, self._left, self._refused = ids, list(items), []
        left = self._left
        bulk = self.config.preset == ELASTICSEARCH
        limit = _BULK_LIMIT + _BULK_PER_RECORD * len(left) if bulk else ANSWER_LIMIT
        answer = self.client.post(self.body(left), limit)
        wait = parse_retry_after(answer.retry_after, time.time())
        judged = verdict(answer.status)
        if judged == REFUSED:
            reason = f"HTTP {answer.status}: {excerpt(answer.body) or '(no body)'}"
            self._refused += [(item.id, reason) for item in left]
            self._finish()  # raises DeliveryRejected
        if judged == RETRY:
            raise RetryLater(_retry_reason(answer.status, answer.body, answer.location), wait)
        if bulk:
            self._judge_each(left, answer.body, answer.complete, limit, wait)
        self._finish()

    def _judge_each(self, left: list[Item], body: bytes, complete: bool, limit: int,
                    wait: Optional[float]) -> None:
        """Keep for later the records a ``_bulk`` answer failed for now, count those it refused."""
        if not complete:
            raise ConnectionError(f"a _bulk answer longer than {limit} bytes; sending the batch again")
        try:
            verdicts = bulk_verdicts(body, [item.id for item in left])
        except ValueError as exc:
            raise ConnectionError(f"a 2xx answer that is not a _bulk answer ({exc}): "
                                  f"{excerpt(body, 80)}") from None
        self._refused += [(item.id, v.reason) for item, v in zip(left, verdicts) if v.verdict == REFUSED]
        again = [(item, v) for item, v in zip(left, verdicts) if v.verdict == RETRY]
        if again:
            self._left = [item for item, _ in again]
            raise RetryLater(f"{len(again)} of {len(left)} record(s) not indexed for now, sent again alone "
                             f"({again[0][1].reason})", wait)

    def _finish(self) -> None:
        """The batch is done: every record delivered, or refused for good (raises DeliveryRejected)."""
        refused, self._refused, self._batch, self._left = self._refused, [], None, []
        if refused:
            first_id, reason = refused[0]
            others = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise DeliveryRejected(f"{reason}; record {first_id}{others}", count=len(refused))


def _retry_reason(status: int, body: bytes, location: Optional[str]) -> str:
    if 300 <= status < 400:
        return (f"HTTP {status}: a redirect to {excerpt((location or '').encode('latin-1', 'replace'), 120)} "
                "is not followed; set url to where records should go")
    if status in (401, 403, 407):
        return f"HTTP {status}: the credentials were refused ({excerpt(body, 120)}); the records wait"
    return f"HTTP {status}: {excerpt(body, 120) or '(no body)'}"
