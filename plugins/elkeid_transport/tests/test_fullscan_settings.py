"""6057 settings as Elkeid reads them (audit #8): `cpu_idle` 30 by default, `"0"` or anything that is not
a positive number means the default, any `mode` but `full` is quick, and `mem`, `cpu` and `worker` steer
the session's governor for the length of the task only. Run in a real session with the real YARA engine,
and through the packaged `scanner` as the agent starts it."""

from __future__ import annotations

import logging
import os
import threading

from elkscan_core import FINDING, TASK_DONE, Engine, Sink, hookimpl
from elkscan_core.testing import SAMPLES, run
from elkscan_core.units import MiB

EICAR = SAMPLES["eicar.com"][0]


class Watch(Sink):
    """Notes what the governor holds whenever a record passes, and hangs up after the last 6000."""

    id = "watch"
    seen: list = []
    cond = threading.Condition()

    def write(self, record) -> None:
        governor = self.session.governor
        with self.cond:
            Watch.seen.append((record.kind, record.token, governor.memory, governor.active_workers))
            self.cond.notify_all()


class Peek(Engine):
    """Notes what the governor holds while a file is scanned (during the task, by construction)."""

    id = "peek"
    seen: list = []

    def scan(self, subject) -> list:
        governor = self.session.governor
        Peek.seen.append((subject.target.job.token, governor.memory, governor.active_workers))
        return []


class _Plugin:
    @hookimpl
    def elkscan_register_sinks(self, registry) -> None:
        registry.add(Watch)

    @hookimpl
    def elkscan_register_engines(self, registry) -> None:
        registry.add(Peek)


def run_6057(tmp_path, tasks: list[bytes], **options):
    task_r, task_w = os.pipe()
    os.write(task_w, b"".join(tasks))
    data = {"plugins": ["elkeid_transport", "yara_backend"],
            "sources": [{"use": "elkeid", "with": {
                "fd": task_r, "lock_file": str(tmp_path / "lock"), "db_dir": str(tmp_path / "tmp"),
                "cpu_sample": "50ms", "exclude": ["/proc"], **options}}],
            "engines": [{"use": "yara"}, {"use": "peek"}], "sinks": [{"use": "watch"}], "state_dir": str(tmp_path / "state"),
            "limits": {"workers": 3}}
    Watch.seen, Peek.seen = [], []
    holder = {}
    thread = threading.Thread(target=lambda: holder.update(result=run(data, extra_plugins=[_Plugin()])))
    thread.start()
    with Watch.cond:
        assert Watch.cond.wait_for(lambda: sum(kind == TASK_DONE for kind, *_ in Watch.seen) >= len(tasks), 60)
    os.close(task_w)
    thread.join(30)
    os.close(task_r)
    return holder["result"]


def test_mem_and_worker_hold_during_the_task_only_and_odd_values_mean_elkeids_defaults(
        tmp_path, task_frame, caplog):
    quick, full = tmp_path / "quick", tmp_path / "full"
    quick.mkdir()
    full.mkdir()
    (quick / "eicar.com").write_bytes(EICAR)
    (full / "other_eicar.com").write_bytes(EICAR)
    tasks = [task_frame(6057, {"mode": "Full", "cpu_idle": "0", "timeout": "soon", "mem": "64", "worker": "1",
                               "cpu": "x"}, "odd"),
             task_frame(6057, {}, "empty")]
    with caplog.at_level(logging.INFO, logger="elkscan.elkeid"):
        result = run_6057(tmp_path, tasks[:1], quick_roots=[str(quick)], full_roots=[str(full)])
        result2 = run_6057(tmp_path, tasks[1:], quick_roots=[str(quick)], full_roots=[str(full)])
    for outcome in (result, result2):
        done = [r for r in outcome.records if r.kind == TASK_DONE]
        assert [r.facts["status"] for r in done] == ["succeed"]
        hits = [r.target.path for r in outcome.records if r.kind == FINDING and r.detected
                and r.target.path.startswith(str(tmp_path))]  # not what other tests' processes run
        assert hits == [str(quick / "eicar.com")]  # "Full" and no mode are both quick
    (during,) = set(Peek.seen)
    assert during[:2] == ("empty", 512 * MiB) and 1 <= during[2] <= 3  # Elkeid's 512 MB; its worker count
    log = caplog.text
    assert "6057 quick scan (token 'odd'), timeout 1 h" in log
    assert "cpu_idle '0' is not a positive number; the default 30 is used" in log
    assert "timeout 'soon' is not a positive number; the default 1 is used" in log
    assert "1 of 3 worker(s), memory ceiling 64 MiB (cpu_idle 30%)" in log
    assert "6057 quick scan (token 'empty'), timeout 1 h" in log and "(cpu_idle 30%)" in log


def test_the_governor_is_back_to_the_pipelines_limits_after_the_task(tmp_path, task_frame):
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "eicar.com").write_bytes(EICAR)
    run_6057(tmp_path, [task_frame(6057, {"mem": "64", "worker": "1", "cpu_idle": "100"}, "t")],
             quick_roots=[str(quick)])
    assert set(Peek.seen) == {("t", 64 * MiB, 1)}  # while the task's files were scanned
    (after,) = [(memory, workers) for kind, _, memory, workers in Watch.seen if kind == TASK_DONE]
    assert after == (None, 3)  # the pipeline sets no memory ceiling and 3 workers
