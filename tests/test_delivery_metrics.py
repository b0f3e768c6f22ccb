"""A network sink's spool and delivery counters on the metrics endpoint, through an outage of a real TCP
endpoint (docs/metrics.md, docs/delivery.md)."""

from __future__ import annotations

import socket
import threading

from attrs import frozen

from elkscan_core import Record, Source, hookimpl
from elkscan_core.delivery import SpoolingConfig, SpoolingSink
from elkscan_core.testing import run, scrape


@frozen(kw_only=True)
class TcpConfig(SpoolingConfig):
    port: int


class TcpSink(SpoolingSink):
    """JSON lines over TCP, one connection per batch, acknowledged by the endpoint's "ok"."""

    id = "tcp"
    Config = TcpConfig

    def destination(self):
        return f"127.0.0.1:{self.config.port}"

    def send_batch(self, items):
        with socket.create_connection(("127.0.0.1", self.config.port), timeout=self.config.timeout) as conn:
            conn.sendall(b"".join(item.data + b"\n" for item in items))
            conn.shutdown(socket.SHUT_WR)
            if conn.recv(2) != b"ok":
                raise ConnectionError("not acknowledged")


class Events(Source):
    """Yields 25 events, then keeps the session alive until the test is done."""

    id = "events"
    done: threading.Event

    def targets(self):
        for n in range(25):
            yield Record(kind="log", facts={"n": n})
        type(self).done.wait(60)


class _Plugin:
    @hookimpl
    def elkscan_register_sinks(self, registry):
        registry.add(TcpSink)

    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Events)


def serve(listener: socket.socket, received: list) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            received.extend(data.splitlines())
            conn.sendall(b"ok")


def test_spool_depth_and_delivery_failures_per_sink_through_an_outage(tmp_path, live):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]  # bound, not listening: connections are refused (the outage)
    Events.done = threading.Event()
    sessions, received = [], []

    class Capture:
        @hookimpl
        def elkscan_session_start(self, session):
            sessions.append(session)

    sink = {"use": "tcp", "with": {"port": port, "batch": 10, "flush_interval": "50ms", "timeout": "2s",
                                   "retry": {"initial": "20ms", "max": "100ms"}}}
    thread = threading.Thread(target=run, args=({
        "sources": ["events"], "sinks": [sink], "state_dir": str(tmp_path / "state"),
        "metrics": {"listen": "127.0.0.1:0"}},), kwargs={"extra_plugins": [_Plugin(), Capture()]})
    thread.start()
    try:
        session = live.wait_for(lambda: sessions and sessions[0])
        down = live.wait_for(lambda: (lambda s: s if s.value("elkscan_sink_spool_records", sink="tcp") == 25
                                      and s.value("elkscan_sink_delivery_failures_total", sink="tcp") >= 2
                                      else None)(scrape(session)))
        assert down.value("elkscan_sink_delivered_total", sink="tcp") == 0
        assert down.value("elkscan_sink_spool_bytes", sink="tcp") > 0
        assert down.value("elkscan_sink_dropped_total", sink="tcp") == 0
        assert down.value("elkscan_sink_rejected_total", sink="tcp") == 0
        assert down.value("elkscan_sink_held_back_total", sink="tcp") == 0
        assert down.value("elkscan_sink_up", sink="tcp") == 1  # waiting on its spool is not hanging
        listener.listen(16)  # the endpoint is back
        threading.Thread(target=serve, args=(listener, received), daemon=True).start()
        up = live.wait_for(lambda: (lambda s: s if s.value("elkscan_sink_delivered_total", sink="tcp") == 25
                                    else None)(scrape(session)))
        assert up.value("elkscan_sink_spool_records", sink="tcp") == 0
        assert len(received) == 25
    finally:
        Events.done.set()
        thread.join(60)
        listener.close()
