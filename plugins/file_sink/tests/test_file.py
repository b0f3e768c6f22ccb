"""The ``file`` sink on real files: JSON lines (or ECS) 0600, rotation by size with gzip and a kept
count, reopening after logrotate's SIGHUP, and refusing a place another user controls."""

import gzip
import json
import os
import signal
import stat
import time

import pytest

from elkscan_core import ComponentError
from elkscan_core.testing import eicar, events, feed, run


def scan(tmp_path, sources, **options):
    return run({"plugins": ["file_sink", "yara_backend"], "sources": sources, "engines": ["yara"],
                "state_dir": str(tmp_path / "state"),
                "sinks": [{"use": "file", "with": {"path": "log/elkscan.jsonl", **options}}]},
               base_dir=str(tmp_path))


def lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def ticks(count, pad=0, before=None):
    return [feed(events(count, pad=pad, before=before))]


def test_records_are_json_lines_in_a_private_file(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "eicar.com").write_bytes(eicar())
    result = scan(tmp_path, [{"use": "dirscan", "with": {"roots": {str(tmp_path / "tree"): -1}}}])
    log = tmp_path / "log" / "elkscan.jsonl"  # relative to the pipeline's directory
    (doc,) = lines(log)
    assert doc["path"] == str(tmp_path / "tree" / "eicar.com") and doc["signature"] == "Multios_TestFile_Eicar"
    assert doc["id"] == result.records[0].id and doc["host"] == result.session.host
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


def test_ecs_to_a_file(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "eicar.com").write_bytes(eicar())
    scan(tmp_path, [{"use": "dirscan", "with": {"roots": {str(tmp_path / "tree"): -1}}}], format="ecs")
    (doc,) = lines(tmp_path / "log" / "elkscan.jsonl")
    assert doc["rule"]["name"] == "Multios_TestFile_Eicar" and doc["file"]["name"] == "eicar.com"


def test_a_detection_found_again_is_written_again_only_after_repeat_after(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "eicar.com").write_bytes(eicar())
    walk = [{"use": "dirscan", "with": {"roots": {str(tmp_path / "tree"): -1}}}]
    scan(tmp_path, walk)
    scan(tmp_path, walk)
    assert len(lines(tmp_path / "log" / "elkscan.jsonl")) == 1
    (tmp_path / "tree" / "eicar2.com").write_bytes(eicar())  # news: written at once
    scan(tmp_path, walk)
    assert [os.path.basename(d["path"]) for d in lines(tmp_path / "log" / "elkscan.jsonl")] == [
        "eicar.com", "eicar2.com"]


def test_rotation_by_size_keeps_gzipped_files_and_loses_no_line_in_between(tmp_path):
    scan(tmp_path, ticks(400, pad=200), max_size="16KiB", keep=3)
    log = tmp_path / "log" / "elkscan.jsonl"
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["elkscan.jsonl", "elkscan.jsonl.1.gz", "elkscan.jsonl.2.gz", "elkscan.jsonl.3.gz"]
    kept = []
    for name in reversed(files[1:]):  # oldest first
        path = log.parent / name
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with gzip.open(path, "rb") as f:
            assert len(f.read()) <= 16 * 1024
        kept += lines(path)
    kept += lines(log)
    numbers = [d["n"] for d in kept]
    assert numbers == list(range(numbers[0], 400)) and numbers[0] > 0  # the newest, in order; the oldest went


def test_no_rotation_with_max_size_zero_and_plain_files_without_compress(tmp_path):
    scan(tmp_path, ticks(100, pad=200), max_size=0)
    assert len(lines(tmp_path / "log" / "elkscan.jsonl")) == 100
    scan(tmp_path, ticks(100, pad=200), max_size="8KiB", keep=1, compress=False)
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == ["elkscan.jsonl", "elkscan.jsonl.1"]


def test_sighup_reopens_the_file_after_logrotate_moved_it(tmp_path):
    log = tmp_path / "log" / "elkscan.jsonl"

    def logrotate(n):
        if n == 150:
            time.sleep(0.5)  # the writer is idle: what came before is written out
            os.rename(log, f"{log}.rotated")
            os.kill(os.getpid(), signal.SIGHUP)  # as logrotate's postrotate does
            time.sleep(0.5)

    previous = signal.getsignal(signal.SIGHUP)
    scan(tmp_path, ticks(300, before=logrotate), max_size=0)
    assert signal.getsignal(signal.SIGHUP) == previous  # put back once no file sink is open
    before, after = lines(f"{log}.rotated"), lines(log)
    assert [d["n"] for d in before] == list(range(150)) and [d["n"] for d in after] == list(range(150, 300))
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


def start_fails(tmp_path, match, **options):
    with pytest.raises(ComponentError, match=match):
        scan(tmp_path, ticks(1), **options)


def test_a_directory_others_can_write_is_refused(tmp_path):
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    start_fails(tmp_path, "world-writable", path=str(tmp_path / "open" / "x.jsonl"))
    assert not (tmp_path / "open" / "x.jsonl").exists()


def test_a_link_or_a_fifo_in_place_of_the_file_is_not_written_through(tmp_path):
    (tmp_path / "log").mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "log" / "elkscan.jsonl").symlink_to(victim)
    start_fails(tmp_path, "cannot open")
    assert victim.read_text() == "precious\n"
    (tmp_path / "log" / "elkscan.jsonl").unlink()
    os.mkfifo(tmp_path / "log" / "elkscan.jsonl", 0o600)
    start_fails(tmp_path, "cannot open|not a regular file")  # at once: never blocks on the FIFO


def test_a_full_disk_costs_the_records_it_refused_and_tears_no_line(tmp_path):
    """RLIMIT_FSIZE stands for a full disk: the kernel writes up to the limit, then refuses."""
    import resource

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def disk_full(n):
        if n == 100:
            time.sleep(0.5)  # the first 100 are written out while the writer is idle
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(tmp_path / "log" / "elkscan.jsonl") + 500,
                                                       limits[1]))
        if n == 200:
            time.sleep(0.5)
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    try:
        result = scan(tmp_path, ticks(300, pad=100, before=disk_full), max_size=0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    numbers = [d["n"] for d in lines(tmp_path / "log" / "elkscan.jsonl")]  # every line whole
    assert numbers[:100] == list(range(100)) and numbers[-1] == 299 and len(numbers) < 300
    assert result.summary.errors >= 1
