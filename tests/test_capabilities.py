"""Engine capabilities (docs/writing-plugins.md#engine-capabilities): the runner never calls an engine
that is not thread-safe from two threads at once, and a hang in one of its calls fails the others at
once instead of queueing them behind it."""

import threading
import time

from elkscan_core import Detection, Engine, hookimpl
from elkscan_core.testing import run


class Counting(Engine):
    """Counts how many of its calls run at the same time (several files, two workers)."""

    id = "counting"
    thread_safe = False
    lock = threading.Lock()
    running = 0
    most = 0
    calls = 0

    def scan(self, subject):
        cls = type(self)
        with cls.lock:
            cls.running += 1
            cls.calls += 1
            cls.most = max(cls.most, cls.running)
        time.sleep(0.01)
        with cls.lock:
            cls.running -= 1
        return [Detection.from_signature(self.id, "Txt.Test.Bad")] if b"bad" in subject.read(64) else []


class HangsOnFirst(Engine):
    """Not thread-safe; its call on ``hang.txt`` never returns in time."""

    id = "hangsonfirst"
    thread_safe = False
    call_timeout = 0.5

    def scan(self, subject):
        if subject.path.endswith("hang.txt"):
            time.sleep(30)
        return []


class Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Counting)
        registry.add(HangsOnFirst)


def _scan(root, engine, **kwargs):
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                "engines": [{"use": engine}], "limits": {"workers": 2}}
    return run(pipeline, extra_plugins=[Plugin()], **kwargs)


def test_an_engine_that_is_not_thread_safe_gets_one_call_at_a_time(tmp_path):
    for index in range(40):
        (tmp_path / f"f{index}.txt").write_bytes((b"bad" if index % 4 == 0 else b"fine") * 64)
    result = _scan(tmp_path, "counting")
    assert Counting.calls >= 40 and Counting.most == 1
    assert len(result.detected) == 10 and result.summary.clean == 30


def test_while_its_call_hangs_the_other_calls_fail_at_once(tmp_path):
    (tmp_path / "hang.txt").write_bytes(b"x" * 256)
    for index in range(20):
        (tmp_path / f"f{index}.txt").write_bytes(b"y" * 256)
    started = time.monotonic()
    result = _scan(tmp_path, "hangsonfirst", report_clean=True)
    assert time.monotonic() - started < 20  # not 20 timeouts one after the other, nor the 30 s hang
    by_name = {r.target.path.rsplit("/", 1)[1]: r for r in result.records}
    assert by_name["hang.txt"].errors[0].status == "timeout"
    assert len(by_name) == 21 and all(r.status in ("clean", "error") for r in by_name.values())
    busy = [r for r in by_name.values() if r.status == "error" and r.errors[0].status == "failed"]
    assert all("is not thread-safe and its call on" in r.error and "hang.txt hangs" in r.error for r in busy)
    assert result.summary.clean + result.summary.errors == 21  # every file judged or an error, none lost
