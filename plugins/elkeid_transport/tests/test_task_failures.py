"""A 6053 or 6057 whose walk, or whose whole thread, raises still ends with its 6000 and a 1010
(audit F8/F9: an ELOOP escaped the walk in a thread nobody read, and the task never ended). Run in a
real session with the real YARA engine; only the walker is the test's own, so that it raises whatever
the core's walk does."""

from __future__ import annotations

import errno
import os
import threading

from elkscan_core import LOG, TASK_DONE, Sink, hookimpl
from elkscan_core.default_plugins.dirscan import Dirscan
from elkscan_core.testing import SAMPLES, run
from elkscan_elkeid_transport.mapping import TASK_RESULT
from elkscan_elkeid_transport.tasks import ElkeidTasks

EICAR = SAMPLES["eicar.com"][0]


class LoopingWalker(Dirscan):
    """Walks for real, then fails under any directory named ``loop`` as an ELOOP would."""

    def walk(self, root, max_depth):
        yield from super().walk(root, max_depth)
        if os.path.basename(root) == "loop":
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.path.join(root, "l1"))


class RaisingTasks(ElkeidTasks):
    id = "elkeid_raising"

    def walker(self, config):
        if any(os.path.basename(r) == "broken" for r in config.roots):
            raise RuntimeError("the walker could not be built")
        return LoopingWalker(config, self.session)


class Ends(Sink):
    """Counts 6000s, so the test hangs up like the agent once every task has ended."""

    id = "ends"
    count = 0
    cond = threading.Condition()

    def write(self, record) -> None:
        if record.kind == TASK_DONE:
            with self.cond:
                Ends.count += 1
                self.cond.notify_all()


class _Plugin:
    @hookimpl
    def elkscan_register_sources(self, registry) -> None:
        registry.add(RaisingTasks)

    @hookimpl
    def elkscan_register_sinks(self, registry) -> None:
        registry.add(Ends)


def run_tasks(tmp_path, frames: list[bytes], ends: int, **options):
    task_r, task_w = os.pipe()
    os.write(task_w, b"".join(frames))
    data = {"plugins": ["elkeid_transport", "yara_backend"],
            "sources": [{"use": "elkeid_raising", "with": {
                "fd": task_r, "lock_file": str(tmp_path / "lock"), "db_dir": str(tmp_path / "tmp"),
                "cpu_sample": "50ms", "exclude": ["/proc"], **options}}],
            "engines": [{"use": "yara"}], "sinks": [{"use": "ends"}], "state_dir": str(tmp_path / "state")}
    Ends.count = 0
    holder = {}
    thread = threading.Thread(target=lambda: holder.update(result=run(data, extra_plugins=[_Plugin()])))
    thread.start()
    with Ends.cond:
        assert Ends.cond.wait_for(lambda: Ends.count >= ends, 60), "a task never ended"
    os.close(task_w)  # the agent hangs up
    thread.join(30)
    os.close(task_r)
    return holder["result"]


def tree(tmp_path, name: str) -> str:
    top = tmp_path / name
    top.mkdir()
    (top / "eicar.com").write_bytes(EICAR)
    return str(top)


def test_a_6053_whose_walk_raises_reports_what_it_found_then_a_6000_failed_and_a_1010(tmp_path, task_frame):
    loop = tree(tmp_path, "loop")
    result = run_tasks(tmp_path, [task_frame(6053, f'{{"exe": "{loop}"}}', "t-loop")], ends=1)
    done = [r for r in result.records if r.kind == TASK_DONE]
    assert [(r.token, r.facts["status"]) for r in done] == [("t-loop", "failed")]
    msg = done[0].facts["msg"]
    assert msg == f"the walk of {loop} stopped: OSError: [Errno 40] Too many levels of symbolic links: '{loop}/l1'"
    results = [r for r in result.records if r.kind == TASK_RESULT]
    assert [(r.target.path, r.detected) for r in results] == [(f"{loop}/eicar.com", True)]
    assert result.records.index(results[0]) < result.records.index(done[0])  # the 6003 before the 6000
    assert any(r.kind == LOG and msg in r.facts["msg"] for r in result.records)


def test_a_6057_walks_the_other_roots_when_one_raises_and_ends_failed_with_the_reason(tmp_path, task_frame):
    loop, mixed = tree(tmp_path, "loop"), tree(tmp_path, "mixed")
    task = task_frame(6057, '{"mode": "quick", "cpu_idle": "100"}', "t-quick")
    result = run_tasks(tmp_path, [task], ends=1, quick_roots=[loop, mixed])
    (done,) = [r for r in result.records if r.kind == TASK_DONE]
    assert (done.token, done.facts["status"]) == ("t-quick", "failed")
    assert done.facts["msg"].startswith(f"the walk of {loop} stopped: OSError: [Errno 40]")
    hits = {r.target.path for r in result.records if r.kind == "finding" and r.detected}
    assert {f"{loop}/eicar.com", f"{mixed}/eicar.com"} <= hits  # the root after the failing one too
    assert any(r.kind == LOG and done.facts["msg"] in r.facts["msg"] for r in result.records)


def test_a_scan_thread_that_raises_still_ends_its_task_and_says_why(tmp_path, task_frame):
    broken = tree(tmp_path, "broken")
    frames = [task_frame(6053, f'{{"exe": "{broken}"}}', "t-broken"),
              task_frame(6057, '{"mode": "quick", "cpu_idle": "100"}', "t-broken-quick"),
              task_frame(6053, '{"exe": "/etc/hostname"}', "t-fine")]
    result = run_tasks(tmp_path, frames, ends=3, quick_roots=[broken])
    done = {r.token: (r.facts["status"], r.facts["msg"]) for r in result.records if r.kind == TASK_DONE}
    assert done == {"t-broken": ("failed", "RuntimeError: the walker could not be built"),
                    "t-broken-quick": ("failed", "RuntimeError: the walker could not be built"),
                    "t-fine": ("succeed", "")}
    logs = [r.facts["msg"] for r in result.records if r.kind == LOG]
    assert sum("failed: RuntimeError: the walker could not be built" in m for m in logs) == 2
