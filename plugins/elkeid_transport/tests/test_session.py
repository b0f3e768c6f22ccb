"""The transport inside a real session (no subprocess): fanotify controls, a closed record pipe, and the
6057 timeout path, with small components of the test's own where the real one is not the subject."""

from __future__ import annotations

import os
import threading

from elkscan_core import TASK_DONE, Engine, Sink, Source, hookimpl
from elkscan_core.testing import run


class FakeMonitor(Source):
    """Stands in for the fanotify source: records the control calls the transport makes."""

    id = "fanotify"
    calls: list = []

    def targets(self):
        self.stopping.wait()
        yield from ()

    def anti_ransom(self, on: bool) -> None:
        self.calls.append(("anti_ransom", on))
        if len(self.calls) == 4:
            raise RuntimeError("no home to place decoys in")

    def file_monitor(self, on: bool) -> None:
        self.calls.append(("file_monitor", on))


class _Plugin:
    @hookimpl
    def elkscan_register_sources(self, registry) -> None:
        registry.add(FakeMonitor)


def tasks_pipe(frames: list[bytes]) -> int:
    """A pipe already holding ``frames`` and closed by the writer (the agent then hangs up)."""
    r, w = os.pipe()
    os.write(w, b"".join(frames))
    os.close(w)
    return r


def pipeline(task_fd: int, tmp_path, **sink) -> dict:
    data = {"plugins": ["elkeid_transport"],
            "sources": [{"use": "elkeid", "with": {"fd": task_fd, "lock_file": str(tmp_path / "lock"),
                                                    "db_dir": str(tmp_path / "tmp"), "cpu_sample": "50ms"}}],
            "state_dir": str(tmp_path / "state")}
    if sink:
        data["sinks"] = [{"use": "elkeid", "with": sink}]
    return data


def test_6051_6052_6054_drive_the_fanotify_source(tmp_path, task_frame, caplog):
    FakeMonitor.calls = []
    frames = [task_frame(t) for t in (6051, 6052, 6054)]
    fd = tasks_pipe(frames)
    data = pipeline(fd, tmp_path)
    data["sources"].append({"use": "fanotify"})
    result = run(data, extra_plugins=[_Plugin()])
    os.close(fd)
    # 6054 as in Elkeid 2.2.0.1: anti-ransomware back on, decoys placed afresh, even after a 6052 (audit #24)
    assert FakeMonitor.calls == [("anti_ransom", True), ("file_monitor", True), ("anti_ransom", False),
                                 ("anti_ransom", True)]
    # (the agent hung up right after these tasks, so the 1010 line only reaches the log)
    assert "task 6054 (reset anti-ransomware) failed: RuntimeError: no home to place decoys in" in caplog.text
    assert result.summary.interrupted


def test_a_closed_record_pipe_ends_the_session(tmp_path, task_frame):
    task_r, task_w = os.pipe()
    rec_r, rec_w = os.pipe()
    os.close(rec_r)  # the agent is gone
    os.write(task_w, task_frame(7777, token="x"))  # answered by a 1010 log line: the write fails
    finished = threading.Event()
    outcome = {}

    def go() -> None:
        outcome["result"] = run(pipeline(task_r, tmp_path, fd=rec_w))
        finished.set()

    threading.Thread(target=go, daemon=True).start()
    assert finished.wait(30), "the session did not stop after EPIPE"
    assert outcome["result"].summary.interrupted
    for fd in (task_r, task_w, rec_w):
        os.close(fd)


class SlowEngine(Engine):
    """Takes a while per file, so that a scan outlives its timeout."""

    id = "slow"

    def scan(self, subject):
        threading.Event().wait(0.3)
        return []


class DoneWatcher(Sink):
    """Signals the first task end, so the test can hang up like the agent."""

    id = "watch"
    seen = threading.Event()

    def write(self, record) -> None:
        if record.kind == TASK_DONE:
            self.seen.set()


class _SlowPlugin:
    @hookimpl
    def elkscan_register_engines(self, registry) -> None:
        registry.add(SlowEngine)

    @hookimpl
    def elkscan_register_sinks(self, registry) -> None:
        registry.add(DoneWatcher)


def test_6057_timeout_cancels_the_rest_and_reports_fullscan_timeout(tmp_path, task_frame):
    roots = tmp_path / "roots"
    roots.mkdir()
    for i in range(40):
        (roots / f"f{i}.txt").write_text("some content\n")
    task_r, task_w = os.pipe()
    os.write(task_w, task_frame(6057, '{"mode": "quick", "timeout": "0.0003", "cpu_idle": "100"}', "tt"))
    data = pipeline(task_r, tmp_path)
    data["sources"][0]["with"].update(quick_roots=[str(roots)], exclude=["/proc"])
    data["engines"] = [{"use": "slow"}]
    data["sinks"] = [{"use": "watch"}]
    DoneWatcher.seen.clear()
    holder = {}
    thread = threading.Thread(target=lambda: holder.update(result=run(data, extra_plugins=[_SlowPlugin()])))
    thread.start()
    assert DoneWatcher.seen.wait(30)
    os.close(task_w)  # the agent hangs up
    thread.join(30)
    os.close(task_r)
    result = holder["result"]
    done = [r for r in result.records if r.kind == TASK_DONE]
    assert [(r.facts["status"], r.facts["msg"], r.token) for r in done] == [("failed", "FullScan TimeOut.", "tt")]
    assert result.records[-1].kind == TASK_DONE
    # at 0.3 s a file on 2 workers, about 8 of the process executables and 40 files were judged in time;
    # the rest was cancelled, and nothing came after the 6000
    assert result.summary.files < 20
