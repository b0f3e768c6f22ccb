"""The ``elkeid`` source: the agent's tasks from fd 3 (docs/elkeid-protocol.md section 3).

A reader thread takes frames off the pipe as soon as they arrive (the agent does not buffer, so a slow
reader loses tasks) and queues them; a dispatcher thread runs each task, long ones (6050, 6053, 6057) on
threads of their own. Whatever a task produces (targets for the workers, records such as a 6000)
goes through one queue that ``targets()`` hands to the session. End of file on fd 3 ends the session,
as Elkeid exits when the agent closes the pipe.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import attrs
from attrs import frozen

from elkscan_core import LOG, TASK_DONE, ComponentError, Duration, Record, Size, Source, Target
from elkscan_core.default_plugins.dirscan import LINK_POLICIES, Dirscan, DirscanConfig
from elkscan_core.paths import ELKEID_EXCLUDES

from .database import Database, DatabaseError, DatabaseSpec, read_state
from .mapping import DB_VERSION, text
from .scans import FullScan, PathScan, TaskScan
from .sink import upstream_level
from .taskdata import TaskError, parse_json
from .wire import Task, WireError, decode_task, read_frames

log = logging.getLogger("elkscan.elkeid")

DEFAULT_LOCK = "/var/run/elkeid_scanners_plugin.pid"
PATH_SCANS = 4  # 6053 tasks scanned at the same time; more wait their turn
_EOF = object()
CONTROL_TASKS = {6051: "anti-ransomware on", 6052: "file monitoring on and anti-ransomware off",
                 6054: "reset anti-ransomware"}
#: What the reader looks for to get back in step after a corrupted frame header.
TASK_TYPES = frozenset({6050, 6053, 6057, *CONTROL_TASKS})


@frozen
class ElkeidTasksConfig:
    """Options of ``use: elkeid`` as a source (docs/elkeid.md lists each with Elkeid's value)."""

    fd: int = 3
    lock_file: str = DEFAULT_LOCK
    # The rule database: relative paths are relative to the working directory, as in Elkeid.
    db_dir: str = "tmp"
    extract_dir: str = "dat"
    db_version: str = ""
    db_sha256: str = ""
    db_password: str = "clamav_default_passwd"
    download_timeout: Duration = Duration(60)
    download_limit: Size = Size(512 * 1024 * 1024)
    # 6053 and 6057
    min_size: Size = Size(5)
    max_size: Size = Size(100 * 1024 * 1024)
    task_links: str = attrs.field(default="always", validator=attrs.validators.in_(LINK_POLICIES))
    quick_roots: Optional[list[str]] = None
    full_roots: list[str] = attrs.field(factory=lambda: ["/"])
    exclude: list[str] = attrs.field(factory=lambda: [*ELKEID_EXCLUDES, "/proc"])
    cpu_sample: Duration = Duration(5)
    progress: Optional[Duration] = None


class _Passed:
    """A marker put after a task's targets: set once the session has taken all of them."""

    def __init__(self) -> None:
        self.event = threading.Event()


class ElkeidTasks(Source):
    """Reads the agent's tasks and turns each into targets and records."""

    id = "elkeid"
    Config = ElkeidTasksConfig
    call_timeout = None

    def __init__(self, config: ElkeidTasksConfig, session) -> None:
        super().__init__(config, session)
        self._tasks: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue(maxsize=256)
        # 6053s run a few at a time, however many the agent sends at once
        self._path_scans = ThreadPoolExecutor(PATH_SCANS, thread_name_prefix="elkeid-6053")
        self._full_scan = threading.Lock()
        self._update = threading.Lock()
        self._log_handler: Optional[logging.Handler] = None
        self.database = Database(session, os.path.abspath(config.db_dir), os.path.abspath(config.extract_dir))

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        try:
            os.fstat(self.config.fd)
        except OSError:
            raise ComponentError(f"fd {self.config.fd} is not open: the Elkeid agent passes its task pipe "
                                 "there (run elkscan under the agent, or set fd)") from None
        os.set_inheritable(self.config.fd, False)
        sink = self.session.find("sink", "elkeid")
        self._log_handler = UpstreamLog(self, upstream_level(sink.config.log_level if sink else "ERROR"))
        logging.getLogger().addHandler(self._log_handler)
        # Tasks are read (and queued) while the database loads, which may mean a download.
        threading.Thread(target=self._read, name="elkeid-reader", daemon=True).start()
        self._load_database()

    def close(self) -> None:
        self._path_scans.shutdown(wait=False, cancel_futures=True)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler = None

    def _configured_databases(self) -> list[tuple[str, DatabaseSpec]]:
        """The databases to try at start, in order: DETAIL (the agent's plugin config), the one the last
        update installed (``archive_db.json``), the pipeline's ``db_version``."""
        pipeline = DatabaseSpec(version=self.config.db_version, sha256=self.config.db_sha256,
                                passwd=self.config.db_password)
        found = [("the pipeline", pipeline)]
        try:
            state = read_state(self.database.db_dir)
            if state is not None:
                found.insert(0, ("archive_db.json", DatabaseSpec.from_state(state, pipeline)))
        except DatabaseError as exc:
            log.error("%s", exc)
        detail = os.environ.get("DETAIL", "")
        if detail:
            try:
                found.insert(0, ("DETAIL", DatabaseSpec.from_task(json.loads(detail), pipeline)))
            except ValueError as exc:
                log.error("DETAIL is not JSON (%s); its database settings are ignored", exc)
            except DatabaseError as exc:
                log.error("DETAIL names no usable database (%s); it is ignored", exc)
        return [(what, spec) for what, spec in found if spec.version]

    def _load_database(self) -> None:
        """The first configured database that loads (downloaded first when DETAIL names mirrors and the
        archive is not there, as Elkeid does); each one that does not is an error line."""
        tried = set()
        for what, spec in self._configured_databases():
            if (spec.version, spec.name) in tried:
                continue
            tried.add((spec.version, spec.name))
            try:
                if spec.urls and not os.path.exists(spec.archive(self.database.db_dir)):
                    log.info("rule database %s is not in %s; fetching it", spec.version, self.database.db_dir)
                    version = self.database.update(spec, timeout=self.config.download_timeout,
                                                   limit=self.config.download_limit)
                else:
                    version = self.database.load(spec)
            except DatabaseError as exc:
                log.error("rule database %s (from %s) not loaded: %s", spec.version, what, exc)
                continue
            log.info("rule database %s loaded", version)
            return
        if tried:
            log.error("no rule database could be loaded: the engines keep their own rules")
        else:
            log.info("no rule database configured; the engines keep their own rules")

    # -- what the session sees ----------------------------------------------------------------

    def targets(self) -> Iterator[Target | Record]:
        # Tasks run once every component has started (a 6051 needs the fanotify source up); until
        # then the reader only queues them.
        threading.Thread(target=self._dispatch, name="elkeid-tasks", daemon=True).start()
        while True:
            try:
                item = self._out.get(timeout=0.2)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            if isinstance(item, _Passed):
                item.event.set()
                continue
            yield item

    def emit(self, item: Target | Record | _Passed, deadline: Optional[float] = None) -> bool:
        """Queue an item for the session; False when the session stops or ``deadline`` passes first."""
        while not self.stopping.is_set():
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                self._out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        if isinstance(item, Target) and item.fd is not None:
            os.close(item.fd)
        return False

    def hand_over(self, items: Iterable[Target | Record], deadline: Optional[float] = None) -> bool:
        """Queue every item, then wait until the session has taken them all (so a job's ``wait()``
        counts every target); False when stopped or past ``deadline``."""
        for item in items:
            if not self.emit(item, deadline):
                return False
        marker = _Passed()
        if not self.emit(marker, deadline):
            return False
        while not marker.event.wait(0.2):
            if self.stopping.is_set() or (deadline is not None and time.monotonic() > deadline):
                return False
        return True

    def done(self, token: str, status: str, msg: str = "") -> None:
        """The 6000 that ends a task."""
        self.emit(Record(kind=TASK_DONE, facts={"status": status, "msg": msg}, token=token))

    # -- reading and dispatching --------------------------------------------------------------

    def _read(self) -> None:
        try:
            for frame in read_frames(self.config.fd, accept=lambda task: task.data_type in TASK_TYPES):
                if isinstance(frame, WireError):
                    log.error("malformed task from the agent: %s", frame)
                    continue
                try:
                    self._tasks.put(decode_task(frame))
                except WireError as exc:
                    log.error("malformed task from the agent (%d bytes, starting %s): %s; skipped",
                              len(frame), frame[:16].hex(), exc)
        except OSError as exc:
            log.error("cannot read tasks from fd %d: %s", self.config.fd, exc.strerror or exc)
        except Exception:
            log.exception("the task reader failed; stopping")
        finally:
            self._tasks.put(_EOF)

    def _dispatch(self) -> None:
        while True:
            task = self._tasks.get()
            if task is _EOF:
                if not self.stopping.is_set():
                    log.info("the agent closed the task pipe; stopping")
                    self.session.stop()
                return
            try:
                self.handle(task)
            except Exception:
                log.exception("task %d (token %r) failed", task.data_type, task.token)

    def handle(self, task: Task) -> None:
        log.info("task %d received (token %r)", task.data_type, task.token)
        if task.data_type == 6053:
            self._path_scans.submit(self._run_scan, PathScan(self, task))
        elif task.data_type == 6057:
            if not self._full_scan.acquire(blocking=False):
                log.error("task 6057 (token %r) refused: a full/quick scan is already running", task.token)
                self.done(task.token, "failed", "a disk scan is already running")
                return
            self._spawn(self._full_scan_then_release, "elkeid-6057", FullScan(self, task))
        elif task.data_type == 6050:
            self._spawn(self.update, "elkeid-6050", task)
        elif task.data_type in CONTROL_TASKS:
            self.control(task.data_type)
        else:
            log.error("unknown data_type %d in a task (token %r, data %.200r); ignored",
                      task.data_type, task.token, task.data)

    def _full_scan_then_release(self, scan: FullScan) -> None:
        try:
            self._run_scan(scan)
        finally:
            self._full_scan.release()

    def _run_scan(self, scan: TaskScan) -> None:
        """Run a 6053/6057 on its own thread, where nobody would read an exception: whatever it
        raises is logged (a 1010) and the task still ends with its 6000."""
        try:
            scan.run()
        except Exception as exc:
            log.exception("task %d (token %r) failed", scan.task.data_type, scan.task.token)
            if not scan.answered:
                scan.finish("failed", f"{type(exc).__name__}: {exc}")

    def walker(self, config: DirscanConfig) -> Dirscan:
        """The directory walker of a 6053 or 6057."""
        return Dirscan(config, self.session)

    @staticmethod
    def _spawn(target, name: str, *args) -> None:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()

    # -- 6050 and the fanotify controls -------------------------------------------------------

    def update(self, task: Task) -> None:
        """6050, one at a time, on its own thread: what it raises is logged (a 1010), never lost."""
        with self._update:
            try:
                self._update_now(task)
            except Exception:
                log.exception("task 6050 (token %r) failed", task.token)

    def _update_now(self, task: Task) -> None:
        try:
            data = parse_json(task)
        except TaskError as exc:
            log.error("task 6050 (rule database update) failed: %s", exc)
            return
        try:
            spec = DatabaseSpec.from_task(data, DatabaseSpec(passwd=self.config.db_password))
            if not spec.urls:
                raise DatabaseError("the update names no mirror URL")
            version = self.database.update(spec, timeout=self.config.download_timeout,
                                           limit=self.config.download_limit)
            log.info("rule database %s installed", version)
        except DatabaseError as exc:
            log.error("task 6050 (rule database update) failed: %s", exc)
        finally:
            # As Elkeid: after every 6050 that parses, success or not, the task's version and sha256.
            self.emit(Record(kind=DB_VERSION, token=task.token, facts={
                "version": text(data.get("version", "")), "exe_hash": text(data.get("sha256", ""))}))

    def control(self, data_type: int) -> None:
        monitor = self.session.find("source", "fanotify")
        what = CONTROL_TASKS[data_type]
        if monitor is None:
            log.error("task %d (%s) is unsupported: no fanotify source is running (it is not in the "
                      "pipeline, or it could not start: see the log; it needs root and fanotify_source in "
                      "plugins:)", data_type, what)
            return
        try:
            if data_type == 6052:
                monitor.file_monitor(True)
                monitor.anti_ransom(False)
            else:  # 6051, and 6054 as in Elkeid 2.2.0.1: decoys placed afresh and watched, even if it was off
                monitor.anti_ransom(True)
        except Exception as exc:
            log.error("task %d (%s) failed: %s: %s", data_type, what, type(exc).__name__, exc)


class UpstreamLog(logging.Handler):
    """Log lines at the elkeid sink's ``log_level`` (ERROR) and above -> 1010 records, queued for the
    agent (never blocking the thread that logs)."""

    def __init__(self, source: ElkeidTasks, level: int) -> None:
        super().__init__(level)
        self.source = source

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread().name.startswith("sink-"):
            return  # the record pipe itself failed: nothing to send it on
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            facts = {"level": record.levelname, "target": record.name, "file": record.pathname,
                     "line": record.lineno, "msg": message}
            self.source._out.put_nowait(Record(kind=LOG, facts={k: text(v) for k, v in facts.items()},
                                               timestamp=record.created))
        except queue.Full:
            print("elkscan: error log queue full; a 1010 record was dropped", file=sys.stderr)
        except Exception:
            self.handleError(record)
