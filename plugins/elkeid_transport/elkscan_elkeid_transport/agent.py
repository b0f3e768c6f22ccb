"""The process the Elkeid agent runs: fds checked, single instance, logs, signals, the session.

Started as ``<workdir>/scanner`` with no arguments, maybe an environment of only ``DETAIL``, stdin and
stdout on /dev/null, stderr to ``scanner.stderr``, fd 3 = tasks and fd 4 = records
(docs/elkeid-protocol.md section 1).
"""

from __future__ import annotations

import fcntl
import gzip
import logging
import logging.handlers
import os
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Optional

log = logging.getLogger("elkscan.elkeid")

DUPLICATE = "Clamav running duplicate, exit"
LOG_FILE = "scanner.log"
LOG_SIZE, LOG_BACKUPS = 5 * 1024 * 1024, 10  # Elkeid's
TERM_GRACE = 3.0  # seconds Elkeid waits after SIGTERM before it exits


def _pipes_open(fds: Sequence[int]) -> Optional[str]:
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            return (f"fd {fd} is not open. The Elkeid agent starts this program with its task pipe on fd 3 "
                    "and its record pipe on fd 4; for a scan from a shell use 'elkscan scan'.")
    return None


def setup_logging(level: int = logging.INFO) -> None:
    """Logs to ./scanner.log, rotated as Elkeid's (5 MiB, 10 gzip-compressed backups), and only there:
    stderr (``scanner.stderr``, which nothing rotates) is used only when that file cannot be written.
    Nothing can reach the record pipe."""
    root = logging.getLogger()
    root.setLevel(level)
    try:
        # A file name that is not UTF-8 is logged with its bad bytes escaped, not lost in a logging error.
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            LOG_FILE, maxBytes=LOG_SIZE, backupCount=LOG_BACKUPS, encoding="utf-8", errors="backslashreplace")
        handler.namer = lambda name: name + ".gz"
        handler.rotator = _gzip_rotate
    except OSError as exc:
        print(f"scanner: cannot write {os.path.abspath(LOG_FILE)} ({exc.strerror}); logging to stderr",
              file=sys.stderr)
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s\t%(name)s\t%(filename)s:%(lineno)d\t"
                                           "%(message)s"))
    root.addHandler(handler)


def _gzip_rotate(source: str, dest: str) -> None:
    """A rotated log, compressed as Elkeid's are (``scanner.log.1.gz`` ...)."""
    with open(source, "rb") as plain, gzip.open(dest, "wb", compresslevel=1) as packed:
        shutil.copyfileobj(plain, packed)
    os.unlink(source)


def acquire_lock(path: str) -> Optional[int]:
    """Elkeid's single-instance lock: the fd holding it, or None when another instance holds it."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``pipeline`` (argv[0]) for the agent; the exit code."""
    from elkscan_core import ElkscanError, load_pipeline

    from .tasks import DEFAULT_LOCK

    argv = list(sys.argv[1:] if argv is None else argv)
    problem = _pipes_open((3, 4))  # before any file is opened, which could take fd 3 or 4
    if problem:
        print(f"scanner: {problem}", file=sys.stderr)
        return 2
    for fd in (3, 4):
        os.set_inheritable(fd, False)  # no child (clamd) holds the agent's pipes open
    sys.stdout = sys.stderr  # a stray print goes to the log, never near fd 4
    for signum in (signal.SIGUSR1, signal.SIGINT):  # ignored, as Elkeid does
        signal.signal(signum, signal.SIG_IGN)
    if not argv:
        print("usage: scanner PIPELINE.yaml", file=sys.stderr)
        return 2
    try:
        pipeline = load_pipeline(argv[0])  # read only, to find the lock file: nothing starts
    except ElkscanError as exc:
        print(f"scanner: cannot start: {exc}", file=sys.stderr)
        return 2
    lock_path = _lock_path(pipeline) or DEFAULT_LOCK
    try:
        lock = acquire_lock(lock_path)  # as Elkeid, before anything else: logs, engines, clamd
    except OSError as exc:
        print(f"scanner: cannot open the lock file {lock_path}: {exc.strerror}", file=sys.stderr)
        return 2
    if lock is None:
        print(DUPLICATE, file=sys.stderr)
        return 0
    try:
        return _run(pipeline)
    finally:
        os.close(lock)


def _lock_path(pipeline) -> Optional[str]:
    """The ``lock_file`` option of the pipeline's elkeid source, if it sets one."""
    spec = next((s for s in pipeline.sources if s.use == "elkeid"), None)
    value = spec.options.get("lock_file") if spec is not None else None
    return value if isinstance(value, str) and value else None


def _run(pipeline) -> int:
    """Build the session and run it until the agent goes away; the exit code."""
    from elkscan_core import ElkscanError, make_plugin_manager
    from elkscan_core.runner import build_session

    setup_logging()
    threading.excepthook = _log_thread_death
    try:
        session = build_session(pipeline, make_plugin_manager(pipeline.plugins))
    except ElkscanError as exc:
        log.error("cannot start: %s", exc)
        return 2

    def terminate(signum, _frame) -> None:
        # As Elkeid: stop, and exit TERM_GRACE seconds later at the latest. The work is done on a
        # thread, not in the handler, which may have interrupted a thread holding the logging lock.
        threading.Thread(target=_stop_then_exit, args=(session, signum), daemon=True).start()

    signal.signal(signal.SIGTERM, terminate)
    try:
        session.run()
    except ElkscanError as exc:
        log.error("cannot start: %s", exc)
        return 2
    log.info("stopped")
    return 0


def _log_thread_death(args) -> None:
    """An exception that ends any thread is logged (an ERROR, so a 1010 upstream), never only printed."""
    if args.exc_type is not SystemExit:
        name = args.thread.name if args.thread is not None else "?"
        log.error("thread %s died", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _stop_then_exit(session, signum: int) -> None:
    log.info("signal %d: stopping, exiting in %g s at the latest", signum, TERM_GRACE)
    timer = threading.Timer(TERM_GRACE, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    session.stop()
