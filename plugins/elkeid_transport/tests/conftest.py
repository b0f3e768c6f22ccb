"""The simulated Elkeid agent, and the Elkeid schema as real protobuf classes built at test time.

The agent side is written from docs/elkeid-protocol.md alone: its record parser is a port of the
agent's fixed-order reader (length, skip 08, varint, skip 10, varint, skip 1a, varint length, payload),
and every record is decoded a second time with python-protobuf classes generated from the ``bridge``
schema.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import attrs
import pytest
import yaml

SCHEMA = {  # message -> [(name, number, type, type_name, label)]
    "Record": [("data_type", 1, "TYPE_INT32", None), ("timestamp", 2, "TYPE_INT64", None),
               ("data", 3, "TYPE_MESSAGE", ".bridge.Payload")],
    "Payload": [("fields", 1, "TYPE_MESSAGE", ".bridge.Payload.FieldsEntry")],
    "Task": [("data_type", 1, "TYPE_INT32", None), ("object_name", 2, "TYPE_STRING", None),
             ("data", 3, "TYPE_STRING", None), ("token", 4, "TYPE_STRING", None)],
}


def build_bridge_classes() -> dict[str, type]:
    """``package bridge`` compiled at run time through descriptor_pb2 (no protoc)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="elkscan_test_bridge.proto", package="bridge",
                                             syntax="proto3")
    field_type = descriptor_pb2.FieldDescriptorProto
    for name, fields in SCHEMA.items():
        message = fdp.message_type.add(name=name)
        for fname, number, ftype, type_name in fields:
            field = message.field.add(name=fname, number=number, type=getattr(field_type, ftype),
                                      label=field_type.LABEL_OPTIONAL)
            if type_name:
                field.type_name = type_name
        if name == "Payload":
            message.field[0].label = field_type.LABEL_REPEATED
            entry = message.nested_type.add(name="FieldsEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=field_type.TYPE_STRING, label=field_type.LABEL_OPTIONAL)
            entry.field.add(name="value", number=2, type=field_type.TYPE_STRING, label=field_type.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"bridge.{name}"))
            for name in SCHEMA}


@pytest.fixture(scope="session")
def bridge() -> dict[str, type]:
    return build_bridge_classes()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def agent_parse(body: bytes) -> tuple[int, int, bytes, bytes]:
    """The agent's reader: (data_type, timestamp, payload bytes, the three bytes it skipped)."""
    skipped = bytearray()
    pos = 0
    skipped.append(body[pos]); pos += 1
    data_type, pos = _varint(body, pos)
    skipped.append(body[pos]); pos += 1
    timestamp, pos = _varint(body, pos)
    skipped.append(body[pos]); pos += 1
    length, pos = _varint(body, pos)
    return data_type, timestamp, body[pos:pos + length], bytes(skipped) + (b"" if pos + length == len(body) else b"!")


@attrs.frozen
class Rec:
    data_type: int
    timestamp: int
    fields: dict


def decode_frames(data: bytes, classes: dict[str, type]) -> tuple[list[Rec], bytes]:
    """Every complete frame, decoded by the agent's parser and by protobuf, checked to agree."""
    records, pos = [], 0
    while len(data) - pos >= 4:
        (length,) = struct.unpack_from("<I", data, pos)
        if len(data) - pos - 4 < length:
            break
        body = data[pos + 4:pos + 4 + length]
        pos += 4 + length
        data_type, timestamp, payload, skipped = agent_parse(body)
        assert skipped == b"\x08\x10\x1a", f"record not in the agent's fixed order: {body[:32].hex()}"
        record = classes["Record"].FromString(body)
        assert record.HasField("data")
        fields = dict(classes["Payload"].FromString(payload).fields)
        assert (record.data_type, record.timestamp, dict(record.data.fields)) == (data_type, timestamp, fields)
        assert data_type > 0 and 1_500_000_000 < timestamp < 4_000_000_000, (data_type, timestamp)
        assert all(isinstance(v, str) for v in fields.values())
        records.append(Rec(data_type, timestamp, fields))
    return records, data[pos:]


def frame_task(classes: dict[str, type], data_type: int, data: str | dict = "", token: str = "") -> bytes:
    if isinstance(data, dict):
        data = json.dumps(data)
    body = classes["Task"](data_type=data_type, object_name="scanner", data=data, token=token).SerializeToString()
    return struct.pack("<I", len(body)) + body


class Agent:
    """Starts ``<workdir>/scanner`` the way Elkeid's agent does and collects its records."""

    def __init__(self, workdir: Path, classes: dict[str, type], detail: str | None = "{}",
                 read_records: bool = True, root: Path | None = None, prefix: tuple[str, ...] = ()) -> None:
        """``root``: start the plugin chrooted there (``workdir`` is then a directory under it); ``prefix``:
        the command that runs it (e.g. ``unshare ...``), which must exec it in the end."""
        self.workdir, self.classes = workdir, classes
        task_r, self.task_w = os.pipe()
        self.rec_r, rec_w = os.pipe()
        inside = Path("/", workdir.relative_to(root)) if root is not None else workdir

        def plumbing() -> None:  # in the child: tasks on fd 3, records on fd 4
            if root is not None:
                os.chroot(root)
                os.chdir(inside)
            high_r = fcntl.fcntl(task_r, fcntl.F_DUPFD_CLOEXEC, 10)
            high_w = fcntl.fcntl(rec_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        env = {"DETAIL": detail} if detail is not None else {}
        self.stderr_path = workdir / "scanner.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([*prefix, str(inside / "scanner")], cwd=workdir, env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=stderr, preexec_fn=plumbing, close_fds=False,
                                            start_new_session=True)
        os.close(task_r)
        os.close(rec_w)
        self.records: list[Rec] = []
        self.error: BaseException | None = None  # what the record stream broke with, if it did
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        if read_records:
            self._reader.start()
        else:  # an agent that went away: nobody reads the records
            os.close(self.rec_r)

    def _read(self) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(self.rec_r, 65536)
                if not chunk:
                    break
                records, pending = decode_frames(pending + chunk, self.classes)
                with self._cond:
                    self.records.extend(records)
                    self._cond.notify_all()
            assert pending == b"", f"a partial record was left at exit: {pending[:32].hex()}"
        except BaseException as exc:  # reported by wait_for() and close(), on the test's thread
            self.error = exc
        finally:
            os.close(self.rec_r)
            with self._cond:
                self._cond.notify_all()

    def send(self, data_type: int, data: str | dict = "", token: str = "") -> None:
        os.write(self.task_w, frame_task(self.classes, data_type, data, token))

    def send_raw(self, data: bytes) -> None:
        os.write(self.task_w, data)

    def wait_for(self, predicate, timeout: float = 30.0) -> list[Rec]:
        """Records so far, once ``predicate(records)`` holds (fails the test after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.records):
                if self.error is not None:
                    raise AssertionError(f"the record stream is broken: {self.error}") from self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"timed out; records: {self.records}\nstderr: {self.stderr()[-3000:]}\n"
                                f"scanner.log: {self.log()[-3000:]}")
                self._cond.wait(min(remaining, 0.2))
            return list(self.records)

    def done(self, token: str, timeout: float = 30.0) -> Rec:
        records = self.wait_for(lambda rs: any(r.data_type == 6000 and r.fields["token"] == token for r in rs),
                                timeout)
        return next(r for r in records if r.data_type == 6000 and r.fields["token"] == token)

    def logs(self) -> list[str]:
        return [r.fields["msg"] for r in self.records if r.data_type == 1010]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log(self) -> str:
        """The plugin's own log, ``scanner.log`` (logs go there only)."""
        try:
            return (self.workdir / "scanner.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self, timeout: float = 10.0) -> int:
        """Close both pipes as the agent does; the exit status (kills the group after ``timeout``)."""
        try:
            os.close(self.task_w)
        except OSError:
            pass
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise
        finally:
            if self._reader.is_alive():
                self._reader.join(5)
            if self.error is not None:
                raise AssertionError(f"the record stream is broken: {self.error}") from self.error


@attrs.frozen
class Built:
    archive: Path
    output: str  # what `elkscan elkeid package` printed
    unpacked: Path


@pytest.fixture(scope="session")
def built_package(tmp_path_factory) -> Built:
    """The real package, built once per test session by the real command (offline), and unpacked."""
    out = tmp_path_factory.mktemp("package")
    result = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "elkeid", "package", "-o", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    (archive,) = out.glob("scanner-*.tar.gz")
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked)
    return Built(archive, result.stdout, unpacked)


@pytest.fixture(scope="session")
def package(built_package) -> Path:
    return built_package.unpacked


@pytest.fixture
def plugin_dir(package, tmp_path) -> "PluginDir":
    """A fresh /etc/elkeid/plugin/scanner look-alike (hard links to the unpacked package)."""
    workdir = tmp_path / "scanner"
    shutil.copytree(package, workdir, copy_function=os.link)
    return PluginDir(workdir, tmp_path)


class PluginDir:
    def __init__(self, workdir: Path, tmp: Path) -> None:
        self.workdir, self.tmp = workdir, tmp
        self.pipeline = workdir / "pipelines" / "elkeid.yaml"
        self.shipped = yaml.safe_load(self.pipeline.read_text())
        self.configure(clamav=False, fanotify=None)

    def configure(self, clamav: bool | None = None, fanotify: dict | None | bool = False,
                  cgroup: bool | str = True, **source_options) -> None:
        """Rewrite pipelines/elkeid.yaml: a private lock file, a short CPU sample, ``source_options``.
        ``clamav=False`` drops the ClamAV engine (its clamd takes seconds to start), True restores it;
        ``fanotify=None`` drops the fanotify source, a mapping configures it (False: leave it).
        ``cgroup``: the shipped ``top`` would take the plugin out of the cgroups the tests run in; True
        keeps its own below them (test_resources.py runs ``top`` in a cgroup namespace)."""
        path = self.pipeline
        data = yaml.safe_load(path.read_text())
        data["limits"] = {**data.get("limits", {}), "cgroup": cgroup}
        if clamav is not None:
            data["engines"] = [e for e in self.shipped["engines"] if clamav or e["use"] != "clamav"]
        if fanotify is not False:
            shipped = [s for s in self.shipped["sources"] if s["use"] == "fanotify"]
            data["sources"] = [s for s in data["sources"] if s["use"] != "fanotify"]
            if fanotify is not None:
                data["sources"] += [{**s, "with": fanotify, "optional": False} for s in shipped]
        options = data["sources"][0].setdefault("with", {})
        options.update({"lock_file": str(self.tmp / "elkeid_scanners_plugin.pid"), "cpu_sample": "100ms"})
        options.update(source_options)
        fresh = path.with_suffix(".new")
        fresh.write_text(yaml.safe_dump(data))
        os.replace(fresh, path)  # a new inode: the template stays as built


@pytest.fixture
def start_agent(plugin_dir, bridge):
    agents: list[Agent] = []

    def start(detail: str | None = "{}", read_records: bool = True, workdir: Path | None = None,
              root: Path | None = None, prefix: tuple[str, ...] = ()) -> Agent:
        agent = Agent(workdir or plugin_dir.workdir, bridge, detail, read_records, root, prefix)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if agent.process.poll() is None:
            os.killpg(agent.process.pid, signal.SIGKILL)
            agent.process.wait()


@pytest.fixture
def task_frame(bridge):
    """``task_frame(data_type, data="", token="")``: one framed Task, as the agent writes it."""
    return lambda data_type, data="", token="": frame_task(bridge, data_type, data, token)


@pytest.fixture
def decode(bridge):
    """Decode a byte stream of framed records both ways (agent parser and protobuf); the records."""
    def run(data: bytes) -> list[Rec]:
        records, rest = decode_frames(data, bridge)
        assert rest == b""
        return records
    return run


@pytest.fixture
def parse_as_agent():
    return agent_parse
