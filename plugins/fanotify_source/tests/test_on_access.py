"""On-access scanning: written web scripts and downloads go to a real engine by their open fd."""

from __future__ import annotations

from elkscan_core import FINDING
from elkscan_core.testing import SAMPLES, eicar


def on_access_only(web_root, downloads, **on_access) -> dict:
    return {"file_events": {"enabled": False},
            "on_access": {"web_roots": [str(web_root)], "downloads": [str(downloads)], **on_access}}


def findings(monitor) -> dict:
    return {r.target.path: r for r in monitor.kinds(FINDING)}


def test_a_web_shell_written_under_a_web_root_is_detected_with_its_writer(tmp_path, tools):
    www, downloads = tmp_path / "www", tmp_path / "downloads"
    (www / "uploads").mkdir(parents=True)
    downloads.mkdir()
    shell = www / "uploads" / "shell.php"
    setup = tools.engine_setup()
    with tools.monitoring(on_access_only(www, downloads), **setup) as monitor:
        with tools.write_file(www / "uploads" / "contact.php", SAMPLES["webshell-lookalike.php"][0]):
            pass
        with tools.write_file(shell, SAMPLES["webshell.php"][0]) as writer:
            record = monitor.wait_for(lambda: findings(monitor).get(str(shell)))
    assert record.target.pid == writer.pid
    assert record.target.origin == "fanotify"
    assert record.facts["file_path"] == str(shell)
    assert record.facts["comm"] == "sh" and record.facts["pid"] == writer.pid
    assert [d.class_ for d in record.detections] == ["Webshell"]
    assert list(findings(monitor)) == [str(shell)]  # the harmless look-alike was scanned, not reported
    assert monitor.source.stats["scans"] == 2


def test_a_script_moved_into_the_web_root_is_scanned(tmp_path, tools):
    www, downloads, staging = tmp_path / "www", tmp_path / "downloads", tmp_path / "php-upload"
    for directory in (www, downloads, staging):
        directory.mkdir()
    (staging / "phpA1b2").write_bytes(SAMPLES["webshell.php"][0])  # as PHP stores an upload
    with tools.monitoring(on_access_only(www, downloads), **tools.engine_setup()) as monitor:
        with tools.Writer('mv "$1" "$2"', str(staging / "phpA1b2"), str(www / "avatar.php")):
            record = monitor.wait_for(lambda: findings(monitor).get(str(www / "avatar.php")))
    assert record.facts["file_mask"] == str(0x80)  # FAN_MOVED_TO


def test_any_file_in_a_download_directory_is_scanned_but_only_scripts_in_web_roots(tmp_path, tools):
    www, downloads = tmp_path / "www", tmp_path / "downloads"
    (downloads / "nested").mkdir(parents=True)
    www.mkdir()
    with tools.monitoring(on_access_only(www, downloads), **tools.engine_setup()) as monitor:
        with tools.write_file(www / "readme.txt", SAMPLES["webshell.php"][0]):
            pass
        with tools.write_file(downloads / "nested" / "invoice.pdf", eicar()):
            monitor.wait_for(lambda: findings(monitor).get(str(downloads / "nested" / "invoice.pdf")))
    assert list(findings(monitor)) == [str(downloads / "nested" / "invoice.pdf")]
    assert monitor.source.stats["scans"] == 1  # readme.txt is not a web script: never read


def test_repeated_writes_to_one_file_are_scanned_once(tmp_path, tools):
    www, downloads = tmp_path / "www", tmp_path / "downloads"
    www.mkdir()
    downloads.mkdir()
    target = www / "cache.php"
    # Ten writers (the kernel merges repeated events of one process itself), then the main shell.
    script = ('for i in 1 2 3 4 5 6 7 8 9 10; do sh -c \'echo "<?php // $2" >> "$1"\' sh "$1" $i; done\n'
              'printf %s "$2" >> "$1"')
    with tools.monitoring(on_access_only(www, downloads, settle="1s"), **tools.engine_setup()) as monitor:
        with tools.Writer(script, str(target), SAMPLES["webshell.php"][0].decode()) as writer:
            record = monitor.wait_for(lambda: findings(monitor).get(str(target)))
    assert monitor.source.stats["scans"] == 1
    assert monitor.source.stats["coalesced"] >= 1
    assert record.target.pid == writer.pid  # the last writer


def test_with_mount_marks_instead_of_filesystem_marks_a_web_shell_is_still_detected(tmp_path, tools):
    www, downloads = tmp_path / "www", tmp_path / "downloads"
    www.mkdir()
    downloads.mkdir()
    options = on_access_only(www, downloads, filesystem_marks=False)
    with tools.monitoring(options, **tools.engine_setup()) as monitor:
        assert monitor.source.tree is None
        with tools.write_file(www / "up.phtml", SAMPLES["webshell.php"][0]) as writer:
            record = monitor.wait_for(lambda: findings(monitor).get(str(www / "up.phtml")))
    assert record.target.pid == writer.pid and record.facts["file_mask"] == "8"


def test_files_written_by_the_scanners_own_children_are_not_scanned(tmp_path, tools):
    import subprocess

    www, downloads = tmp_path / "www", tmp_path / "downloads"
    www.mkdir()
    downloads.mkdir()
    with tools.monitoring(on_access_only(www, downloads), **tools.engine_setup()) as monitor:
        # a child of the scanning process itself (as a managed clamd is) writes a temporary file
        child = subprocess.Popen(["sh", "-c", 'printf x > "$1"; read _', "sh", str(downloads / "clamd-tmp")],
                                 stdin=subprocess.PIPE)
        monitor.wait_for(lambda: monitor.source.stats["own"] == 1)
        child.communicate(b"\n")
        with tools.write_file(downloads / "other", b"y"):
            monitor.wait_for(lambda: monitor.source.stats["scans"] == 1)
    assert monitor.source.stats["own"] == 1 and monitor.source.stats["scans"] == 1
