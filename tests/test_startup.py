"""Start-up imports only what the command uses (docs/performance.md#start-up-and-shut-down): each test
runs a fresh interpreter and reads its ``sys.modules``. No timing: what is imported is what costs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _modules_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _tops(modules: set[str]) -> set[str]:
    return {name.partition(".")[0] for name in modules}


def test_importing_the_package_imports_no_module_of_its_api():
    modules = _modules_after("import elkscan_core")
    assert not _tops(modules) & {"attrs", "attr", "cattrs", "yaml", "pluggy", "hashlib"}
    assert {name for name in modules if name.startswith("elkscan_core.")} == {"elkscan_core.version"}


def test_the_api_is_there_when_used():
    modules = _modules_after("from elkscan_core import Engine, Size, __version__")
    assert {"elkscan_core.components", "elkscan_core.units"} <= modules
    assert "elkscan_core.runner" not in modules


def test_a_scan_imports_the_plugins_it_allows_and_nothing_it_does_not_use(tmp_path):
    (tmp_path / "empty").mkdir()
    pipeline = {"version": 1, "plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
                "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path / "empty"): -1}}}],
                "engines": [{"use": "yara"}]}
    (tmp_path / "p.yaml").write_text(json.dumps(pipeline))
    modules = _modules_after(f"""
        from elkscan_core import build_session, load_pipeline, make_plugin_manager
        pipeline = load_pipeline({str(tmp_path / "p.yaml")!r})
        summary = build_session(pipeline, make_plugin_manager(pipeline.plugins)).run()
        assert summary.errors == 0, summary
    """)
    plugins = {name for name in _tops(modules) if name.startswith("elkscan_") and name != "elkscan_core"}
    assert plugins == {"elkscan_yara_backend"}
    # metrics, the verdict cache, plugin discovery through importlib.metadata, OpenSSL's hashes: not here
    assert not modules & {"elkscan_core.metrics", "elkscan_core.cache", "importlib.metadata", "hashlib"}
    # worker processes for an engine on threads, cgroups unconfined, socket for the host name
    assert not modules & {"elkscan_core.processes", "elkscan_core.cgroup", "socket"}


def test_elkscan_help_imports_no_plugin():
    modules = _modules_after("""
        from elkscan_core import cli
        try:
            cli.main(["--help"])
        except SystemExit:
            pass
    """)
    assert {name for name in _tops(modules) if name.startswith("elkscan_")} == {"elkscan_core"}
    assert not modules & {"tempfile", "random"}  # elkscan demo's, imported there


def _ended_by(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)


def test_quick_exit_does_what_the_interpreters_exit_would_before_it_ends(tmp_path):
    """Non-daemon threads finish, atexit callbacks run, open files and the standard streams are flushed,
    the status is the one given: only the teardown is skipped (docs/performance.md)."""
    done = _ended_by(f"""
        import atexit, sys, threading, time
        from elkscan_core.quick_exit import quick_exit

        left_open = open({str(tmp_path / "left-open")!r}, "w")
        left_open.write("buffered, never flushed nor closed")
        atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").write("ran"))

        def late():
            time.sleep(0.5)
            open({str(tmp_path / "thread")!r}, "w").write("finished")

        threading.Thread(target=late).start()
        sys.stdout.write("x" * 1_000_000)  # more than a pipe holds: written while the parent reads
        sys.stderr.write("last words")
        quick_exit(3)
    """, tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stdout == b"x" * 1_000_000 and done.stderr == b"last words"
    assert (tmp_path / "left-open").read_text() == "buffered, never flushed nor closed"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "finished"


def test_quick_exit_leaves_as_the_interpreter_does_when_stdout_cannot_take_its_bytes(tmp_path):
    code = """
        import io, sys
        from elkscan_core.quick_exit import quick_exit

        class Full(io.RawIOBase):
            def writable(self):
                return True

            def write(self, data):
                raise OSError(28, "No space left on device")

        sys.stdout = io.TextIOWrapper(io.BufferedWriter(Full()))
        sys.stdout.write("y" * 100)  # held in the buffer until the flush, which fails
        {}
    """
    ours = _ended_by(code.format("quick_exit(0)"), tmp_path)
    plain = _ended_by(code.format("sys.exit(0)"), tmp_path)
    assert ours.returncode == plain.returncode == 120
    assert b"No space left on device" in ours.stderr


def test_the_elkscan_command_ends_by_quick_exit_with_its_exit_code_and_every_record(tmp_path):
    (tmp_path / "files").mkdir()
    for i in range(300):
        (tmp_path / "files" / f"f{i}").write_text(f"file {i}\n")
    pipeline = {"version": 1, "plugins": ["yara_backend", "stdout_sink"], "state_dir": str(tmp_path / "state"),
                "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path / "files"): -1}}}],
                "engines": [{"use": "yara"}], "sinks": [{"use": "stdout", "with": {"format": "jsonl"}}]}
    (tmp_path / "p.yaml").write_text(json.dumps(pipeline))
    done = subprocess.run([sys.executable, "-c", "import sys; from elkscan_core import cli, quick_exit\n"
                           "quick_exit.os._exit = lambda code: sys.exit(f'os._exit({code})')\ncli.entry()",
                           "scan", "-a", "-p", str(tmp_path / "p.yaml")], capture_output=True, text=True, timeout=120)
    assert done.stderr.rstrip().endswith("os._exit(0)"), done.stderr  # it did end by quick_exit
    assert len(done.stdout.splitlines()) == 300
