"""``elkscan new-plugin NAME``: what it writes installs with pip, follows the bundled plugins' packaging
convention, is listed by ``elkscan plugins``, and its own test passes against the installed copy."""

import os
import subprocess
import sys
import tomllib


def elkscan(*args, env=None):
    return subprocess.run([sys.executable, "-m", "elkscan_core.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_a_new_plugin_installs_and_its_test_passes(tmp_path):
    out = elkscan("new-plugin", "marker_check", "-o", str(tmp_path))
    assert out.returncode == 0, out.stderr
    plugin = tmp_path / "marker_check"
    project = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]
    assert project["name"] == "elkscan-marker-check" and project["readme"] == "README.md" and project["license"]
    assert project["entry-points"]["elkscan"] == {"marker_check": "elkscan_marker_check.plugin"}
    assert (plugin / "elkscan_marker_check" / "engine.py").exists() and (plugin / "README.md").exists()

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(plugin)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "ELKSCAN_STATE_DIR": str(tmp_path / "state")}
    listed = elkscan("plugins", env=env)
    assert "elkscan_marker_check.engine.MarkerCheckEngine" in listed.stdout
    # the installed copy, not the source tree: run from elsewhere
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(plugin / "tests")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert test.returncode == 0 and "2 passed" in test.stdout, test.stdout + test.stderr


def test_a_bad_name_or_an_existing_directory_is_refused(tmp_path):
    for name in ("Caps", "1st", "with-dash", "class", "a" * 41):
        out = elkscan("new-plugin", name, "-o", str(tmp_path))
        assert out.returncode == 2 and "cannot name a plugin" in out.stderr
    (tmp_path / "taken").mkdir()
    out = elkscan("new-plugin", "taken", "-o", str(tmp_path))
    assert out.returncode == 2 and "exists" in out.stderr and os.listdir(tmp_path / "taken") == []
