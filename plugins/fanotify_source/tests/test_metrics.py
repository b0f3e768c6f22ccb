"""The fanotify source's counters on the session's metrics endpoint (docs/metrics.md)."""

from __future__ import annotations

from elkscan_core import FILE_EVENT
from elkscan_core.testing import scrape

from elkscan_fanotify_source.source import MEASURES


def test_events_drops_and_overflows_are_served_as_counters(tmp_path, tools):
    watched = tmp_path / "bin"
    watched.mkdir()
    options = {"file_events": {"profile": "none", "directories": [str(watched)], "rate_limit": 3,
                               "rate_window": "1h"}, "on_access": {"enabled": False}}
    with tools.monitoring(options, pipeline={"metrics": {"listen": "127.0.0.1:0"}}) as monitor:
        with tools.Writer('for i in 0 1 2 3 4 5 6 7 8 9; do echo $i > "$1/f$i"; done', str(watched)):
            stats = monitor.source.stats
            monitor.wait_for(lambda: stats["file_events"] + stats["rate_limited"] == 10)
        got = scrape(monitor.session)
        for name in MEASURES:
            assert got.families[f"elkscan_fanotify_{name}"].type == "counter"
        assert got.value("elkscan_fanotify_file_events_total", source="fanotify") == 3
        assert got.value("elkscan_fanotify_rate_limited_total", source="fanotify") == 7  # dropped
        assert got.value("elkscan_fanotify_events_total", source="fanotify") >= 10
        assert got.value("elkscan_fanotify_overflows_total", source="fanotify") == 0
        assert got.value("elkscan_up") == 1
    assert len(monitor.kinds(FILE_EVENT)) == 3
