"""File events (Elkeid 6012) from real fanotify marks on temporary directories."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

from elkscan_core import FILE_EVENT, FINDING, LOG, Sink, hookimpl
from elkscan_core.testing import SAMPLES


def events_only(directory, **file_events) -> dict:
    return {"file_events": {"profile": "none", "directories": [str(directory)], **file_events},
            "on_access": {"enabled": False}}


def test_a_child_write_gives_a_file_event_naming_the_writer(tmp_path, tools):
    watched = tmp_path / "bin"
    watched.mkdir()
    with tools.monitoring(events_only(watched)) as monitor:
        with tools.write_file(watched / "dropper", b"payload\n") as writer:
            [record] = monitor.wait_for(lambda: monitor.kinds(FILE_EVENT))
    facts = record.facts
    assert facts["file_path"] == str(watched / "dropper")
    assert facts["file_mask"] == "8"  # FAN_CLOSE_WRITE
    assert facts["pid"] == writer.pid
    assert facts["exe"] == writer.exe
    assert facts["comm"] == "sh"
    assert facts["file_hash"] == hashlib.sha256(b"payload\n").hexdigest()
    assert facts["exe_size"] > 0 and facts["modify_at"] > 0
    assert "docker_id" in facts


def test_only_direct_children_are_reported_as_in_elkeid(tmp_path, tools):
    watched = tmp_path / "bin"
    (watched / "sub").mkdir(parents=True)
    with tools.monitoring(events_only(watched)) as monitor:
        with tools.write_file(watched / "sub" / "deep", b"x"):
            pass
        with tools.write_file(watched / "top", b"x"):
            monitor.wait_for(lambda: monitor.kinds(FILE_EVENT))
    assert [r.facts["file_path"] for r in monitor.kinds(FILE_EVENT)] == [str(watched / "top")]


def test_editor_and_package_manager_temp_names_are_skipped(tmp_path, tools):
    watched = tmp_path / "bin"
    watched.mkdir()
    with tools.monitoring(events_only(watched)) as monitor:
        for name in (".tool.swp", "tool.dpkg-new", "notes.tmp"):
            tools.write_file(watched / name, b"x").finish()
        with tools.write_file(watched / "tool", b"x"):
            monitor.wait_for(lambda: monitor.kinds(FILE_EVENT))
    assert [r.facts["file_path"] for r in monitor.kinds(FILE_EVENT)] == [str(watched / "tool")]
    assert monitor.source.stats["skipped"] == 3


def test_whitelisted_writers_by_exe_and_by_argv_are_not_reported(tmp_path, tools):
    watched = tmp_path / "bin"
    watched.mkdir()
    by_argv = 'echo a > "$1"'
    python = os.path.realpath(sys.executable)
    options = events_only(watched, exe_whitelist=[python],
                          argv_whitelist=[f"sh -c echo $$\n{by_argv}\necho done\nread _ sh {watched / 'a'}"])
    with tools.monitoring(options) as monitor:
        by_exe = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('b'); "
                                   "print('done', flush=True); input()", str(watched / "b")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert by_exe.stdout.readline() == b"done\n"
        with tools.Writer(by_argv, str(watched / "a")):
            # both stay alive until their events were judged (a writer that is gone cannot be)
            monitor.wait_for(lambda: monitor.source.stats["whitelisted"] == 2)
        by_exe.communicate(b"\n")
        with tools.write_file(watched / "c", b"x"):
            monitor.wait_for(lambda: monitor.kinds(FILE_EVENT))
    assert [r.facts["file_path"] for r in monitor.kinds(FILE_EVENT)] == [str(watched / "c")]
    assert monitor.source.stats["whitelisted"] == 2


def test_the_rate_limit_drops_and_reports_what_it_dropped(tmp_path, tools):
    watched = tmp_path / "bin"
    watched.mkdir()
    with tools.monitoring(events_only(watched, rate_limit=3, rate_window="1h")) as monitor:
        with tools.Writer('for i in 0 1 2 3 4 5 6 7 8 9; do echo $i > "$1/f$i"; done', str(watched)):
            stats = monitor.source.stats
            monitor.wait_for(lambda: stats["file_events"] + stats["rate_limited"] == 10)
    assert len(monitor.kinds(FILE_EVENT)) == 3
    assert monitor.source.stats["rate_limited"] == 7
    [report] = monitor.kinds(LOG)
    assert report.facts["level"] == "WARN"
    assert "7 file event(s) were dropped by the rate limit of 3 per 3600s" in report.facts["msg"]


class _Gate(Sink):
    """A sink that blocks until opened: the source stalls behind it, as behind a slow agent pipe."""

    id = "gate"
    opened = None

    def write(self, record) -> None:
        type(self).opened.wait(120)


class _GatePlugin:
    @hookimpl
    def elkscan_register_sinks(self, registry) -> None:
        registry.add(_Gate)


def test_a_burst_that_overflows_the_kernel_queue_is_counted_and_reported(tmp_path, tools):
    watched = tmp_path / "burst"
    watched.mkdir()
    count = 20000  # more than the kernel queue (16384) plus a sink's queue (1024)
    _Gate.opened = threading.Event()
    with tools.monitoring(events_only(watched, rate_limit=0), sinks=("gate",),
                    extra_plugins=(_GatePlugin(),)) as monitor:
        subprocess.run([sys.executable, "-c",
                        "import sys\nfor i in range(int(sys.argv[2])):\n"
                        "    open(f'{sys.argv[1]}/f{i}', 'w').close()",
                        str(watched), str(count)], check=True)
        _Gate.opened.set()
        stats = monitor.source.stats
        monitor.wait_for(lambda: stats["overflows"] >= 1, timeout=60)
        monitor.wait_for(lambda: len(monitor.kinds(FILE_EVENT)) == stats["file_events"], timeout=60)
    assert stats["file_events"] < count
    [report] = [r for r in monitor.kinds(LOG) if "overflowed" in r.facts["msg"]]
    assert "events were lost" in report.facts["msg"]


def test_file_monitor_off_and_on_from_another_thread(tmp_path, tools):
    watched = tmp_path / "bin"
    watched.mkdir()
    with tools.monitoring(events_only(watched)) as monitor:
        switch = threading.Thread(target=monitor.source.file_monitor, args=(False,))
        switch.start()
        switch.join()
        with tools.write_file(watched / "unseen", b"x"):
            pass
        monitor.source.file_monitor(True)
        with tools.write_file(watched / "seen", b"x"):
            monitor.wait_for(lambda: monitor.kinds(FILE_EVENT))
    assert [r.facts["file_path"] for r in monitor.kinds(FILE_EVENT)] == [str(watched / "seen")]


def test_a_directory_that_appears_later_is_marked_at_the_next_refresh(tmp_path, tools):
    later = tmp_path / "later"
    with tools.monitoring({**events_only(later), "refresh": "100ms"}) as monitor:
        later.mkdir()
        monitor.wait_for(lambda: str(later) in monitor.source._event_dirs)
        with tools.write_file(later / "new", b"x"):
            [record] = monitor.wait_for(lambda: monitor.kinds(FILE_EVENT))
    assert record.facts["file_path"] == str(later / "new")


def test_with_no_options_elkeids_directories_and_the_download_directories_are_watched(tmp_path, tools):
    with tools.monitoring({}, **tools.engine_setup()) as monitor:
        assert {os.path.realpath(d) for d in ("/usr/bin", "/usr/sbin")} <= monitor.source._event_dirs
        if not str(tmp_path).startswith("/tmp/"):
            return
        with tools.write_file(tmp_path / "download.bin", SAMPLES["eicar.com"][0]) as writer:
            record = monitor.wait_for(lambda: [r for r in monitor.kinds(FINDING)
                                               if r.target.path == str(tmp_path / "download.bin")])[0]
    assert record.target.pid == writer.pid
    assert not monitor.source.ransom_on


def test_the_same_directories_inside_a_container_root_filesystem_are_watched(tmp_path, tools):
    import pytest

    image = tmp_path / "image"
    (image / "opt" / "tools").mkdir(parents=True)
    rootfs = tmp_path / "overlay2" / "abc123" / "merged"  # where Docker mounts a container's root
    rootfs.mkdir(parents=True)
    options = {"file_events": {"profile": "none", "directories": ["/opt/tools"]},
               "on_access": {"enabled": False}, "refresh": "1h"}
    with tools.monitoring(options) as monitor:
        # the container starts after the scanner: its mount is noticed at once, not at the next refresh
        if subprocess.run(["mount", "--bind", str(image), str(rootfs)]).returncode != 0:
            pytest.skip("cannot bind-mount here")
        try:
            monitor.wait_for(lambda: str(rootfs / "opt" / "tools") in monitor.source._event_dirs)
            with tools.write_file(rootfs / "opt" / "tools" / "implant", b"x") as writer:
                [record] = monitor.wait_for(lambda: monitor.kinds(FILE_EVENT))
        finally:
            subprocess.run(["umount", str(rootfs)], check=True)
    assert record.facts["file_path"] == str(rootfs / "opt" / "tools" / "implant")
    assert record.facts["pid"] == writer.pid
