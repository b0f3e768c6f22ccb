"""A private clamd that elkscan starts, watches and stops.

It runs as the current user (no ``User`` line, so clamd drops no privileges and can read what the
scanner can), listens only on a Unix socket (mode 0600) in a private 0700 runtime directory, loads only
the database directory it is given, and gets its limits from the pipeline. A supervisor thread restarts
it with backoff when it dies; callers wait for the next generation to answer before retrying.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Callable, Optional

from elkscan_core import ComponentError

from .protocol import Address, ClamdClient, ClamdError, ClamdInterrupted, ClamdUnavailable, UntrustedPeer

log = logging.getLogger("elkscan.clamav")

_BACKOFF_FIRST, _BACKOFF_MAX, _STABLE_AFTER = 0.5, 30.0, 60.0
_END_GRACE = 3.0  # seconds clamd gets to exit on SIGTERM before SIGKILL
_PR_SET_PDEATHSIG = 1


def render_config(settings: Mapping[str, object]) -> str:
    """clamd.conf text: one ``Key value`` line per setting (booleans as yes/no)."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            value = "yes" if value else "no"
        lines.append(f"{key} {value}")
    return "\n".join(lines) + "\n"


def _errors_in(text: str) -> str:
    """clamd's error lines from its output, joined into one line for a one-line message."""
    lines = [line.split(" -> ", 1)[-1].strip() for line in text.splitlines()]  # drop LogTime's stamp
    errors = [line for line in lines if "error" in line.lower() and not line.lower().startswith("limits")]
    if errors:
        return "; ".join(dict.fromkeys(errors))
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def _die_with_parent() -> None:
    """In the child before exec: have the kernel send SIGTERM if the thread that started it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def find_binary(name: str) -> str | None:
    """An executable path as given, or a bare name looked up on PATH and the sbin directories."""
    if "/" in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search)


def clamd_version(binary: str) -> tuple[int, int]:
    """(major, minor) of a clamd binary, from ``clamd --version`` ("ClamAV 1.4.6/..."); (0, 0) unknown."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    match = re.search(r"ClamAV (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else (0, 0)


class ManagedClamd:
    """One private clamd process and its supervisor.

    ``verify(client)`` runs after each start, before any scan reaches that process (the canaries);
    ClamdError from it counts as a failed start. ``cancelled()`` (the session is stopping) ends every
    wait of the supervisor and of the calls through ``client`` at once."""

    def __init__(self, binary: str, runtime_dir: str, database_dir: str, limits: Mapping[str, object],
                 *, startup_timeout: float, timeout: float, database_label: str = "",
                 verify: Optional[Callable[[ClamdClient], None]] = None,
                 cancelled: Optional[Callable[[], bool]] = None) -> None:
        self.binary, self.runtime_dir, self.database_dir = binary, runtime_dir, database_dir
        #: How messages name the database: where its files came from, not the private copy.
        self.database_label = database_label or database_dir
        self.socket_path = os.path.join(runtime_dir, "clamd.sock")
        self.config_path = os.path.join(runtime_dir, "clamd.conf")
        self.log_path = os.path.join(runtime_dir, "clamd.log")
        self.stderr_path = os.path.join(runtime_dir, "clamd.stderr")
        self.startup_timeout = startup_timeout
        self._outer_cancelled = cancelled or (lambda: False)
        address = Address(path=self.socket_path)
        #: For scans: answers only from the process that passed ``verify``.
        self.client = ClamdClient(address, timeout, cancelled=self.cancelled, check_peer=self._check_verified)
        #: For the supervisor: the process it just started, before it is verified.
        self._probe = ClamdClient(address, timeout, cancelled=self.cancelled, check_peer=self._check_current)
        self._verify = verify
        self.generation = 0
        self.last_error = ""
        self.restarts = 0
        self._limits = dict(limits)
        self._process: subprocess.Popen | None = None
        self._verified_pid: int | None = None
        self._log_offset = 0
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def cancelled(self) -> bool:
        return self._stopping.is_set() or self._outer_cancelled()

    def _check_current(self, pid: int, uid: int) -> None:
        process = self._process
        if process is None or pid != process.pid:
            raise UntrustedPeer(f"{self.socket_path} is answered by pid {pid} (uid {uid}), not by the clamd "
                                f"elkscan started (pid {self.pid})")

    def _check_verified(self, pid: int, uid: int) -> None:
        self._check_current(pid, uid)
        if pid != self._verified_pid:
            raise ClamdUnavailable(f"clamd (pid {pid}) has not passed its canary check yet")

    @property
    def scan_settings(self) -> dict[str, object]:
        """What decides how clamd judges a file, beyond its database: limits, parsers, alerts (not
        where it keeps its socket, files and log)."""
        return {
            "AlertExceedsMax": True,  # a file not scanned whole is reported, not passed as clean
            "Bytecode": True,
            **self._limits,
        }

    def write_config(self) -> None:
        settings = {
            "Foreground": True,
            "LocalSocket": self.socket_path,
            "LocalSocketMode": "600",
            "FixStaleSocket": True,
            "DatabaseDirectory": self.database_dir,
            "TemporaryDirectory": self.runtime_dir,
            "LogFile": self.log_path,
            "LogFileMaxSize": "2M",
            "LogRotate": True,
            "LogTime": True,
            "SelfCheck": 0,  # elkscan decides when rules change (reload), not a timer
            **self.scan_settings,
        }
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(render_config(settings))

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start clamd and wait until it answers PING and passes ``verify``; ComponentError with the
        reason if not."""
        found = find_binary(self.binary)
        if not found:
            raise ComponentError(
                f"clamd is not installed ({self.binary} not found): install the Debian package "
                "'clamav-daemon', or point the clamav engine at a running clamd with 'socket:'")
        self.binary = found
        self.write_config()
        first_start = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, args=(first_start,),
                                            name="clamd-supervisor", daemon=True)
        self._supervisor.start()
        first_start.wait()
        if self.generation == 0:
            self.stop()
            raise ComponentError(self.last_error)

    def _spawn(self) -> None:
        """Start clamd from the supervisor thread: the parent-death signal (clamd is ended if elkscan is
        killed) follows the thread that forked, and this thread lives as long as the supervision."""
        try:
            self._log_offset = os.path.getsize(self.log_path)  # this run's errors start here
        except OSError:
            self._log_offset = 0
        with open(self.stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(
                [self.binary, "--foreground", f"--config-file={self.config_path}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                cwd=self.runtime_dir, start_new_session=True, close_fds=True, preexec_fn=_die_with_parent)

    def _wait_answering(self) -> str:
        """'' once clamd answers PING and passes ``verify``; otherwise why not (exited, too slow, judges
        wrongly, or the session is stopping)."""
        deadline = time.monotonic() + self.startup_timeout
        process = self._process
        while time.monotonic() < deadline:
            if self.cancelled():
                self.last_error = "clamd was still starting when elkscan was asked to stop"
                return self.last_error
            code = process.poll()
            if code is not None:
                self.last_error = self._failure(f"clamd exited with status {code} while starting")
                return self.last_error
            if os.path.exists(self.socket_path):
                try:
                    self._probe.ping()
                    if self._verify is not None:
                        self._verify(self._probe)
                except ClamdInterrupted:
                    continue
                except ClamdUnavailable:
                    pass
                except ClamdError as exc:
                    self.last_error = f"clamd started but cannot be used: {exc}"
                    return self.last_error
                else:
                    with self._lock:
                        self._verified_pid = process.pid
                        self.generation += 1
                    self._ready.set()
                    return ""
            time.sleep(0.05)
        self.last_error = (f"clamd did not answer within {self.startup_timeout:g}s of starting (database "
                           f"{self.database_label} too large? raise startup_timeout)")
        return self.last_error

    def _failure(self, what: str) -> str:
        text = ""
        for path, offset in ((self.stderr_path, 0), (self.log_path, self._log_offset)):
            try:
                with open(path, errors="replace") as handle:
                    handle.seek(offset)
                    text += handle.read()[-8000:] + "\n"
            except OSError:
                pass
        reason = _errors_in(text).replace(self.database_dir + "/", "")
        return f"{what}: {reason} (database {self.database_label})" if reason else what

    def _start_once(self) -> str:
        """Spawn clamd and wait for it; '' when it is ready, else why not (that process is killed)."""
        try:
            self._spawn()
        except OSError as exc:
            self.last_error = f"cannot start {self.binary}: {exc.strerror or exc}"
            return self.last_error
        failed = self._wait_answering()
        if failed and self._process.poll() is None:
            self._process.kill()
        return failed

    def _supervise(self, first_start: threading.Event) -> None:
        """Start clamd, then restart it whenever it exits, waiting longer after each quick death."""
        failed = self._start_once()
        first_start.set()
        if failed:
            return
        backoff = _BACKOFF_FIRST
        while True:
            process = self._process
            started = time.monotonic()
            code = process.wait()
            with self._lock:
                self._ready.clear()
                self._verified_pid = None
            if self.cancelled():
                return
            if not failed:
                self.last_error = self._failure(f"clamd exited with status {code}")
                if time.monotonic() - started > _STABLE_AFTER:
                    backoff = _BACKOFF_FIRST
            log.warning("%s; restarting it in %.1fs", self.last_error, backoff)
            if self._sleep(backoff):
                return
            backoff = min(backoff * 2, _BACKOFF_MAX)
            self.restarts += 1
            failed = self._start_once()
            if not failed:
                log.warning("clamd is back (restart %d)", self.restarts)

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` unless elkscan stops first; True when it does."""
        deadline = time.monotonic() + seconds
        while not self.cancelled():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._stopping.wait(min(left, 0.2))
        return True

    def wait_ready(self, seen_generation: int, timeout: float) -> bool:
        """After a failed call: True once a clamd answers that is either a newer generation than the
        one the call used, or the same one still alive (the failure was not a death)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.cancelled():
            if self._ready.is_set():
                if self.generation != seen_generation:
                    return True
                if self._process.poll() is None:
                    try:
                        self.client.ping()
                        return True
                    except (ClamdUnavailable, ClamdError):
                        pass
            time.sleep(0.05)
        return False

    def reload(self, timeout: float) -> None:
        """RELOAD and wait for clamd's verdict in its log; RuntimeError when it kept the old rules."""
        try:
            offset = os.path.getsize(self.log_path)
        except OSError:
            offset = 0
        self.client.reload()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cancelled():
                raise RuntimeError("elkscan is stopping; clamd's reload was not awaited")
            with open(self.log_path, errors="replace") as handle:
                handle.seek(offset)
                text = handle.read()
            if "Database correctly reloaded" in text:
                return
            if "reload failed" in text.lower():
                raise RuntimeError(f"clamd rejected the new database and keeps the old one: "
                                   f"{_errors_in(text) or 'see ' + self.log_path}")
            time.sleep(0.05)
        raise RuntimeError(f"clamd did not finish reloading within {timeout:g}s")

    def stop(self) -> None:
        """Stop supervising, then end clamd: SIGTERM (and SIGCONT, should it be stopped), SIGKILL if it
        has not exited within a few seconds."""
        self._stopping.set()
        _end(self._process)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(_END_GRACE + 2)
        _end(self._process)  # one the supervisor started while it was being stopped


def _end(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        os.kill(process.pid, signal.SIGCONT)  # a stopped (hung) clamd acts on SIGTERM only once resumed
        process.wait(_END_GRACE)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        process.kill()
    process.wait()
