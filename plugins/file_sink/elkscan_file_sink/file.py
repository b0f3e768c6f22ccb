"""The ``file`` sink: one document per line (JSON lines or ECS) appended to a log file that rotates by
size, keeping ``keep`` older files (gzipped), and that is opened again on SIGHUP for logrotate."""

from __future__ import annotations

import fcntl
import gzip
import logging
import os
import shutil
import signal
import stat
import threading
from typing import Optional

from attrs import field, frozen

from elkscan_core import ComponentError, ConfigError, Record, Size
from elkscan_core.delivery import DeliveryConfig, DeliverySink
from elkscan_core.trust import UntrustedError, check_trusted
from elkscan_core.units import MiB

log = logging.getLogger("elkscan.file_sink")

#: Lines are gathered up to this many bytes, then written at once (and whenever the scan is idle).
BUFFER = 64 * 1024
_OPEN = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: How long close() waits for a rotated file's compression; an unfinished one is compressed at the next start.
_COMPRESS_WAIT = 30.0


def _keep(_instance, attribute, value: int) -> None:
    if not 0 <= value <= 1000:
        raise ConfigError(f"0 to 1000 files, got {value}", attribute.name)


@frozen(kw_only=True)
class FileConfig(DeliveryConfig):
    """``path`` of the log file; rotated once it would grow past ``max_size`` (0: never, logrotate's
    job), keeping ``keep`` older files, gzipped unless ``compress`` is false."""

    path: str
    max_size: Size = Size(100 * MiB)
    keep: int = field(default=5, validator=_keep)
    compress: bool = True


class FileSink(DeliverySink):
    """Appends each record as one line; writes are gathered (``BUFFER``) and go out at least whenever
    the scan is idle. The file is created 0600 with ``O_NOFOLLOW`` in a directory that must be trusted."""

    id = "file"
    Config = FileConfig
    _fd: Optional[int] = None

    def destination(self) -> str:
        return os.path.abspath(self.session.resolve_path(self.config.path))

    def check(self) -> None:
        super().check()
        self._check_place(must_exist=False)

    def _check_place(self, must_exist: bool) -> None:
        """The directory (and the file, if there is one) are trusted: another user could otherwise
        replace the log, or read it."""
        path = self.destination()
        directory = os.path.dirname(path)
        try:
            if os.path.lexists(path):
                check_trusted(path, f"{self.name}: log file")
            elif must_exist or os.path.exists(directory):
                check_trusted(directory, f"{self.name}: log directory")
        except UntrustedError as exc:
            raise ComponentError(str(exc)) from None

    def start(self) -> None:
        super().start()
        self.path = self.destination()
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self._check_place(must_exist=True)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._compressor: Optional[threading.Thread] = None
        self.reopen_requested = False
        self._open()
        if self.config.compress and os.path.exists(f"{self.path}.1"):  # left by a stop mid-compression
            self._compress_later(f"{self.path}.1")
        _hangup.watch(self)

    def _open(self) -> None:
        try:
            fd = os.open(self.path, _OPEN, 0o600)
        except OSError as exc:
            raise ComponentError(f"cannot open {self.path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ComponentError(f"{self.path} is not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        self._fd, self._size = fd, st.st_size

    def write(self, record: Record) -> None:
        data = self.document(record)
        if data is None:
            return
        self._buffer.append(data + b"\n")
        self._buffered += len(data) + 1
        if self._buffered >= BUFFER:
            self._write_out()

    def flush(self) -> None:
        super().flush()
        self._write_out()

    def _write_out(self) -> None:
        """Write what is gathered: to a fresh file after a SIGHUP, or after rotating a full one."""
        if self.reopen_requested:
            self.reopen_requested = False
            os.close(self._fd)  # what is gathered goes to the new file: it is the newest
            self._open()
            log.info("%s: %s opened again (SIGHUP)", self.name, self.path)
        lines, self._buffer, self._buffered = self._buffer, [], 0
        limit, start, size = self.config.max_size, 0, self._size
        try:
            for number, line in enumerate(lines):
                if limit and size and size + len(line) > limit:  # this line would take the file past max_size
                    self._write(b"".join(lines[start:number]))
                    self._rotate()
                    start, size = number, 0
                size += len(line)
            self._write(b"".join(lines[start:]))
        except OSError as exc:  # a full disk: these records are lost, and the run says how many
            raise OSError(exc.errno, f"{exc.strerror}; {len(lines) - start} record(s) not written to "
                          f"{self.path}") from None

    def _write(self, data: bytes) -> None:
        """Write whole lines; a write that fails half-way is taken back, so no line is ever torn."""
        view, before = memoryview(data), self._size
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._size += written
        except OSError:
            os.ftruncate(self._fd, before)
            self._size = before
            raise

    # -- rotation ------------------------------------------------------------------------------

    def _rotate(self) -> None:
        """``path`` becomes ``path.1`` (then ``path.1.gz``), older ones move up, the oldest goes."""
        self._wait_compressor()
        os.close(self._fd)
        suffix = ".gz" if self.config.compress else ""
        keep = self.config.keep
        if keep == 0:
            os.unlink(self.path)
        else:
            for number in range(keep, 0, -1):
                older = f"{self.path}.{number}{suffix}"
                if os.path.lexists(older):
                    if number == keep:
                        os.unlink(older)
                    else:
                        os.rename(older, f"{self.path}.{number + 1}{suffix}")
            os.rename(self.path, f"{self.path}.1")
            if self.config.compress:
                self._compress_later(f"{self.path}.1")
        self._open()

    def _compress_later(self, source: str) -> None:
        self._compressor = threading.Thread(target=_gzip, args=(source, self.name), daemon=True,
                                            name=f"{self.id}-gzip")
        self._compressor.start()

    def _wait_compressor(self, timeout: Optional[float] = None) -> None:
        if self._compressor is not None:
            self._compressor.join(timeout)
            if not self._compressor.is_alive():
                self._compressor = None

    def close(self) -> None:
        if self._fd is not None:
            _hangup.unwatch(self)
            try:
                self._write_out()
            finally:
                os.close(self._fd)
                self._fd = None
                self._wait_compressor(_COMPRESS_WAIT)
        super().close()


def _gzip(source: str, name: str) -> None:
    """``source`` -> ``source.gz`` (0600, written aside and renamed), then ``source`` is removed."""
    target, partial = f"{source}.gz", f"{source}.gz.partial"
    try:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(src, "rb") as plain:
            dst = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(dst, "wb") as raw, gzip.GzipFile(os.path.basename(source), "wb", 6, raw) as packed:
                shutil.copyfileobj(plain, packed, 1 << 20)
        os.replace(partial, target)
        os.unlink(source)
    except OSError as exc:
        log.warning("%s: cannot compress %s (%s); it stays as it is", name, source, exc.strerror)


class _Hangup:
    """SIGHUP asks every open file sink to open its file again (after logrotate moved it). The handler
    only sets a flag; each sink's writer acts on it. Installed while a file sink is open, in the main
    thread (where Python runs signal handlers); a handler that was there before is called too."""

    def __init__(self) -> None:
        self._sinks: set[FileSink] = set()
        self._previous = None
        self._installed = False
        self._lock = threading.Lock()

    def watch(self, sink: FileSink) -> None:
        with self._lock:
            self._sinks.add(sink)
            if not self._installed:
                try:
                    self._previous = signal.signal(signal.SIGHUP, self._handler)
                    self._installed = True
                except ValueError:  # not the main thread: no SIGHUP, rotation by size still works
                    log.info("%s: started outside the main thread; SIGHUP will not reopen the file", sink.name)

    def unwatch(self, sink: FileSink) -> None:
        with self._lock:
            self._sinks.discard(sink)
            if self._installed and not self._sinks:
                try:
                    signal.signal(signal.SIGHUP, self._previous)
                    self._installed = False
                except ValueError:
                    pass

    def _handler(self, signum, frame) -> None:
        for sink in list(self._sinks):
            sink.reopen_requested = True
        if callable(self._previous):
            self._previous(signum, frame)


_hangup = _Hangup()
