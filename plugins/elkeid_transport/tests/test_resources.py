"""Resources as Elkeid's (audit #6): the packaged plugin, started by the agent inside the agent's unit
(MemoryMax=250M, CPUQuota=10%), moves into a cgroup of its own at the top of the hierarchy with its clamd:
39 % of a CPU and 256 MiB, the pipeline's again after a 6057, removed when the agent goes. On cgroup v1 the
top is that of a cgroup namespace rooted at the test's own cgroups (tests/cgroup_helpers.py)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from elkscan_core.testing import eicar

_spec = importlib.util.spec_from_file_location(
    "cgroup_helpers", Path(__file__).resolve().parents[3] / "tests" / "cgroup_helpers.py")
cgroups = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cgroups)


def _clamd(parent: int) -> int:
    """The clamd the plugin started."""
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and stat[stat.index("(") + 1:stat.rindex(")")] == "clamd" and \
                int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            return int(entry.name)
    raise AssertionError(f"no clamd child of {parent}")


def _limits(own: dict[str, str]) -> dict[str, str]:
    """The CPU and memory limits of the plugin's own cgroup, as its limit files say."""
    expected = cgroups.limit_files("0", "0")
    return {name: Path(own["" if cgroups.HOST == "v2" else name.split(".")[0]], name).read_text().strip()
            for name in expected}


def test_the_plugin_leaves_the_agents_cgroup_for_its_own_with_clamd(start_agent, plugin_dir, tmp_path):
    target = tmp_path / "eicar.com"
    target.write_bytes(eicar())
    roots = tmp_path / "roots"
    roots.mkdir()
    (roots / "notes.txt").write_text("nothing to see\n")
    plugin_dir.configure(clamav=True, cgroup="top", quick_roots=[str(roots)])  # the shipped limits
    log = plugin_dir.workdir / "scanner.log"
    if not cgroups.HOST:
        agent = start_agent()
        agent.send(6053, {"exe": str(target)}, token="one")
        assert agent.done("one", timeout=60).fields["status"] == "succeed"
        assert agent.close(timeout=20) == 0
        assert "not confined in a cgroup: " in log.read_text()
        return
    with cgroups.service() as agent_unit:
        setup, prefix = cgroups.enter_below_top(agent_unit)
        agent = start_agent(prefix=(*prefix, "sh", "-c", f'{setup}\nexec "$@"', "sh"))
        try:
            agent.send(6053, {"exe": str(target)}, token="one")
            assert agent.done("one", timeout=60).fields["status"] == "succeed"
            plugin = int((plugin_dir.tmp / "elkeid_scanners_plugin.pid").read_text())  # the one running elkscan
            clamd = _clamd(plugin)
            parents = cgroups.homes() if cgroups.HOST == "v1" else cgroups.tops()  # the top the plugin sees
            own = {key: os.path.join(parent, f"elkscan-{plugin}") for key, parent in parents.items()}
            for key, path in own.items():
                assert {str(plugin), str(clamd)} <= set(Path(path, "cgroup.procs").read_text().split())
                assert str(plugin) not in Path(agent_unit[key], "cgroup.procs").read_text().split()
            assert _limits(own) == cgroups.limit_files("39000", str(256 * 2**20))  # Elkeid 2.2's
            agent.send(6057, {"mode": "quick", "cpu_idle": "50", "mem": "300"}, token="full")
            assert agent.done("full", timeout=120).fields["status"] == "succeed"
            assert _limits(own) == cgroups.limit_files("39000", str(256 * 2**20))  # the default again
        finally:
            assert agent.close(timeout=20) == 0, agent.stderr()
        for path in own.values():
            assert not os.path.exists(path)
    [line] = [line for line in log.read_text().splitlines() if "\tconfined in cgroup " in line]
    assert "\tINFO\telkscan.governor\t" in line and f"\tconfined in cgroup {cgroups.HOST} elkscan-{plugin} (" in line
