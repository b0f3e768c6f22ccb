"""Local rule sources for the tests: git repositories made with the real ``git``, an HTTP server thread."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from contextlib import contextmanager

GOOD = 'rule Good_Marker { strings: $a = "elkscan-rules-test-marker" condition: $a }\n'
#: Reads every byte of every file, four times over: far above any budget.
EXPENSIVE = ('rule Expensive_Loop {\n  condition:\n    for all i in (0..filesize - 1) : '
             '(for any j in (0..3) : (uint8(i) != j + 0x100))\n}\n')
BROKEN = 'rule Broken_Rule {\n  strings:\n    $a = "x"\n  condition:\n    $b\n}\n'


def git(*args: str, cwd=None) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd or "/"), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
           "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def make_repo(path, files: dict[str, str]) -> str:
    """A git repository at ``path`` holding ``files``, committed; returns the commit."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / ".git").exists():
        git("init", "-q", "-b", "main", cwd=path)
    for name, text in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", "rules", cwd=path)
    return git("rev-parse", "HEAD", cwd=path).strip()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def http_server(directory):
    """Serve ``directory`` on 127.0.0.1 from a thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def elkscan(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elkscan_core.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)
