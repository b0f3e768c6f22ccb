"""A real ``nats-server -js`` (Debian's package, installed by setup.sh) on a free loopback port, with
its store in the test's directory; helpers to make a stream and read back what it holds."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")
    assert found, "nats-server is missing: run setup.sh as root (apt package nats-server)"
    return found


class NatsServer:
    """``nats-server -js -a 127.0.0.1 -p PORT -sd STORE [ARGS]``; ``kill()`` (SIGKILL) and ``start()``
    again on the same port and store make an outage."""

    def __init__(self, directory, *args: str) -> None:
        self.port = free_port()
        self.store = str(directory / "nats-store")
        self.log = str(directory / "nats-server.log")
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "NatsServer":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port),
                                          "-sd", self.store, *self.args], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, open(self.log).read()[-2000:]
            if b"Server is ready" in open(self.log, "rb").read():
                return self
            time.sleep(0.05)
        raise AssertionError("nats-server did not start: " + open(self.log).read()[-2000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        # the next start must find "Server is ready" anew
        if os.path.exists(self.log):
            os.replace(self.log, self.log + ".old")

    def call(self, work, **connect):
        """Run ``await work(nc)`` with a connection of the test's own."""
        import nats

        async def main():
            nc = await nats.connect(self.url, **connect)
            try:
                return await work(nc)
            finally:
                await nc.close()

        return asyncio.run(main())

    def add_stream(self, name: str, subjects: list[str], **config) -> None:
        async def add(nc):
            await nc.jsm().add_stream(name=name, subjects=subjects, **config)
        self.call(add)

    def messages(self, stream: str) -> list[tuple[str, str, dict]]:
        """Every message in ``stream``: (subject, Nats-Msg-Id, document)."""
        async def read(nc):
            jsm = nc.jsm()
            info = await jsm.stream_info(stream)
            found = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
                msg = await jsm.get_msg(stream, seq)
                found.append((msg.subject, msg.headers["Nats-Msg-Id"], json.loads(msg.data)))
            return found
        return self.call(read)

    def consumer(self, stream: str, name: str) -> tuple[int, int]:
        """(messages not yet delivered, delivered and not acked) of a consumer of ``stream``."""
        async def info(nc):
            found = await nc.jsm().consumer_info(stream, name)
            return found.num_pending, found.num_ack_pending
        return self.call(info)

    def count(self, stream: str) -> int:
        async def count(nc):
            return (await nc.jsm().stream_info(stream)).state.messages
        return self.call(count)


@pytest.fixture
def nats_server(tmp_path):
    servers: list[NatsServer] = []

    def start(*args: str) -> NatsServer:
        server = NatsServer(tmp_path, *args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()
