"""The command-line conventions users of clamscan, yara and find reach for (ux audit D), through the real
``elkscan`` command on real files: exclusions, depth, link policy, file lists, rules on the command line,
ignored signatures, -v/-q/--log on either side of the subcommand, and a subcommand's own usage."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from elkscan_core.testing import eicar

ELKSCAN = [sys.executable, "-m", "elkscan_core.cli"]
EICAR = "Multios_TestFile_Eicar"
CLAMD = shutil.which("clamd") or os.path.exists("/usr/sbin/clamd")


def elkscan(*args, stdin=None, **kwargs):
    return subprocess.run([*ELKSCAN, *map(str, args)], input=stdin, capture_output=True, timeout=120, **kwargs)


def pipeline(tmp_path, name="yara.json", **extra):
    """A YARA-only pipeline (JSON is YAML) with its own state directory and no verdict cache."""
    path = tmp_path / name
    path.write_text(json.dumps({"version": 1, "plugins": ["yara_backend", "stdout_sink"],
                                "state_dir": str(tmp_path / "state"), "engines": [{"use": "yara"}],
                                "sinks": [{"use": "stdout", "with": {"format": "jsonl"}}], **extra}))
    return path


def scan(tmp_path, *args, stdin=None, name="yara.json"):
    """``elkscan scan -p <yara pipeline>``: (exit code, {path: [signatures]} or reason, stderr)."""
    out = elkscan("scan", "-p", tmp_path / name, *args, stdin=stdin)
    results = {}
    for line in out.stdout.decode().splitlines():
        record = json.loads(line)
        path = record.get("path_bytes", record["path"])
        results[path] = ([d["signature"] for d in record.get("detections", [])] if record["status"] == "detected"
                         else record["status"] if record["status"] != "not_scanned" else record["reason"])
    return out.returncode, results, out.stderr.decode()


@pytest.fixture
def tree(tmp_path):
    """tree/eicar.com, tree/a/eicar.com, tree/a/b/eicar.com, tree/clean.txt; and the pipeline."""
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    for directory in (root, root / "a", root / "a" / "b"):
        (directory / "eicar.com").write_bytes(eicar())
    (root / "clean.txt").write_text("nothing to see\n")
    pipeline(tmp_path)
    return root


def test_exclude_skips_paths_by_request_counted_and_never_an_error(tmp_path, tree):
    code, results, err = scan(tmp_path, tree, "--exclude", tree / "a", "--all")
    assert code == 1, err
    assert results == {str(tree / "eicar.com"): [EICAR], str(tree / "clean.txt"): "clean",
                       str(tree / "a"): "excluded"}  # one record for the directory, none for its files
    assert "1 not scanned (1 excluded)" in err
    # Everything infected excluded, even a file named on the command line: asked for, so exit code 0.
    code, results, err = scan(tmp_path, tree / "eicar.com", tree / "a", "--exclude", tree / "a",
                              "--exclude", tree / "eicar.com")
    assert code == 0 and results == {}, err
    assert "2 not scanned (2 excluded)" in err


def test_relative_exclude_is_taken_from_the_working_directory(tmp_path, tree):
    out = elkscan("scan", "-p", tmp_path / "yara.json", ".", "--exclude", "a", cwd=tree)
    assert out.returncode == 1 and [json.loads(line)["path"] for line in out.stdout.splitlines()] == [
        str(tree / "eicar.com")], out.stderr


def test_pipeline_exclude_is_honoured_for_named_paths(tmp_path, tree):
    """Audit D: ``scan -p excl.yaml work/sample`` still reported the excluded eicar.com."""
    pipeline(tmp_path, "excl.json", sources=[{"use": "dirscan", "with": {"exclude": [str(tree / "a")]}}])
    code, results, err = scan(tmp_path, tree, name="excl.json")
    assert code == 1 and set(results) == {str(tree / "eicar.com")}, err
    assert "(1 excluded)" in err


def test_walk_options_steer_the_pipeline_sources_when_no_path_is_named(tmp_path, tree):
    pipeline(tmp_path, "walk.json", sources=[{"use": "dirscan", "with": {"roots": {str(tree): 5},
                                                                         "type_filter": False}}])
    code, results, err = scan(tmp_path, "--exclude", tree / "a" / "b", name="walk.json")
    assert code == 1 and set(results) == {str(tree / "eicar.com"), str(tree / "a" / "eicar.com")}, err
    code, results, err = scan(tmp_path, "--depth", "1", name="walk.json")
    assert set(results) == {str(tree / "eicar.com")}, err
    pipeline(tmp_path, "procs.json", sources=[{"use": "procscan"}])  # no walk to steer: refused, not ignored
    out = elkscan("scan", "-p", tmp_path / "procs.json", "--depth", "1")
    assert out.returncode == 2 and b"no dirscan source" in out.stderr


def test_depth_limits_how_far_named_directories_are_walked(tmp_path, tree):
    assert set(scan(tmp_path, tree, "--depth", "1")[1]) == {str(tree / "eicar.com")}
    assert set(scan(tmp_path, tree, "--depth", "2")[1]) == {str(tree / "eicar.com"), str(tree / "a" / "eicar.com")}
    assert len(scan(tmp_path, tree)[1]) == 3  # no limit by default
    code, results, _ = scan(tmp_path, tree / "eicar.com", "--depth", "0")  # a named file is still judged
    assert code == 1 and set(results) == {str(tree / "eicar.com")}
    out = elkscan("scan", "--depth", "-1", tree)
    assert out.returncode == 2 and b"0 or more" in out.stderr


def test_follow_symlinks_sets_the_link_policy_of_the_walk(tmp_path, tree):
    outside = tmp_path / "outside.com"
    outside.write_bytes(eicar())
    walked = tmp_path / "walked"
    walked.mkdir()
    os.symlink(outside, walked / "out.com")  # leaves the scanned paths
    os.symlink(tree / "a", walked / "into")  # a directory elsewhere
    (walked / "own.com").write_bytes(eicar())
    os.symlink("own.com", walked / "alias.com")  # stays inside
    assert set(scan(tmp_path, walked)[1]) == {str(walked / "own.com"), str(walked / "alias.com")}
    assert set(scan(tmp_path, walked, "--follow-symlinks", "never")[1]) == {str(walked / "own.com")}
    assert set(scan(tmp_path, walked, "--follow-symlinks", "always")[1]) == {
        str(walked / "own.com"), str(walked / "alias.com"), str(walked / "out.com"),
        str(walked / "into" / "eicar.com"), str(walked / "into" / "b" / "eicar.com")}
    # a link named on the command line is followed whatever the policy, as clamscan does
    assert set(scan(tmp_path, walked / "out.com", "--follow-symlinks", "never")[1]) == {str(walked / "out.com")}
    out = elkscan("scan", walked, "--follow-symlinks", "sometimes")
    assert out.returncode == 2 and b"invalid choice" in out.stderr


def test_paths_from_a_file_list_and_from_stdin(tmp_path, tree):
    odd = tree / os.fsdecode(b"bad\xff\nname.com")  # not UTF-8, and a newline: only a NUL list can name it
    odd.write_bytes(eicar())
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"%s\n\n%s\n" % (os.fsencode(tree / "eicar.com"), os.fsencode(tree / "clean.txt")))
    code, results, err = scan(tmp_path, "--file-list", listing, "--all")
    assert code == 1 and results == {str(tree / "eicar.com"): [EICAR], str(tree / "clean.txt"): "clean"}, err

    nul_list = b"\0".join([os.fsencode(odd), os.fsencode(tree / "a")]) + b"\0"
    code, results, err = scan(tmp_path, "-0", "-", stdin=nul_list)
    assert code == 1, err
    assert set(results) == {"%s/bad\\xff\nname.com" % tree, str(tree / "a" / "eicar.com"),
                            str(tree / "a" / "b" / "eicar.com")}

    # listed paths are named paths: one that does not exist is an error, the rest is scanned
    code, results, err = scan(tmp_path, "-", stdin=b"%s\n%s/nope\n" % (os.fsencode(tree / "clean.txt"), os.fsencode(tree)))
    assert code == 2 and "nope: no such file or directory" in err and results == {}


def test_an_empty_file_list_scans_nothing_rather_than_the_pipeline_sources(tmp_path, tree):
    pipeline(tmp_path, "walk.json", sources=[{"use": "dirscan", "with": {"roots": {str(tree): -1}}}])
    code, results, err = scan(tmp_path, "-", stdin=b"", name="walk.json")
    assert code == 0 and results == {} and "scanned 0 files" in err


def test_a_file_list_another_user_can_change_is_refused(tmp_path, tree):
    listing = tmp_path / "list.txt"
    listing.write_bytes(os.fsencode(tree / "clean.txt") + b"\n")
    listing.chmod(0o666)  # anyone could take a file off the list: it would silently go unscanned
    out = elkscan("scan", "-p", tmp_path / "yara.json", "--file-list", listing)
    assert out.returncode == 2 and b"file list" in out.stderr and b"world-writable" in out.stderr
    assert out.stdout == b""


MARKER_RULE = 'rule Cli_Marker { strings: $m = "elkscan-cli-marker" condition: $m }\n'


def test_rules_on_the_command_line_add_to_the_yara_engine(tmp_path, tree):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "marker.yar").write_text(MARKER_RULE)
    (tree / "marked.txt").write_text("... elkscan-cli-marker ...\n")
    code, results, err = scan(tmp_path, tree / "marked.txt", tree / "eicar.com", "-r", rules)
    assert code == 1, err  # added to the pipeline's rules: the builtin ones still judge
    assert results == {str(tree / "marked.txt"): ["Cli_Marker"], str(tree / "eicar.com"): [EICAR]}
    # a pipeline without a yara engine (nor its plugin) gets one with only these rules
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"version": 1, "plugins": ["stdout_sink"], "state_dir": str(tmp_path / "state"),
                                "sinks": [{"use": "stdout", "with": {"format": "jsonl"}}]}))
    code, results, err = scan(tmp_path, tree / "marked.txt", tree / "eicar.com", "--rules",
                              rules / "marker.yar", name="bare.json")
    assert code == 1 and results == {str(tree / "marked.txt"): ["Cli_Marker"]}, err


def test_rules_on_the_command_line_are_trust_checked_and_never_dropped(tmp_path, tree):
    rules = tmp_path / "theirs.yar"
    rules.write_text(MARKER_RULE)
    rules.chmod(0o666)
    out = elkscan("scan", "-p", tmp_path / "yara.json", "-r", rules, tree)
    assert out.returncode == 2 and b"rule file" in out.stderr and b"world-writable" in out.stderr
    # an optional yara engine given rules on the command line must run them, not be left out
    optional = pipeline(tmp_path, "optional.json", engines=[{"use": "yara", "optional": True}])
    rules.chmod(0o644)
    (tmp_path / "broken.yar").write_text("rule Broken { condition: nonsense }\n")
    out = elkscan("scan", "-p", optional, "-r", tmp_path / "broken.yar", tree)
    assert out.returncode == 2 and b"does not compile" in out.stderr and out.stdout == b""


def test_ignored_signatures_are_dropped_and_counted(tmp_path, tree):
    (tree / "marked.txt").write_text("elkscan-cli-marker\n")
    (tmp_path / "marker.yar").write_text(MARKER_RULE)
    pipeline(tmp_path, "ignore.json", ignore_signatures=[EICAR])
    code, results, err = scan(tmp_path, tree / "eicar.com", "--all", name="ignore.json")
    assert code == 0 and results == {str(tree / "eicar.com"): "clean"}, err
    assert "0 detection(s) in 0 file(s)" in err and "1 detection(s) ignored" in err
    code, results, err = scan(tmp_path, tree, "-r", tmp_path / "marker.yar", "--exclude-signature", "Cli_*",
                              "-v", name="ignore.json")
    assert code == 0 and results == {}, err
    assert "4 detection(s) ignored" in err and f"{tree / 'marked.txt'}: yara detection Cli_Marker ignored" in err
    code, results, _ = scan(tmp_path, tree / "eicar.com", "--exclude-signature", "Multios")  # whole names only
    assert code == 1 and results == {str(tree / "eicar.com"): [EICAR]}
    bad = pipeline(tmp_path, "bad.json", ignore_signatures="Multios_TestFile_Eicar")
    out = elkscan("validate", bad)
    assert out.returncode == 2 and b"ignore_signatures: expected a list of signature names" in out.stderr


def test_verbose_says_which_engines_and_rule_sets_are_in_use(tmp_path, tree):
    out = elkscan("scan", tree / "eicar.com", "-v", "-f", "jsonl", "--no-cache",
                  env={**os.environ, "ELKSCAN_STATE_DIR": str(tmp_path / "state")})
    err = out.stderr.decode()
    assert out.returncode == 1, err
    assert "INFO: pipeline " in err and "INFO: source dirscan: " in err
    yara = next(line for line in err.splitlines() if "INFO: engine yara: " in line)
    assert " rules from " in yara and "(builtin), digest " in yara
    if CLAMD:  # the default pipeline's optional clamav engine: which clamd, which database
        assert "INFO: engine clamav: managed clamd at " in err and "ClamAV " in err
    assert "INFO: engine" not in elkscan("scan", tree / "eicar.com", "-f", "jsonl").stderr.decode()


def test_verbose_and_quiet_go_before_or_after_the_subcommand(tmp_path, tree):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nplugins: [yara_backend]\nengines:\n  - use: yara\n    with: {timeout: soon}\n")
    assert b"Traceback" in elkscan("validate", bad, "-vv").stderr
    assert b"Traceback" in elkscan("-v", "validate", bad, "-v").stderr  # counted together
    assert b"Traceback" not in elkscan("validate", bad, "-v").stderr
    yara, sample = tmp_path / "yara.json", tree / "eicar.com"
    for out in (elkscan("-q", "scan", "-p", yara, sample), elkscan("scan", "-p", yara, sample, "-q")):
        assert out.returncode == 1 and out.stderr == b"" and EICAR.encode() in out.stdout


def test_log_file_gets_the_logs_and_the_summary_instead_of_stderr(tmp_path, tree):
    noisy = pipeline(tmp_path, "noisy.json", plugins=["yara_backend", "clamav_backend", "stdout_sink"],
                     engines=[{"use": "yara"},  # an optional engine that cannot start: a warning
                              {"use": "clamav", "optional": True, "with": {"socket": str(tmp_path / "none.sock")}}])
    log = tmp_path / "logs" / "scan.log"
    log.parent.mkdir(mode=0o755)
    out = elkscan("scan", "-p", noisy, tree / "eicar.com", "--log", log)
    assert out.returncode == 1
    assert b"WARNING" not in out.stderr and b"elkscan: scanned 1 files" in out.stderr
    text = log.read_text()
    assert "elkscan: WARNING: engine 'clamav' is not available" in text and "elkscan: scanned 1 files" in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    out = elkscan("--log", log, "scan", "-p", noisy, tree / "nope", "-q")  # before the subcommand; appended
    assert out.returncode == 2 and b"nope" not in out.stderr and out.stderr == b""
    assert text in log.read_text() and "nope: no such file or directory" in log.read_text()


def test_log_file_in_a_directory_others_can_write_is_refused(tmp_path, tree):
    shared = tmp_path / "shared"
    shared.mkdir()
    for mode in (0o777, 0o1777, 0o775):
        shared.chmod(mode)
        out = elkscan("scan", "-p", tmp_path / "yara.json", tree / "clean.txt", "--log", shared / "scan.log")
        assert out.returncode == 2 and b"writable by other users" in out.stderr, mode
        assert out.stderr.count(b"\n") == 1 and out.stdout == b"" and not (shared / "scan.log").exists()
    shared.chmod(0o755)
    (shared / "victim").write_text("keep\n")
    os.symlink("victim", shared / "scan.log")  # a link in the log's place is never followed
    out = elkscan("scan", "-p", tmp_path / "yara.json", tree / "clean.txt", "--log", shared / "scan.log")
    assert out.returncode == 2 and (shared / "victim").read_text() == "keep\n"


def test_unknown_arguments_print_the_subcommand_usage(tmp_path):
    out = elkscan("scan", tmp_path, "--bogus")
    err = out.stderr.decode()
    assert out.returncode == 2 and err.startswith("usage: elkscan scan ")
    assert err.splitlines()[-1] == "elkscan scan: error: unrecognized arguments: --bogus"
    out = elkscan("validate", "x.yaml", "--strict")
    assert out.stderr.decode().startswith("usage: elkscan validate ")


def test_help_is_readable(tmp_path):
    for args in (["--help"], ["scan", "--help"]):
        out = elkscan(*args, env={**os.environ, "COLUMNS": "80"})
        text = out.stdout.decode()
        assert out.returncode == 0 and out.stderr == b""
        assert max(len(line) for line in text.splitlines()) <= 80, text
    assert all(group in text for group in ("what to scan:", "how to judge:", "output:"))
    assert "--file-list" in text and "--exclude-signature" in text and "--follow-symlinks" in text


def test_long_names_are_shortened_on_a_terminal(tmp_path, tree):
    """On an 80-column terminal the table's rows fit: a long path is cut in the middle with ``...``, its
    file name kept; the progress line and the summary stay on lines of their own."""
    import fcntl
    import pty
    import struct
    import termios

    deep = tree / ("long-directory-name-" * 6) / "nested"
    deep.mkdir(parents=True)
    (deep / "infected-file.com").write_bytes(eicar())
    table = pipeline(tmp_path, "table.json", sinks=[{"use": "stdout"}])  # format: auto
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([*ELKSCAN, "scan", "-p", table, deep], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    raw = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the scan closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 1
    lines = [line.rsplit("\r", 1)[-1] for line in raw.decode().replace("\x1b[K", "").split("\r\n") if line.strip()]
    row = next(line for line in lines if line.startswith("detected"))
    assert "..." in row and row.endswith("/infected-file.com") and len(row) <= 80, lines
    assert lines[0].split() == ["RESULT", "SIGNATURE", "ENGINE", "PATH"] and lines[-1].startswith("elkscan: scanned")
