"""Root-safe configuration (issue 10 part 3): where the state lives, and what a pipeline may name."""

from __future__ import annotations

import os
import pwd

from elkscan_core.pipeline import parse_pipeline
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.runner import build_session


def test_without_home_state_is_never_the_working_directory(tmp_path, monkeypatch):
    for name in ("HOME", "XDG_CACHE_HOME", "ELKSCAN_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # audit C11: a working directory another user could fill
    session = build_session(parse_pipeline({"version": 1}), make_plugin_manager(()))
    expected = ("/var/lib/elkscan" if os.geteuid() == 0
                else os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache", "elkscan"))
    assert session.state_dir == expected
