"""The clamav engine's canary for the session's periodic check (docs/metrics.md#canaries): what it
gives, and that a real clamd passes it through the engine's own scan() from memory."""

from __future__ import annotations

import pytest

from elkscan_core import EICAR, Canary
from elkscan_core.canary_watch import check


@pytest.mark.parametrize("mode", ["fildes", "instream"])
def test_a_managed_clamd_must_report_its_own_canary_from_memory(engine_factory, test_database, mode):
    engine = engine_factory({"managed": True, "database": str(test_database), "mode": mode})
    own = engine.canary
    assert own.signatures == ("Elkscan.Canary-1", "Elkscan.Canary-1.UNOFFICIAL")
    assert check(engine, own) == ""
    wrong = Canary(own.data, "its canary buffer", ("Another.Signature-1",))
    assert check(engine, wrong) == ("its canary buffer came back as Elkscan.Canary-1.UNOFFICIAL, "
                                           "not Another.Signature-1")


def test_by_path_clamd_cannot_read_a_memory_file_so_there_is_no_periodic_canary(engine_factory, test_database):
    engine = engine_factory({"managed": True, "database": str(test_database), "mode": "path"})
    assert engine.canary is None


def test_an_existing_clamd_gets_eicar(new_engine, tmp_path):
    engine = new_engine({"socket": str(tmp_path / "clamd.sock")})  # not started: mode and daemon as configured
    assert engine.canary is EICAR
