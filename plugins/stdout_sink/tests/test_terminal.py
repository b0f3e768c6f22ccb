"""On a terminal, the progress line (stderr) never runs into the table or a log line (ux audit D).

The scan runs in a real pseudo-terminal shared by stdout and stderr, as in an interactive shell, and the
test replays what the terminal would show.
"""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from elkscan_core.testing import eicar

PROGRESS = re.compile(r"^[\d,]+ files · .* errors?$")


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``: carriage return, erase-to-end-of-line, newline."""
    lines, line, col, i = [], [], 0, 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        char = raw[i]
        if char == "\r":
            col = 0
        elif char == "\n":
            lines.append("".join(line))
            line, col = [], 0
        else:
            line[col:col + 1] = [char]
            col += 1
        i += 1
    return [*lines, "".join(line)]


def run_on_terminal(args: list[str]) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "elkscan_core.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 1
    return b"".join(chunks).decode("utf-8")


def test_progress_line_never_runs_into_rows_or_log_lines(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for i in range(300):
        (files / f"f{i}.txt").write_text(f"nothing {i}\n")
    (files / "eicar.com").write_bytes(eicar())
    pipeline = tmp_path / "p.yaml"  # an optional engine that cannot start: a warning during the scan
    pipeline.write_text("version: 1\nplugins: [yara_backend, clamav_backend, stdout_sink]\n"
                        "engines:\n  - use: yara\n  - use: clamav\n    optional: true\n"
                        f"    with: {{socket: {tmp_path}/none.sock}}\nsinks:\n  - use: stdout\n")
    raw = run_on_terminal(["scan", "-p", str(pipeline), "--no-cache", str(files)])
    assert "files · " in raw  # the progress line was drawn
    lines = [line for line in screen(raw) if line]
    assert [line.split() for line in lines if "RESULT" in line] == [["RESULT", "SIGNATURE", "ENGINE", "PATH"]]
    assert any(line.split()[:3] == ["detected", "Multios_TestFile_Eicar", "yara"] for line in lines)
    assert any(line.startswith("elkscan: WARNING: engine 'clamav'") for line in lines)
    assert lines[-1].startswith("elkscan: scanned 301 files")
    for line in lines:
        assert PROGRESS.match(line) or "files · " not in line, line
