"""Helpers for the fanotify source tests: a real session running on its own thread, and writers
that are real child processes (the source ignores its own process's writes)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elkscan_core import Detection, Engine, hookimpl, testing


class _Capture:
    """Hands the running session to the test as soon as every component has started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.session = None

    @hookimpl
    def elkscan_session_start(self, session) -> None:
        self.session = session
        self.started.set()


class Monitor:
    """A running session with the fanotify source; records are read from its collecting sink."""

    def __init__(self, session) -> None:
        self.session = session
        self.source = session.find("source", "fanotify")
        self.result = None

    @property
    def records(self) -> list:
        return list(self.session.find("sink", "collect").records)

    def kinds(self, kind: str) -> list:
        return [r for r in self.records if r.kind == kind]

    def wait_for(self, condition: Callable[[], Any], timeout: float = 15.0) -> Any:
        """Poll until ``condition()`` is truthy (events arrive asynchronously); fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"condition not met within {timeout}s; records: {self.records[-5:]}, "
                             f"stats: {dict(self.source.stats)}")


@contextlib.contextmanager
def monitoring(options: dict, *, engines: tuple = (), plugins: tuple = (), sinks: tuple = (),
               extra_plugins: tuple = (), pipeline: dict | None = None) -> Iterator[Monitor]:
    """Run ``use: fanotify`` with ``options`` (and ``pipeline``'s top-level keys) until the block ends,
    then stop and drain the session."""
    capture, box = _Capture(), {}

    def run() -> None:
        try:
            box["result"] = testing.run(
                {"plugins": ["fanotify_source", *plugins],
                 "sources": [{"use": "fanotify", "with": options}], "engines": list(engines),
                 "sinks": list(sinks), **(pipeline or {})},
                extra_plugins=[capture, *extra_plugins])
        except BaseException as exc:  # surfaced in the test thread
            box["error"] = exc
        finally:
            capture.started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    capture.started.wait(60)
    if "error" in box:
        raise box["error"]
    monitor = Monitor(capture.session)
    try:
        yield monitor
    finally:
        capture.session.stop()
        thread.join(60)
    monitor.result = box.get("result")


@pytest.fixture(autouse=True)
def _private_state(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ELKSCAN_STATE_DIR", str(tmp_path / "state"))


class Writer:
    """A shell process that runs ``script`` (with "$@" = ``args``), prints ``done`` and waits, so the
    source can still read its /proc entry when the event arrives. It is started through ``setsid -f``,
    so it is not a child of this process (the session's own children are not scanned on access)."""

    def __init__(self, script: str, *args: str) -> None:
        self.process = subprocess.Popen(
            ["setsid", "-f", "sh", "-c", f"echo $$\n{script}\necho done\nread _", "sh", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = int(self.process.stdout.readline())
        assert self.process.stdout.readline() == b"done\n"
        self.exe = subprocess.check_output(["readlink", f"/proc/{self.pid}/exe"], text=True).strip()

    def finish(self) -> None:
        """Let it exit, and wait until it has (its end of the pipe closes)."""
        self.process.stdin.write(b"\n")
        self.process.stdin.close()
        self.process.stdout.read()
        self.process.wait(10)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def write_file(path, content: bytes) -> Writer:
    """A child process that writes ``content`` to ``path`` (stays alive until finished)."""
    return Writer('printf %s "$2" > "$1"', str(path), content.decode())


class SubstringEngine(Engine):
    """A tiny real engine for when the yara plugin is not installed: flags the bundled samples'
    telltale strings, assembled at run time."""

    id = "substring"
    call_timeout = 10.0
    PATTERNS = {"Php_Webshell_Eval": "@ev" + "al($_PO" + "ST", "Eicar_Test_File": "EICAR-STANDARD"}

    def scan(self, subject) -> list[Detection]:
        data = subject.read(1 << 20)
        return [Detection.from_signature(self.id, name, yara_rule=True)
                for name, pattern in self.PATTERNS.items() if pattern.encode() in data]


class _SubstringPlugin:
    @hookimpl
    def elkscan_register_engines(self, registry) -> None:
        registry.add(SubstringEngine)


def elkscan_entry_points() -> list:
    """The installed ``elkscan`` entry points (``entry_points(group=...)`` needs Python 3.10)."""
    from importlib.metadata import entry_points

    found = entry_points()
    return list(found.select(group="elkscan") if hasattr(found, "select") else found.get("elkscan", []))


def engine_setup() -> dict:
    """The real yara engine when its plugin is installed, else the substring engine."""
    names = {ep.name for ep in elkscan_entry_points()}
    if "yara_backend" in names:
        return {"engines": ({"use": "yara"},), "plugins": ("yara_backend",)}
    return {"engines": ({"use": "substring"},), "extra_plugins": (_SubstringPlugin(),)}


@pytest.fixture
def tools():
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(monitoring=monitoring, Writer=Writer, write_file=write_file,
                                 engine_setup=engine_setup, elkscan_entry_points=elkscan_entry_points)
