"""What every NATS component of this plugin shares (the ``nats`` sink and the ``nats`` source):
the options that say where the servers are and how to authenticate and encrypt, their checks, and
``Client``: one connection made on an event loop the component owns, every wait bounded.

nats-py is asyncio; elkscan calls a component from threads. A ``Client`` keeps its own event loop and
runs it only inside ``run()``, on whichever thread calls it (one at a time): a sink's delivery thread, a
source's consumer thread.
The connection does not reconnect by itself (nats-py's reconnection would buffer and replay behind the
caller's back): a lost connection fails the call in progress, and the next call connects again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl
import urllib.parse
from typing import Any, Callable, Optional

from attrs import field, frozen

import nats
import nats.errors
from nats.aio.client import Client as _NatsClient

from elkscan_core import ComponentError, ConfigError
from elkscan_core.trust import UntrustedError, check_trusted

log = logging.getLogger("elkscan.nats")

_SCHEMES = ("nats", "tls")
_NAME = re.compile(r"[^\s.*>/\\]{1,255}")  # a stream or consumer name (it is also a token of API subjects)
_TOKEN = re.compile(r"[^\s.*>]+")
#: How long closing a connection may take: it only flushes what is buffered and closes the socket.
CLOSE_TIMEOUT = 1.0


def parse_servers(value: Any) -> tuple[str, ...]:
    """``nats://host:port``, ``tls://host:port`` or ``host[:port]`` (one, or a list): the URLs, with
    ``nats://`` and port 4222 filled in. Raises ValueError."""
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, (list, tuple)) or not urls or not all(isinstance(u, str) for u in urls):
        raise ValueError(f"expected a server URL or a list of them, got {type(value).__name__}")
    parsed = []
    for url in urls:
        text = url if "://" in url else f"nats://{url}"
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (parts is None or parts.scheme not in _SCHEMES or not parts.hostname or parts.path not in ("", "/")
                or parts.query or parts.fragment or any(c.isspace() for c in text)):
            raise ValueError(f"expected nats://host:port or tls://host:port, got {shown_url(text)!r}")
        parsed.append(text if port else text.rstrip("/") + ":4222")
    return tuple(parsed)


def shown_url(url: str) -> str:
    """A server URL as logs and messages show it: without a user name, password or token in it
    (everything before the last ``@`` goes)."""
    if "@" not in url:
        return url
    scheme, sep, _ = url.partition("://")
    return f"{scheme}{sep}" * bool(sep and "@" not in scheme) + url.rsplit("@", 1)[1]


def subject_problem(subject: str) -> str:
    """Why ``subject`` cannot be published to (empty when it can): dot-separated tokens, no wildcards,
    no whitespace."""
    if not subject or not all(_TOKEN.fullmatch(token) for token in subject.split(".")):
        return f"expected tokens separated by dots, without spaces or the wildcards * and >, got {subject!r}"
    return ""


def filter_problem(subject: str) -> str:
    """Why ``subject`` cannot filter a consumer (empty when it can): dot-separated tokens without
    whitespace; ``*`` only as a whole token, ``>`` only as the whole last token."""
    tokens = subject.split(".")
    if subject and all(token in ("*", ">") or _TOKEN.fullmatch(token) for token in tokens) \
            and ">" not in tokens[:-1]:
        return ""
    return f"expected tokens separated by dots, without spaces, * and > as whole tokens (> last), got {subject!r}"


def _servers(_instance, attribute, value) -> None:
    try:
        parse_servers(value)
    except ValueError as exc:
        raise ConfigError(str(exc), attribute.name) from None


def _servers_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _subject(_instance, attribute, value: str) -> None:
    problem = subject_problem(value)
    if problem:
        raise ConfigError(problem, attribute.name)


def _filter(_instance, attribute, value: str) -> None:
    problem = filter_problem(value)
    if problem:
        raise ConfigError(problem, attribute.name)


def _name(what: str) -> Callable[[Any, Any, str], None]:
    def check(_instance, attribute, value: str) -> None:
        if not _NAME.fullmatch(value):
            raise ConfigError(f"{what}: up to 255 characters, none of . * > / \\ or spaces, got {value!r}",
                              attribute.name)
    return check


def _key_needs_cert(instance, attribute, value: Optional[str]) -> None:
    if value and not instance.cert_file:
        raise ConfigError("a client key goes with its certificate: set cert_file too", attribute.name)


@frozen(kw_only=True, slots=False)  # no slots: a component's Config adds it to another options class
class ConnectionConfig:
    """Where the NATS servers are and how to reach them: ``servers`` (one URL or a list), ``creds`` (a
    NATS credentials file: user JWT and NKey seed), ``token`` (write ``{$env: NAME}``), ``ca_file``,
    ``cert_file`` and ``key_file`` (TLS; with any of them every server is reached over TLS)."""

    servers: Any = field(converter=_servers_tuple, validator=_servers)
    creds: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = field(default=None, validator=_key_needs_cert)


def stream_option(**kwargs):
    """The ``stream`` option, as its validator checks it."""
    return field(validator=_name("a stream name"), **kwargs)


def consumer_option(**kwargs):
    """A durable consumer's name (the source's ``group``), checked as a stream name (both are tokens of
    JetStream's API subjects)."""
    return field(validator=_name("a consumer name"), **kwargs)


def filter_option(**kwargs):
    """A consumer's ``subject`` filter: a subject, or a pattern with the wildcards ``*`` and ``>``."""
    return field(validator=_filter, **kwargs)


class ServerSaid(ConnectionError):
    """No answer came, and the server said why (``-ERR``: a permissions violation, most often): a
    problem of configuration, not of the network."""


def subject_option(**kwargs):
    """The ``subject`` option, as its validator checks it."""
    return field(validator=_subject, **kwargs)


class Client:
    """One NATS connection for one component, on an event loop the component owns. ``prepare()`` at
    start (main thread: files checked and read), ``run(coroutine_function, timeout)`` from one thread at
    a time, ``close()`` when that thread is done with it."""

    def __init__(self, config: ConnectionConfig, resolve: Callable[[str], str], name: str) -> None:
        self.config = config
        self.name = name
        self.servers = parse_servers(config.servers)
        self._resolve = resolve
        self._tls: Optional[ssl.SSLContext] = None
        self._creds: Optional[str] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._nc: Any = None
        self._lost: Optional[asyncio.Event] = None
        self._url = ""  # the server of the connection made last
        self._said = ""  # what the server said went wrong during the current call (-ERR)

    def shown(self) -> str:
        return ",".join(shown_url(url) for url in self.servers)

    # -- start: the files that steer the connection --------------------------------------------

    def check(self) -> None:
        """For ``elkscan validate`` and start: every file the connection reads is trusted (StrictModes)."""
        for what in ("creds", "ca_file", "cert_file", "key_file"):
            path = getattr(self.config, what)
            if path:
                try:
                    check_trusted(self._resolve(path), f"{self.name}: {what}")
                except UntrustedError as exc:
                    raise ComponentError(str(exc)) from None

    def prepare(self) -> None:
        """Check and read what the connection needs, so that a bad file stops start-up with one line
        (never a secret in it) instead of failing every delivery."""
        self.check()
        config = self.config
        if config.creds:
            self._creds = self._resolve(config.creds)
            try:
                import nkeys  # noqa: F401  (nats-py signs with it)
            except ImportError:
                raise ComponentError("creds: the nkeys package is needed to sign with NATS credentials "
                                     "(pip install 'elkscan-nats-sink[creds]')") from None
            try:
                with open(self._creds, "rb"):
                    pass
            except OSError as exc:
                raise ComponentError(f"creds {self._creds}: {exc.strerror}") from None
        if config.ca_file or config.cert_file or any(url.startswith("tls://") for url in self.servers):
            what = "ca_file"
            try:
                self._tls = ssl.create_default_context(
                    cafile=self._resolve(config.ca_file) if config.ca_file else None)
                if config.cert_file:
                    what = "cert_file and key_file" if config.key_file else "cert_file"
                    self._tls.load_cert_chain(self._resolve(config.cert_file),
                                              self._resolve(config.key_file) if config.key_file else None)
            except (OSError, ssl.SSLError) as exc:
                raise ComponentError(f"{what}: {getattr(exc, 'strerror', None) or exc}") from None
            # TLS was asked for: a server that does not offer it is refused, never spoken to in clear
            self.servers = tuple("tls://" + url.split("://", 1)[1] for url in self.servers)

    # -- the event loop ------------------------------------------------------------------------

    def run(self, work: Callable[[Any], Any], timeout: float) -> Any:
        """Run ``await work(connection)`` on this client's loop within ``timeout`` seconds, connecting
        first when needed. On any failure the connection is dropped: the next call starts afresh."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        self._said = ""
        try:
            return self._loop.run_until_complete(asyncio.wait_for(self._run(work, timeout), timeout))
        except BaseException as exc:
            self._loop.run_until_complete(self._drop())
            if isinstance(exc, asyncio.TimeoutError) and self._said:  # why no answer came
                raise ServerSaid(f"no answer within {timeout:g}s; the server said: {self._said}") from None
            raise

    def soon(self, callback: Callable[[], None]) -> bool:
        """Have ``callback()`` run on this client's loop, from any thread, as soon as the loop runs (in
        the current ``run()`` or the next); False when the client is closed."""
        loop = self._loop
        try:
            loop.call_soon_threadsafe(callback)
        except (AttributeError, RuntimeError):  # no loop yet, or closed
            return False
        return True

    async def _run(self, work: Callable[[Any], Any], timeout: float) -> Any:
        nc = self._nc
        if nc is None or nc.is_closed or self._lost.is_set():
            await self._drop()
            nc = self._nc = await self._connect(timeout)
        self._said = ""
        job = asyncio.ensure_future(work(nc))
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({job, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not job.done():
                job.cancel()
        if not job.done() or job.cancelled():
            raise ConnectionError(f"lost the connection to {shown_url(self._url)}")
        return job.result()

    async def _connect(self, timeout: float) -> Any:
        """Connect to the first server that answers, in random order (so a fleet spreads over a cluster)."""
        self._lost = lost = asyncio.Event()

        async def gone() -> None:
            lost.set()

        async def error(exc: Exception) -> None:  # nats-py would log every one at ERROR
            log.debug("%s: %s", self.name, exc)
            if isinstance(exc, nats.errors.Error) and str(exc).startswith("nats: "):  # the server's -ERR
                self._said = str(exc)[len("nats: "):]

        options: dict[str, Any] = {"allow_reconnect": False, "max_reconnect_attempts": 0,
                                   "connect_timeout": max(1, round(timeout)), "error_cb": error,
                                   "disconnected_cb": gone, "closed_cb": gone, "name": "elkscan"}
        if self.config.token:
            options["token"] = self.config.token
        if self._creds:
            options["user_credentials"] = self._creds
        if self._tls is not None:
            options["tls"] = self._tls
        failure: Exception = ConnectionError("no server")
        for url in random.sample(self.servers, len(self.servers)):
            self._url = url
            # kept at once, so that a connect cut short by the call's timeout is closed by _drop()
            nc = self._nc = _TlsOrNothing(shown_url(url)) if self._tls is not None else nats.NATS()
            try:
                await nc.connect(servers=[url], **options)
                return nc
            except Exception as exc:  # refused, unreachable, TLS, authorization: try the next server
                failure = exc
        self._nc = None
        raise failure

    async def _drop(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
            except Exception as exc:
                log.debug("%s: closing the connection: %s", self.name, exc)

    def close(self) -> None:
        """Close the connection and the loop; the thread that ran them is done with them."""
        loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.run_until_complete(self._drop())
            finally:
                loop.close()


class _TlsOrNothing(_NatsClient):
    """A client that never sends CONNECT (credentials, then records) in clear. nats-py upgrades to TLS
    only when the server's INFO asks for it, even for a ``tls://`` URL and a TLS context: a server (or
    someone in the middle) that leaves it out would be told the token. This checks the same INFO just
    before CONNECT is built, and gives up instead."""

    def __init__(self, shown: str) -> None:
        super().__init__()
        self._shown = shown

    def _connect_command(self) -> bytes:
        if not self._server_info.get("tls_required"):
            raise ConnectionError(f"{self._shown} does not offer TLS; not connecting in clear")
        return super()._connect_command()
