"""A real HTTP(S) server on 127.0.0.1 for the http sink's tests, and a certificate authority made by the
openssl command for the HTTPS one."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, NamedTuple, Optional

import pytest


class Request(NamedTuple):
    path: str
    headers: dict  # names in lower case
    body: bytes


class Endpoint:
    """``http.server`` in a thread (HTTP/1.1, connections kept alive), keeping every request it answered.
    ``answer(request) -> (status, headers, body)`` decides the answer (default: a success in the form the
    path asks for: ``_bulk`` all created, Splunk HEC "Success", else "ok"). ``down()`` stops it (the
    port refuses connections; a kept-alive connection is closed unanswered), ``up()`` starts it again on
    the same port."""

    def __init__(self, context: Optional[ssl.SSLContext] = None) -> None:
        self.context = context
        self.requests: list[Request] = []
        self.answer: Optional[Callable[[Request], tuple]] = None
        self.on_request: Optional[Callable[["Endpoint"], None]] = None
        self.port = 0
        self.is_down = False
        self._server: Optional[ThreadingHTTPServer] = None
        self._lock = threading.Lock()
        self.up()

    @property
    def url(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"

    def up(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        server.daemon_threads = True
        server.endpoint = self
        if self.context is not None:
            server.socket = self.context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server, self.is_down = server, False
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def down(self) -> None:
        self.is_down = True
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def records(self) -> list[dict]:
        """Every document received, in order: JSON lines, the documents of ``_bulk`` bodies, the events of
        Splunk HEC bodies, the elements of JSON arrays."""
        docs = []
        for request in self.requests:
            docs += documents(request)
        return docs

    def ids(self) -> list[str]:
        return [doc["id"] for doc in self.records()]

    @staticmethod
    def documents(request: Request) -> list[dict]:
        return documents(request)

    @staticmethod
    def hec_events(body: bytes) -> list[dict]:
        return hec_events(body)


def documents(request: Request) -> list[dict]:
    body = request.body
    if request.path.startswith("/_bulk") or "/_bulk" in request.path:
        lines = body.split(b"\n")
        assert lines[-1] == b"" and len(lines) % 2 == 1, body[:200]
        return [json.loads(doc) for doc in lines[1::2]]
    if request.path == "/services/collector/event":
        return [event["event"] for event in hec_events(body)]
    if body.startswith(b"["):
        return json.loads(body)
    return [json.loads(line) for line in body.splitlines()]


def hec_events(body: bytes) -> list[dict]:
    """Splunk HEC events: JSON objects one after the other."""
    text, decoder, events, at = body.decode(), json.JSONDecoder(), [], 0
    while at < len(text):
        event, at = decoder.raw_decode(text, at)
        events.append(event)
    return events


def success(request: Request) -> tuple:
    if "/_bulk" in request.path:
        actions = [json.loads(line) for line in request.body.split(b"\n")[0::2] if line]
        items = [{"create": {"_id": a["create"]["_id"], "status": 201}} for a in actions]
        return 200, {}, json.dumps({"errors": False, "items": items}).encode()
    if request.path == "/services/collector/event":
        return 200, {}, b'{"text":"Success","code":0}'
    return 200, {}, b"ok"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        endpoint: Endpoint = self.server.endpoint
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if endpoint.is_down:  # a kept-alive connection to a server that went away
            self.close_connection = True
            return
        request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        status, headers, reply = (endpoint.answer or success)(request)
        with endpoint._lock:
            endpoint.requests.append(request)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
        if endpoint.on_request is not None:
            endpoint.on_request(endpoint)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def endpoint():
    server = Endpoint()
    yield server
    server.down()


class Authority(NamedTuple):
    ca_file: str  # the CA's certificate (PEM)
    context: ssl.SSLContext  # a server context with a certificate the CA signed for 127.0.0.1


@pytest.fixture(scope="session")
def authority(tmp_path_factory) -> Authority:
    """A certificate authority and a server certificate for 127.0.0.1 and localhost, made by openssl."""
    d = tmp_path_factory.mktemp("ca")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem", "-days", "2",
                    "-subj", "/CN=elkscan test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", *ec, "-keyout", d / "server.key", "-out", d / "server.csr",
                    "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                           "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
                    "-CAcreateserial", "-out", d / "server.pem", "-days", "2", "-extfile", d / "ext"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "server.pem", d / "server.key")
    return Authority(str(d / "ca.pem"), context)


@pytest.fixture
def tls_endpoint(authority):
    server = Endpoint(authority.context)
    yield server
    server.down()
