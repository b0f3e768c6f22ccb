"""Allow-list loading, the component registry, and meta-tests of the hook specs."""

import inspect
import re
from pathlib import Path

import pytest

from elkscan_core import PluginError, hookspecs, make_plugin_manager
from elkscan_core.plugins import load_everything
from elkscan_core.registry import Registry

ENGINE = """
from elkscan_core import Engine, hookimpl

class E(Engine):
    id = "{id}"
    def scan(self, subject):
        return []

@hookimpl
def elkscan_register_engines(registry):
    registry.add(E)
"""
ROOT = Path(__file__).resolve().parents[1]


def test_only_allowed_plugins_are_imported(install_plugin):
    install_plugin("tripwire", "raise SystemExit('imported a plugin that was not allowed')")
    install_plugin("good", ENGINE.format(id="good"))
    pm = make_plugin_manager(["good"])
    assert "good" in Registry.from_plugins(pm).ids("engine")
    assert pm.get_plugin("tripwire") is None


def test_missing_allowed_plugin_names_it_and_its_distribution():
    with pytest.raises(PluginError, match=r"plugin 'not_there' .* not installed .*elkscan-not-there"):
        make_plugin_manager(["not_there"])


def test_broken_allowed_plugin_stops_startup_with_reason(install_plugin):
    install_plugin("broken", "import module_that_does_not_exist\n")
    with pytest.raises(PluginError, match=r"plugin 'broken' failed to import .*ModuleNotFoundError"):
        make_plugin_manager(["broken"])


def test_duplicate_ids_name_both_plugins(install_plugin):
    install_plugin("first", ENGINE.format(id="same"))
    install_plugin("second", ENGINE.format(id="same"))
    with pytest.raises(PluginError, match=r"engine id 'same' is registered twice: by plugin '\w+' and by plugin '\w+'"):
        Registry.from_plugins(make_plugin_manager(["first", "second"]))


def test_registering_a_non_component_is_refused(install_plugin):
    install_plugin("wrong", """
from elkscan_core import hookimpl
@hookimpl
def elkscan_register_sinks(registry):
    registry.add(dict)
""")
    with pytest.raises(PluginError, match="not a subclass of elkscan_core.Sink"):
        Registry.from_plugins(make_plugin_manager(["wrong"]))


def test_listing_everything_reports_broken_plugins_and_keeps_the_rest(install_plugin):
    install_plugin("broken2", "raise RuntimeError('boom')\n")
    install_plugin("fine", ENGINE.format(id="fine"))
    pm, failures = load_everything()
    assert "RuntimeError: boom" in failures["broken2"]
    registry, errors = Registry.collect(pm)
    assert "fine" in registry.ids("engine") and not errors


def test_defaults_are_plugins_too():
    registry = Registry.from_plugins(make_plugin_manager([]))
    assert registry.ids("source") == ["dirscan", "procscan"]
    assert registry.plugin_of("source", "dirscan") == "dirscan"


# -- meta-tests: every hook spec is documented by the template, in docs/, and exercised by a test -------

SPECS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("elkscan_")]


def test_there_are_hook_specs():
    assert len(SPECS) >= 8


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_follows_the_docstring_template(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert doc.splitlines()[0].endswith("."), f"{name}: first line must be a one-sentence summary"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{name}: parameter {param} is not documented"
    assert ":returns:" in doc and "**When**:" in doc, f"{name}: returns/When missing"


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_is_in_the_hook_reference(name):
    reference = (ROOT / "docs" / "hooks.md").read_text()
    assert f"`{name}(" in reference, f"docs/hooks.md does not describe {name}"


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_is_exercised_by_a_test(name):
    own = Path(__file__).resolve()
    tests = [p for p in [*ROOT.glob("tests/test_*.py"), *ROOT.glob("plugins/*/tests/test_*.py")] if p != own]
    assert any(re.search(rf"\b{name}\b", p.read_text()) for p in tests), f"no test exercises {name}"
