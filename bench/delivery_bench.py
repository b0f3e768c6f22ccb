"""Benchmark of delivery: records per second through the ``file`` sink and through the spool.

A source yields N ready-made records shaped like real detections (a path, one YARA detection with hit
data, the ``hashes`` and ``process`` facts: about 1 KB of JSON each) into a real session, whose sink
writer thread hands them to the sink under test. Each row is the session's time for all N, from start
to the last record written (and, for the spool, delivered), best of ``--repeat`` runs:

- ``null``: a sink that does nothing: what the session itself costs (the baseline);
- ``file jsonl`` / ``file ecs``: the ``file`` sink, JSON lines or ECS, to a file in ``--dir``;
- ``spool, no network``: a ``SpoolingSink`` whose ``send_batch`` does nothing: the cost of the spool
  (render, append, read back, acknowledge) without a network;
- ``spool -> TCP``: the same sink sending JSON lines to a local TCP endpoint started here, one connection
  per batch of 500, acknowledged (the protocol of the test sink in tests/test_delivery.py);
- ``nats -> JetStream``: the ``nats`` sink to a local ``nats-server -js`` started here (file storage in
  ``--dir``), batches of 500, every PubAck awaited; each run into a fresh stream, checked to hold them all;
- ``kafka -> mock cluster``: the ``kafka`` sink (plugins/kafka_sink) producing to librdkafka's mock
  cluster (``test.mock.num.brokers``: a Kafka protocol server in this process, on loopback), idempotent,
  acks=all, batches of 500; the topic's offsets are checked to have grown by N;
- ``http -> local HTTP`` / ``http elasticsearch -> local HTTP``: the ``http`` sink (plugins/http_sink),
  batches of 500 as JSON lines or as an Elasticsearch ``_bulk`` body, POSTed on one kept-alive connection
  to a ``http.server`` started here that counts the records it answered 200 for.

The spool's overhead is ``spool, no network`` minus ``null``, per record.
Run: ``.venv/bin/python bench/delivery_bench.py [--records 100000] [--dir /var/tmp]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

from attrs import frozen

from elkscan_core import Detection, Record, Sink, Source, Target, hookimpl, make_plugin_manager
from elkscan_core.delivery import SpoolingConfig, SpoolingSink
from elkscan_core.pipeline import parse_pipeline
from elkscan_core.runner import build_session


@frozen
class FeedConfig:
    count: int = 100_000


class Feed(Source):
    """N detections, made beforehand so that only delivery is measured."""
    id = "feed"
    Config = FeedConfig

    def targets(self):
        hit = Detection.from_signature("yara", "Linux_Trojan_Mirai_3a85a4a3", yara_rule=True,
                                       hit_data=["$a,1024,16", "$b,4096,24"])
        facts = {"exe_size": 123456, "exe_hash": "9f86d081884c7d65", "md5_hash": "d41d8cd98f00b204e9800998ecf8427e",
                 "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                 "create_at": 1700000000, "modify_at": 1700000001, "pid": 4242, "ppid": 1, "pgid": 4242,
                 "tgid": 4242, "argv": "/tmp/.x/kworker -o pool:3333", "comm": "kworker", "sessionid": 1,
                 "uid": 0, "pns": 4026531836, "docker_id": ""}
        records = [Record(kind="finding", target=Target(f"/var/www/html/uploads/{n:08d}/shell.php",
                                                        origin="dirscan"),
                          detections=[hit], facts=facts, judged_by=["yara"]) for n in range(self.config.count)]
        yield from records


class Null(Sink):
    id = "null"

    def write(self, record):
        pass


@frozen(kw_only=True)
class SendConfig(SpoolingConfig):
    port: int = 0


class Send(SpoolingSink):
    """``port: 0``: deliver nowhere (the spool alone); else JSON lines over TCP, acknowledged."""
    id = "send"
    Config = SendConfig

    def destination(self):
        return f"bench:{self.config.port}"

    def send_batch(self, items):
        if not self.config.port:
            return
        with socket.create_connection(("127.0.0.1", self.config.port), timeout=self.config.timeout) as conn:
            conn.sendall(b"".join(item.data + b"\n" for item in items))
            conn.shutdown(socket.SHUT_WR)
            if conn.recv(2) != b"ok":
                raise ConnectionError("not acknowledged")


class Plugin:
    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Feed)

    @hookimpl
    def elkscan_register_sinks(self, registry):
        registry.add(Null)
        registry.add(Send)


def endpoint() -> tuple[int, list[int]]:
    """A local TCP server that counts the lines it acknowledged."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    received = [0]

    def serve():
        while True:
            conn, _ = listener.accept()
            with conn:
                data = bytearray()
                while chunk := conn.recv(1 << 20):
                    data += chunk
                received[0] += data.count(b"\n")
                conn.sendall(b"ok")

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], received


def run_once(count: int, sink: dict, work: str, plugins: tuple[str, ...] = ("file_sink",)) -> float:
    pipeline = parse_pipeline({"version": 1, "plugins": list(plugins), "state_dir": work, "repeat_after": 0,
                               "sources": [{"use": "feed", "with": {"count": count}}], "sinks": [sink]},
                              "<bench>", work)
    pm = make_plugin_manager(pipeline.plugins)
    pm.register(Plugin(), name="delivery-bench")
    session = build_session(pipeline, pm)
    started = time.perf_counter()
    summary = session.run()
    elapsed = time.perf_counter() - started
    assert summary.records == count and not summary.errors, summary
    sink_ = session.sinks[0]
    if isinstance(sink_, SpoolingSink):
        assert sink_.stats()["depth"] == 0, "records left in the spool: raise timeout"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where files and spools go (default: the temporary directory)")
    args = parser.parse_args()
    port, received = endpoint()
    spool = {"batch": 500, "flush_interval": "100ms", "timeout": "60s"}
    rows = [("null", {"use": "null"}),
            ("file jsonl", {"use": "file", "with": {"path": "out.jsonl", "max_size": 0}}),
            ("file ecs", {"use": "file", "with": {"path": "out.jsonl", "format": "ecs", "max_size": 0}}),
            ("spool, no network", {"use": "send", "with": {"port": 0, **spool}}),
            ("spool -> TCP", {"use": "send", "with": {"port": port, **spool}})]
    print(f"{args.records:,} records, best of {args.repeat}, on {os.cpu_count()} CPUs\n")
    print("| sink | records/s | us per record | over null |\n|---|---|---|---|")
    baseline = None
    for name, sink in rows:
        best = float("inf")
        for _ in range(args.repeat):
            work = tempfile.mkdtemp(prefix="elkscan-bench-", dir=args.dir)
            try:
                before = received[0]
                best = min(best, run_once(args.records, sink, work))
                if sink["use"] == "send" and sink["with"]["port"]:
                    assert received[0] - before == args.records, "records missing at the endpoint"
            finally:
                shutil.rmtree(work)
        per = best / args.records * 1e6
        baseline = per if baseline is None else baseline
        extra = f"+{per - baseline:.1f} us" if name != "null" else ""
        print(f"| {name} | {args.records / best:,.0f} | {per:.1f} | {extra} |", flush=True)
    nats_row(args, spool, baseline)
    kafka_row(args, spool, baseline)
    http_rows(args, spool, baseline)


def nats_row(args, spool: dict, baseline: float) -> None:
    """The ``nats`` sink into a JetStream stream of a ``nats-server -js`` started here for the row."""
    import asyncio

    import nats

    binary = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
    if binary is None:
        print("| nats -> JetStream | nats-server is missing (setup.sh installs it) | | |")
        return
    store = tempfile.mkdtemp(prefix="elkscan-bench-nats-", dir=args.dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def quiet(_exc: Exception) -> None:  # not yet listening: tried again below
        pass

    async def stream(fresh: bool) -> int:
        """Make the stream anew (no messages, no de-duplication memory), or count what it holds."""
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1, allow_reconnect=False,
                                error_cb=quiet)
        try:
            jsm = nc.jsm()
            if not fresh:
                return (await jsm.stream_info("BENCH")).state.messages
            try:
                await jsm.delete_stream("BENCH")
            except nats.js.errors.NotFoundError:
                pass
            await jsm.add_stream(name="BENCH", subjects=["bench.records"])
            return 0
        finally:
            await nc.close()

    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                asyncio.run(stream(fresh=True))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        sink = {"use": "nats", "with": {"servers": f"127.0.0.1:{port}", "subject": "bench.records",
                                        "stream": "BENCH", **spool}}
        best = float("inf")
        for _ in range(args.repeat):
            asyncio.run(stream(fresh=True))
            work = tempfile.mkdtemp(prefix="elkscan-bench-", dir=args.dir)
            try:
                best = min(best, run_once(args.records, sink, work, plugins=("nats_sink",)))
            finally:
                shutil.rmtree(work)
            assert asyncio.run(stream(fresh=False)) == args.records, "records missing in the stream"
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(store)
    per = best / args.records * 1e6
    print(f"| nats -> JetStream | {args.records / best:,.0f} | {per:.1f} | +{per - baseline:.1f} us |", flush=True)


def kafka_row(args: argparse.Namespace, spool: dict, baseline: float) -> None:
    """The ``kafka`` sink to librdkafka's mock cluster, held by a client of this process; each run's
    records are checked on the topic by its offsets (every partition's high watermark)."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    holder = Producer({"test.mock.num.brokers": 1, "bootstrap.servers": "mock:9092", "log_level": 3})
    broker = next(iter(holder.list_topics(timeout=10).brokers.values()))
    brokers = f"{broker.host}:{broker.port}"
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "bench"})

    def on_topic() -> int:
        partitions = consumer.list_topics("bench", timeout=10).topics["bench"].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition("bench", p), timeout=10)[1] for p in partitions)

    sink = {"use": "kafka", "with": {"brokers": brokers, "topic": "bench", **spool}}
    best, sent = float("inf"), 0
    for _ in range(args.repeat):
        work = tempfile.mkdtemp(prefix="elkscan-bench-", dir=args.dir)
        try:
            best = min(best, run_once(args.records, sink, work, plugins=("kafka_sink",)))
            sent += args.records
            assert on_topic() == sent, "records missing on the topic"
        finally:
            shutil.rmtree(work)
    consumer.close()
    per = best / args.records * 1e6
    print(f"| kafka -> mock cluster | {args.records / best:,.0f} | {per:.1f} | +{per - baseline:.1f} us |",
          flush=True)


def http_rows(args, spool: dict, baseline: float) -> None:
    """The ``http`` sink, JSON lines and Elasticsearch ``_bulk``, to a local ``http.server``."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the sink does

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            bulk = "/_bulk" in self.path
            received[0] += body.count(b"\n") // (2 if bulk else 1)
            reply = b'{"errors":false,"items":[]}' if bulk else b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [("http -> local HTTP", {"url": url + "/ingest"}),
            ("http elasticsearch -> local HTTP", {"url": url, "preset": "elasticsearch"})]
    try:
        for name, options in rows:
            best = float("inf")
            for _ in range(args.repeat):
                work = tempfile.mkdtemp(prefix="elkscan-bench-", dir=args.dir)
                try:
                    before = received[0]
                    best = min(best, run_once(args.records, {"use": "http", "with": {**options, **spool}}, work,
                                              plugins=("http_sink",)))
                    assert received[0] - before == args.records, "records missing at the endpoint"
                finally:
                    shutil.rmtree(work)
            per = best / args.records * 1e6
            print(f"| {name} | {args.records / best:,.0f} | {per:.1f} | +{per - baseline:.1f} us |", flush=True)
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
