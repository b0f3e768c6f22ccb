"""At-least-once delivery through a real spool to a real TCP endpoint started by the test: an outage in
the middle of a scan and a restart of elkscan (also after SIGKILL and a torn write) lose nothing and
spool nothing twice; a full spool drops the oldest and says so; repeats are held back."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest

from elkscan_core import Detection, Engine, hookimpl
from elkscan_core.delivery import DeliveryRejected, SpoolingSink
from elkscan_core.delivery.spool import Spool, parse_frames
from elkscan_core.testing import eicar, events, feed, run

#: A network sink as a plugin author writes one: JSON lines over TCP, one connection per batch,
#: acknowledged by the endpoint's "ok".
SINK_SOURCE = textwrap.dedent('''
    import socket

    from attrs import frozen

    from elkscan_core import hookimpl
    from elkscan_core.delivery import SpoolingConfig, SpoolingSink


    @frozen(kw_only=True)
    class TcpConfig(SpoolingConfig):
        port: int


    class TcpSink(SpoolingSink):
        id = "tcp"
        Config = TcpConfig

        def destination(self):
            return f"127.0.0.1:{self.config.port}"

        def send_batch(self, items):
            with socket.create_connection(("127.0.0.1", self.config.port), timeout=self.config.timeout) as conn:
                conn.sendall(b"".join(item.data + b"\\n" for item in items))
                conn.shutdown(socket.SHUT_WR)
                if conn.recv(2) != b"ok":
                    raise ConnectionError("not acknowledged")


    @hookimpl
    def elkscan_register_sinks(registry):
        registry.add(TcpSink)
''')


def sink_plugin():
    module = types.ModuleType("tcp_test_sink")
    exec(SINK_SOURCE, module.__dict__)
    return module


class Endpoint:
    """A TCP server keeping every document it acknowledged; ``down()``/``up()`` make an outage (the
    port refuses connections meanwhile)."""

    def __init__(self, port: int = 0, up: bool = True) -> None:
        self.docs: list[dict] = []
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self.on_doc = None
        if up:
            self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self._listener = listener
        threading.Thread(target=self._serve, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _serve(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                docs = [json.loads(line) for line in data.splitlines()]
                self.docs.extend(docs)
                conn.sendall(b"ok")
                if self.on_doc:
                    self.on_doc(self)

    def ids(self) -> list[str]:
        return [d["id"] for d in self.docs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Flag(Engine):
    id = "flag"

    def scan(self, subject):
        return [Detection.from_signature(self.id, "Txt.Test.Bad")] if b"bad" in subject.read(4096) else []

    def version(self):
        return "flag 1"


class Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Flag)


def tcp(port, **options):
    return {"use": "tcp", "with": {"port": port, "flush_interval": "50ms", "batch": 10, "timeout": "2s",
                                   "retry": {"initial": "20ms", "max": "100ms"}, **options}}


def session(tmp_path, sources, sink, **top):
    pipeline = {"sources": sources, "engines": ["flag"], "sinks": [sink], "state_dir": str(tmp_path / "state"),
                **top}
    return run(pipeline, extra_plugins=[Plugin(), sink_plugin()])


def test_an_outage_in_the_middle_of_a_scan_loses_nothing_and_sends_nothing_twice(tmp_path):
    endpoint = Endpoint()
    outage, back = threading.Event(), threading.Event()

    def come_back():
        endpoint.up()
        back.set()

    def go_down_once(ep):  # after the first 50 documents, the endpoint is gone for 0.6 s
        if len(ep.docs) >= 50 and not outage.is_set():
            outage.set()
            ep.down()
            threading.Timer(0.6, come_back).start()

    def gate(n):  # the scan is still running when the endpoint comes back
        if n == 390:
            assert back.wait(30)

    endpoint.on_doc = go_down_once
    result = session(tmp_path, [feed(events(400, every=0.004, before=gate))], tcp(endpoint.port))
    sink = result.session.find("sink", "tcp")
    assert outage.is_set() and sink.counters["failed_attempts"] >= 1
    sent = [r.id for r in result.records]
    assert len(set(sent)) == 400
    assert sorted(endpoint.ids()) == sorted(sent)  # every record once: none lost, none twice
    assert [d["n"] for d in endpoint.docs] == list(range(400))  # and in order
    assert sink.stats()["depth"] == 0 and result.summary.errors == 0


def test_records_wait_in_the_spool_for_the_next_run_and_the_next_run_sends_them_once(tmp_path):
    endpoint = Endpoint(up=False)
    first = session(tmp_path, [feed(events(120))], tcp(endpoint.port, timeout="300ms"))
    sink = first.session.find("sink", "tcp")
    assert sink.stats()["depth"] == 120 and not endpoint.docs
    endpoint.up()
    second = session(tmp_path, [feed(events(30))], tcp(endpoint.port))
    expected = [r.id for r in first.records] + [r.id for r in second.records]
    assert endpoint.ids() == expected  # the spooled ones first, then the new ones; each once
    assert second.session.find("sink", "tcp").stats()["depth"] == 0


def test_a_full_spool_drops_the_oldest_with_a_count(tmp_path, caplog):
    endpoint = Endpoint(up=False)
    result = session(tmp_path, [feed(events(300))],
                     tcp(endpoint.port, timeout="300ms", spool={"max_size": "8KiB"}))
    sink = result.session.find("sink", "tcp")
    dropped = sink.counters["dropped"]
    assert dropped > 0 and sink.stats()["depth"] == 300 - dropped
    assert result.summary.errors >= 1  # a loss is an error of the run, and it is logged
    assert "records were dropped, never delivered" in caplog.text.replace("record(s) were", "records were")
    endpoint.up()
    session(tmp_path, [], tcp(endpoint.port))
    assert [d["n"] for d in endpoint.docs] == list(range(dropped, 300))  # the newest, in order


def test_a_detection_found_again_is_sent_again_only_after_repeat_after(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "bad.txt").write_bytes(b"this is bad")
    (tmp_path / "tree" / "bad2.txt").write_bytes(b"also bad")
    endpoint = Endpoint()
    walk = [{"use": "dirscan", "with": {"roots": {str(tmp_path / "tree"): -1}, "type_filter": False}}]
    session(tmp_path, walk, tcp(endpoint.port))
    assert len(endpoint.docs) == 2
    again = session(tmp_path, walk, tcp(endpoint.port))
    assert len(endpoint.docs) == 2 and again.session.find("sink", "tcp").stats()["held_back"] == 2
    assert len(again.records) == 2  # held back from the endpoint only, not from the session
    session(tmp_path, walk, tcp(endpoint.port), repeat_after=0)
    assert len(endpoint.docs) == 4 and sorted(endpoint.ids()[:2]) == sorted(endpoint.ids()[2:])  # same ids


def test_ecs_documents(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "bad.txt").write_bytes(b"this is bad")
    endpoint = Endpoint()
    walk = [{"use": "dirscan", "with": {"roots": {str(tmp_path / "tree"): -1}, "type_filter": False}}]
    result = session(tmp_path, walk, tcp(endpoint.port, format="ecs"))
    (doc,) = endpoint.docs
    assert doc["file"]["path"] == str(tmp_path / "tree" / "bad.txt") and doc["file"]["name"] == "bad.txt"
    assert doc["event"]["kind"] == "alert" and doc["event"]["id"] == result.records[0].id
    assert doc["rule"]["name"] == "Txt.Test.Bad" and doc["host"]["name"] == socket.gethostname()
    assert doc["elkscan"]["status"] == "detected" and doc["@timestamp"].endswith("Z")


def test_a_spool_elsewhere_than_the_state_directory_is_checked_and_private(tmp_path):
    endpoint = Endpoint()
    session(tmp_path, [feed(events(3))], tcp(endpoint.port, spool={"dir": str(tmp_path / "sp")}))
    assert len(endpoint.docs) == 3 and oct(os.stat(tmp_path / "sp").st_mode & 0o777) == "0o700"


# -- across processes: SIGKILL while the endpoint is down, a torn write, then a restart -------------


def spooled(directory) -> int:
    """Documents in the spool's segments, read without opening the spool (another process writes it)."""
    count = 0
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if name.endswith(".seg"):
            with open(os.path.join(directory, name), "rb") as f:
                count += sum(item is not None for item, _ in parse_frames(f.read()))
    return count


@pytest.mark.slow
def test_a_killed_elkscan_resumes_delivery_where_it_stopped(tmp_path, install_plugin):
    site = install_plugin("tcp_test_sink", SINK_SOURCE)
    tree = tmp_path / "tree"
    tree.mkdir()
    for n in range(60):
        (tree / f"eicar{n}.com").write_bytes(eicar())
        (tree / f"clean{n}.txt").write_bytes(b"nothing to see %d" % n)
    endpoint = Endpoint(up=False)
    spool = tmp_path / "spool"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "version": 1, "plugins": ["yara_backend", "tcp_test_sink"], "state_dir": str(tmp_path / "state"),
        "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False,
                                                "every": "1h"}}],
        "engines": ["yara"],
        "sinks": [tcp(endpoint.port, spool={"dir": str(spool)}, timeout="300ms")]}))
    env = {**os.environ, "PYTHONPATH": str(site)}
    elkscan = [sys.executable, "-m", "elkscan_core.cli"]
    daemon = subprocess.Popen([*elkscan, "run", "-q", str(pipeline)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while spooled(spool) < 60 and time.monotonic() < deadline and daemon.poll() is None:
            time.sleep(0.1)
        assert spooled(spool) == 60, daemon.stderr.read1().decode() if daemon.poll() is not None else ""
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    segment = max(p for p in spool.iterdir() if p.suffix == ".seg")
    with open(segment, "ab") as f:
        f.write(b"1234abcd 00000100 deadbeef {\"torn")  # a write cut short by the crash
    endpoint.up()
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([*elkscan, "scan", "-q", "-p", str(pipeline), str(empty)], env=env,
                          stderr=subprocess.PIPE, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert b"torn by a crash" in done.stderr
    paths = [d["path"] for d in endpoint.docs]
    assert sorted(paths) == sorted(str(tree / f"eicar{n}.com") for n in range(60))  # each once
    assert len(set(endpoint.ids())) == 60 and Spool(str(spool), 1 << 20).depth == 0


class Stuck(SpoolingSink):
    """A sink whose endpoint hangs (``hang`` seconds per call, ignoring its timeout) until told not to."""
    id = "stuck"
    hang = 30.0
    sent: list = []

    def destination(self):
        return "stuck"

    def send_batch(self, items):
        time.sleep(Stuck.hang)
        Stuck.sent.extend(item.id for item in items)


class StuckPlugin:
    @hookimpl
    def elkscan_register_sinks(self, registry):
        registry.add(Stuck)


def test_a_hung_endpoint_holds_neither_the_scan_nor_its_end(tmp_path, caplog):
    sink = {"use": "stuck", "with": {"timeout": "300ms", "flush_interval": "50ms", "batch": 5}}
    pipeline = {"sources": [feed(events(50))], "sinks": [sink],
                "state_dir": str(tmp_path / "state")}
    Stuck.hang, Stuck.sent = 30.0, []
    started = time.monotonic()
    first = run(pipeline, extra_plugins=[Plugin(), StuckPlugin()])
    assert time.monotonic() - started < 10  # not 30 s: close() leaves the stuck call behind
    assert "did not end within 0.3s" in caplog.text
    assert first.session.find("sink", "stuck").stats()["depth"] == 50
    Stuck.hang = 0.5  # slow, past its timeout, but it answers while the next scan runs
    second = run({**pipeline, "sinks": [{"use": "stuck", "with": {**sink["with"], "batch": 100}}],
                  "sources": [feed(events(50, every=0.04))]},
                 extra_plugins=[Plugin(), StuckPlugin()])
    assert "past its timeout of 0.3s" in caplog.text
    assert Stuck.sent[:50] == [r.id for r in first.records]  # what waited goes first, once
    assert second.summary.errors == 0


class Picky(SpoolingSink):
    """An endpoint that takes the records with an even ``n`` and refuses the others for good."""
    id = "picky"
    taken: list = []

    def destination(self):
        return "picky"

    def send_batch(self, items):
        numbers = [json.loads(item.data)["n"] for item in items]
        Picky.taken.extend(n for n in numbers if n % 2 == 0)
        refused = sum(n % 2 for n in numbers)
        if refused:
            raise DeliveryRejected("odd", count=refused)


class PickyPlugin:
    @hookimpl
    def elkscan_register_sinks(self, registry):
        registry.add(Picky)


def test_a_batch_the_endpoint_took_in_part_counts_the_refused_ones_only(tmp_path, caplog):
    Picky.taken = []
    result = run({"sources": [feed(events(30))], "state_dir": str(tmp_path / "state"),
                  "sinks": [{"use": "picky", "with": {"batch": 10, "flush_interval": "50ms"}}]},
                 extra_plugins=[Plugin(), PickyPlugin()])
    sink = result.session.find("sink", "picky")
    assert Picky.taken == list(range(0, 30, 2)) and sink.stats()["depth"] == 0
    assert sink.counters["rejected"] == 15 and sink.counters["delivered"] == 15 and result.summary.errors >= 1
    refused = re.findall(r"(\d+) record\(s\) refused by the endpoint, not retried: odd", caplog.text)
    assert sum(map(int, refused)) == 15  # each batch reports what it refused, not its whole size
