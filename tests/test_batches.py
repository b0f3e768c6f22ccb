"""The hand-over in batches (scheduling.py): a worker takes several targets at once, and nothing of what
the hand-over promised one target at a time is lost: a hang on one file does not hold the rest of its
batch, a target is never held back waiting for a batch to fill, the queue's bound still holds, and large
files go alone."""

from __future__ import annotations

import threading
import time

from elkscan_core import Engine, Source, Target, hookimpl, make_plugin_manager, parse_pipeline
from elkscan_core.runner import Session
from elkscan_core.scheduling import BATCH, BATCH_BYTES
from elkscan_core.testing import run


class HangOnFirst(Engine):
    """Hangs past its call_timeout on the first file it is given; the others are clean."""

    id = "hangonfirst"
    call_timeout = 0.5
    hung = threading.Event()

    def scan(self, subject):
        if not HangOnFirst.hung.is_set():
            HangOnFirst.hung.set()
            time.sleep(3)
        return []


class Trickle(Source):
    """Yields one file, then waits (as a monitor between events) until that file has been judged."""

    id = "trickle"
    path = ""
    judged = threading.Event()

    def targets(self):
        yield Target(path=Trickle.path, size=11)  # small: it could share a batch with the next
        Trickle.waited = Trickle.judged.wait(10)
        yield Target(path=Trickle.path, size=11)


class Seen(Engine):
    id = "seen"

    def scan(self, subject):
        Trickle.judged.set()
        return []


class Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(HangOnFirst)
        registry.add(Seen)

    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Trickle)


def walk(root):
    return {"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}


def test_a_hang_does_not_hold_the_rest_of_its_batch(tmp_path):
    """One worker: it takes a batch, hangs on its first file; the watchdog gives the rest of the batch
    to the fresh worker, and every file is judged well before the hung call would have returned."""
    for i in range(3 * BATCH):
        (tmp_path / f"f{i:03}").write_bytes(b"plain text\n")
    HangOnFirst.hung.clear()
    result = run({"sources": [walk(tmp_path)], "engines": ["hangonfirst"], "limits": {"workers": 1}},
                 extra_plugins=[Plugin()], report_clean=True)
    assert len(result.records) == 3 * BATCH == result.summary.names
    assert sum(1 for r in result.records if r.errors) == 1 and result.summary.clean == 3 * BATCH - 1
    assert result.summary.abandoned == 0 and result.summary.elapsed < 2.5


def test_a_target_never_waits_for_its_batch_to_fill(tmp_path):
    """A source that yields one target and then waits (a monitor between events): that target is judged
    while the source waits, though its batch holds one target."""
    path = tmp_path / "one"
    path.write_bytes(b"plain text\n")
    Trickle.path = str(path)
    Trickle.judged.clear()
    started = time.monotonic()
    result = run({"sources": ["trickle"], "engines": ["seen"]}, extra_plugins=[Plugin()])
    assert Trickle.waited and time.monotonic() - started < 8
    assert result.summary.files == 2


def test_the_queue_bound_counts_targets(tmp_path):
    """limits.queue bounds the targets queued (each holds an open file), not the batches."""
    for i in range(40):
        (tmp_path / f"f{i:02}").write_bytes(b"plain text\n")
    depths = []

    class Depth(Engine):
        id = "depth"

        def scan(self, subject):
            depths.append(self.session.queue_depth)
            time.sleep(0.01)
            return []

    class DepthPlugin:
        @hookimpl
        def elkscan_register_engines(self, registry):
            registry.add(Depth)

    result = run({"sources": [walk(tmp_path)], "engines": ["depth"], "limits": {"workers": 1, "queue": 4}},
                 extra_plugins=[DepthPlugin()])
    assert result.summary.files == 40 and max(depths) <= 4 and max(depths) > 0


def test_large_files_are_handed_over_alone(tmp_path):
    """A batch holds up to BATCH targets and BATCH_BYTES of files: a large file goes alone (its hand-over
    costs nothing next to its scan), so no worker is left with a pile of large files while the others
    idle at the end; a target of unknown size weighs a whole batch."""
    session = Session(parse_pipeline({"version": 1}), make_plugin_manager([]))
    small, large = BATCH_BYTES // (2 * BATCH), BATCH_BYTES // 2 + 1
    batch = None
    for size in [small] * (BATCH + 1):
        batch = session._hand_over(Target(path="/small", size=size), batch)
    queued = [session._work.get_nowait() for _ in range(session._work.qsize())]
    assert [len(b) for b in queued] == [BATCH, 1]
    batch = None
    for size in (large, large, None, small):
        batch = session._hand_over(Target(path="/large", size=size), batch)
    assert [len(session._work.get_nowait()) for _ in range(session._work.qsize())] == [1, 1, 1, 1]
