"""A local attacker against the clamav engine: an impostor clamd, a clamd that judges wrongly, a hung
clamd, a planted binary or database, a runtime directory that cannot be made. Each test performs the
attack on real processes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from elkscan_core import ComponentError
from elkscan_clamav_backend.protocol import ClamdError, ClamdInterrupted, ClamdUnavailable

NOBODY = 65534
FAKE_CLAMD = Path(__file__).with_name("fakeclamd.py")
#: The system's Python: the test's own may live under a prefix only root can enter (~/.pyenv).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def nobody_dir():
    """A directory in /tmp that ``nobody`` owns (tmp_path is 0700 root: nobody cannot enter it)."""
    path = Path(tempfile.mkdtemp(prefix="elkscan-test-nobody-"))
    os.chmod(path, 0o755)
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def impostor(nobody_dir):
    """impostor(kind, where): a fake clamd run as nobody, answering OK to every scan."""
    script = nobody_dir / "fakeclamd.py"
    shutil.copyfile(FAKE_CLAMD, script)
    started = []

    def start(kind: str, where) -> None:
        process = subprocess.Popen([SYSTEM_PYTHON, str(script), kind, str(where)], stdout=subprocess.PIPE,
                                   text=True, preexec_fn=_as_nobody)
        started.append(process)
        assert process.stdout.readline().split() == ["ready", str(NOBODY)]

    yield start
    for process in started:
        process.kill()
        process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line holds ``text`` (a runtime directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


# -- who answers -------------------------------------------------------------------------------

def test_unix_socket_served_by_another_user_is_refused(new_engine, impostor, nobody_dir):
    sock = nobody_dir / "clamd.sock"
    impostor("unix", sock)
    with pytest.raises(ComponentError, match=rf"answered by uid {NOBODY} .*its verdicts are refused"):
        new_engine({"socket": str(sock)}).start()


def test_a_named_peer_user_is_accepted_and_the_canary_still_catches_an_impostor(new_engine, impostor,
                                                                                 nobody_dir):
    sock = nobody_dir / "clamd.sock"
    impostor("unix", sock)
    with pytest.raises(ComponentError, match="does not judge as clamd should: the EICAR test string came "
                                             "back OK"):
        new_engine({"socket": str(sock), "peer_user": "nobody"}).start()


def test_tcp_clamd_is_refused_as_root_unless_the_network_is_trusted(new_engine, impostor):
    assert os.geteuid() == 0, "elkscan's tests run as root"
    port = _free_port()
    impostor("tcp", port)
    with pytest.raises(ComponentError, match="reached over TCP, which nothing authenticates.*trust_network"):
        new_engine({"socket": f"127.0.0.1:{port}"}).start()
    # Trusted by the pipeline: the impostor answers, and the EICAR canary shows it does not judge.
    with pytest.raises(ComponentError, match="the EICAR test string came back OK"):
        new_engine({"socket": f"127.0.0.1:{port}", "trust_network": True}).start()


def test_a_managed_clamd_that_loads_another_database_fails_its_canary_and_leaves_nothing(
        new_engine, clamd_binary, test_database, tmp_path):
    """Start-up that fails after clamd started (A5): no runtime directory and no clamd stay behind."""
    other = tmp_path / "other-db"
    shutil.copytree(test_database, other)
    wrapper = tmp_path / "clamd-wrapper"
    wrapper.write_text("#!/bin/sh\n"
                       'config="${2#--config-file=}"\n'
                       f'sed -i "s|^DatabaseDirectory .*|DatabaseDirectory {other}|" "$config"\n'
                       f'exec {clamd_binary} "$@"\n')
    wrapper.chmod(0o755)
    runtime = tmp_path / "rt"
    engine = new_engine({"database": str(test_database), "clamd": str(wrapper), "runtime_dir": str(runtime)})
    with pytest.raises(ComponentError, match="elkscan's canary buffer came back OK"):
        engine.start()
    assert os.listdir(runtime) == []
    assert _processes_mentioning(str(runtime)) == []


def test_after_a_restart_every_file_is_an_error_until_the_canary_passes(engine_factory, test_database,
                                                                        sample_files, scan, signatures):
    engine = engine_factory({"database": str(test_database), "restart_timeout": "2s"})
    daemon = engine.daemon
    canary = Path(daemon.database_dir, "elkscan-canary.ndb")
    rule = canary.read_text()
    canary.unlink()  # the restarted clamd loads a database without it: it answers, but is not trusted
    os.kill(daemon.pid, signal.SIGKILL)
    for name in ("md5-lookalike", "eicar"):
        with pytest.raises(ClamdUnavailable, match="has not come back within 2s.*canary buffer came back OK"):
            scan(engine, sample_files[name])
    canary.write_text(rule)
    deadline = time.monotonic() + 60
    while daemon.generation < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scan(engine, sample_files["eicar"]) == [signatures["eicar"] + ".UNOFFICIAL"]
    assert scan(engine, sample_files["md5-lookalike"]) == []


# -- a hung clamd and shutdown -----------------------------------------------------------------

def test_a_call_to_a_hung_clamd_returns_once_the_session_stops(engine_factory, test_database, sample_files,
                                                               scan):
    engine = engine_factory({"database": str(test_database)})
    os.kill(engine.daemon.pid, signal.SIGSTOP)
    result = {}

    def work():
        try:
            scan(engine, sample_files["eicar"])
        except Exception as exc:  # asserted below
            result["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    time.sleep(0.5)
    engine.session.stopping.set()
    thread.join(3)
    assert not thread.is_alive()
    assert isinstance(result["error"], ClamdInterrupted)
    pid = engine.daemon.pid
    engine.close()  # a stopped clamd is resumed to act on SIGTERM, or killed
    assert _processes_mentioning(engine.daemon.runtime_dir) == [] and not os.path.exists(f"/proc/{pid}/cmdline")


def test_sigterm_with_a_hung_clamd_ends_the_scan_within_seconds(clamd_binary, tmp_path):
    """Audit E2/G3: a SIGSTOPped clamd made elkscan take 95 s (over 100 s measured) to honour SIGTERM."""
    files = tmp_path / "files"
    files.mkdir()
    for index in range(5000):
        (files / f"f{index}").write_text(f"file {index}\n" * 20)
    runtime = tmp_path / "rt"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("version: 1\nplugins: [clamav_backend, stdout_sink]\n"
                        f"engines: [{{use: clamav, with: {{runtime_dir: {runtime}}}}}]\n"
                        "sinks: [{use: stdout, with: {format: jsonl}}]\nlimits: {cache: false}\n")
    elkscan = Path(sys.executable).with_name("elkscan")
    process = subprocess.Popen([str(elkscan), "scan", "-p", str(pipeline), "-a", str(files)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = process.stdout.readline()  # clamd is up and judging
        assert first, process.stderr.read().decode()
        drain = threading.Thread(target=process.stdout.read, daemon=True)  # a full pipe would block the sink
        drain.start()
        (clamd,) = _processes_mentioning(str(runtime))
        os.kill(clamd, signal.SIGSTOP)
        time.sleep(1)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        latency = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert latency < 10, f"elkscan took {latency:.1f}s to stop"
    assert os.listdir(runtime) == []
    assert _processes_mentioning(str(runtime)) == []


# -- what cannot be set up ---------------------------------------------------------------------

@pytest.fixture
def immutable_dir(tmp_path):
    path = tmp_path / "immutable"
    path.mkdir()
    subprocess.run(["chattr", "+i", str(path)], check=True)
    yield path
    subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("where", ["immutable", "under a file"])
def test_a_runtime_dir_that_cannot_be_made_is_a_component_error(new_engine, clamd_binary, tmp_path, request,
                                                                where, caplog):
    """Audit E6: a traceback (rc 1) even with optional: true."""
    if where == "immutable":
        runtime = request.getfixturevalue("immutable_dir")
    else:
        (tmp_path / "file").write_text("")
        runtime = tmp_path / "file" / "rt"
    with pytest.raises(ComponentError, match=f"cannot create clamd's runtime directory in {runtime}: "):
        new_engine({"runtime_dir": str(runtime)}).start()

    from elkscan_core.pipeline import parse_pipeline
    from elkscan_core.plugins import make_plugin_manager
    from elkscan_core.runner import build_session

    pipeline = parse_pipeline({"version": 1, "plugins": ["clamav_backend"],
                               "engines": [{"use": "clamav", "optional": True,
                                            "with": {"runtime_dir": str(runtime)}},
                                           {"use": "clamav"}]}, "<test>", ".")
    session = build_session(pipeline, make_plugin_manager(pipeline.plugins))
    with caplog.at_level(logging.WARNING):
        session.start()
    session.close()
    assert [engine.config.runtime_dir for engine in session.engines] == [None]
    assert "engine 'clamav' is not available and is skipped: cannot create clamd's runtime" in caplog.text


def test_a_clamd_binary_another_user_owns_is_never_run(new_engine, clamd_binary, tmp_path):
    """Audit A21: root ran nobody's program as clamd."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"#!/bin/sh\nid > {marker}\nexec {clamd_binary} \"$@\"\n")
    evil.chmod(0o755)
    os.chown(evil, NOBODY, NOBODY)
    runtime = tmp_path / "rt"
    with pytest.raises(ComponentError, match=rf"clamd binary {evil} is owned by uid {NOBODY}"):
        new_engine({"clamd": str(evil), "runtime_dir": str(runtime)}).start()
    assert not marker.exists()
    assert os.listdir(runtime) == []


def test_a_relative_clamd_path_is_relative_to_the_pipeline(new_engine, clamd_binary, tmp_path):
    """Audit A23: it was resolved against the working directory."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "clamd").symlink_to(clamd_binary)
    engine = new_engine({"clamd": "./bin/clamd"}, base_dir=str(tmp_path))
    try:
        engine.start()
        assert engine.daemon.binary == str(tmp_path / "bin" / "clamd")
    finally:
        engine.close()


@pytest.mark.parametrize("attack", ["directory owned by nobody", "file group-writable"])
def test_a_database_another_user_can_change_is_refused(new_engine, clamd_binary, test_database, tmp_path,
                                                       attack):
    database = tmp_path / "db"
    shutil.copytree(test_database, database)
    if attack == "directory owned by nobody":
        os.chown(database, NOBODY, NOBODY)
        expected = rf"ClamAV database directory {database} is owned by uid {NOBODY}"
    else:
        (database / "test.ndb").chmod(0o664)
        expected = rf"ClamAV database directory {database}/test.ndb is group-writable"
    with pytest.raises(ComponentError, match=expected):
        new_engine({"database": str(database), "runtime_dir": str(tmp_path / "rt")}).start()
    assert os.listdir(tmp_path / "rt") == []


# -- a file cut short while clamd reads it ---------------------------------------------------------


@pytest.mark.parametrize("hold", [False, True])
def test_a_file_its_owner_cuts_short_while_clamd_reads_it_costs_clamd_nothing(engine_factory, test_database,
                                                                           tmp_path, scan, hold):
    """A read past a mapping's new end would raise SIGBUS in clamd; clamd reads what it is handed with
    pread, so the scan sees a short file (or fails) and clamd stays up: no restart, every call answered."""
    from elkscan_core.testing import shrinking

    engine = engine_factory({"database": str(test_database)})
    pid, answers, failures = engine.daemon.pid, 0, 0
    big = tmp_path / "home" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(16 << 20))  # under clamd's MaxFileSize
    with shrinking(big, hold=hold):
        until = time.monotonic() + 5
        while time.monotonic() < until:
            try:
                assert scan(engine, big) == []
                answers += 1
            except ClamdError:  # e.g. it changed while read
                failures += 1
    assert engine.daemon.pid == pid and engine.daemon.restarts == 0 and answers >= 3, (answers, failures)
