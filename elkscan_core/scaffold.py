"""``elkscan new-plugin NAME``: a working plugin to start from.

It writes a separately packaged distribution that follows the bundled plugins' convention (distribution
``elkscan-NAME``, package ``elkscan_NAME`` with ``plugin.py`` named by the ``elkscan`` entry point, a
README and a licence), with one engine and a test that runs it through ``elkscan_core.testing.run``:
``pip install`` it and its test passes.
"""

from __future__ import annotations

import keyword
import os
import re
from pathlib import Path
from string import Template

from .errors import ElkscanError

NAME = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")

_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "elkscan plugin $name: an engine that detects marker strings (a starting point)"
requires-python = ">=3.9"
readme = "README.md"
license = { text = "Apache-2.0" }  # your terms
dependencies = ["elkscan-core"]

[project.entry-points.elkscan]
$name = "$package.plugin"

[tool.setuptools]
packages = ["$package"]  # a package: add modules beside engine.py, nothing to list

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

_INIT = '''\
"""elkscan plugin ``$name`` (see README.md)."""
'''

_PLUGIN = '''\
"""Hook implementations. The ``elkscan`` entry point names this module; elkscan imports it only when a
pipeline lists ``$name`` in ``plugins:``."""

from __future__ import annotations

from elkscan_core import hookimpl

from .engine import ${Name}Engine


@hookimpl
def elkscan_register_engines(registry) -> None:
    registry.add(${Name}Engine)
'''

_ENGINE = '''\
"""The ``$name`` engine: detects files that contain one of its markers. Replace the matching with your
own; the rest (options, threads, results) is what every engine needs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs
from attrs import frozen

from elkscan_core import Canary, ComponentError, Detection, Engine, Size, Subject


@frozen
class Config:
    """The options under ``with:``, validated when the session is built: an unknown key, a wrong type or
    a bad value stops start-up with one line naming the option."""

    #: Text whose presence in a file is a detection.
    markers: list[str] = attrs.field(factory=lambda: ["ELKSCAN-$NAME-MARKER"])
    #: The signature reported; the platform.class.name form gives records their types and class.
    signature: str = "Unix.Test.${Name}-1"
    #: Larger files are not read: they are reported not scanned by this engine, never clean.
    max_file_size: Size = Size(16 * 1024 * 1024)


class ${Name}Engine(Engine):
    id = "$name"
    Config = Config

    def __init__(self, config: Config, session) -> None:
        super().__init__(config, session)  # self.config (a Config), self.session
        self.max_file_size = config.max_file_size

    def start(self) -> None:
        """Main thread, once, before any scan: prepare what scan() reads, or refuse in one line."""
        self.markers = [marker.encode() for marker in self.config.markers if marker]
        if not self.markers:
            raise ComponentError("markers: give at least one non-empty marker")
        # what a long-running session checks it still detects (the EICAR test string by default)
        self.canary = Canary(self.markers[0], "its first marker", (self.config.signature,))

    def version(self) -> str:
        """Keys the verdict cache: it changes whenever what this engine detects changes."""
        text = "\\0".join([self.config.signature, *self.config.markers])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def scan(self, subject: Subject) -> Sequence[Detection]:
        """Worker threads, several at once: only read shared state here. [] when clean, never None."""
        data = subject.read(subject.size)
        if any(marker in data for marker in self.markers):
            return [Detection.from_signature(self.id, self.config.signature)]
        return []
'''

_TEST = '''\
"""The $name engine in a real session: the plugin is loaded from its entry point, as in production."""

from __future__ import annotations

from elkscan_core.testing import run


def pipeline(root, **options):
    return {
        "plugins": ["$name"],
        "state_dir": str(root.parent / "state"),
        "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "exclude": [], "type_filter": False}}],
        "engines": [{"use": "$name", "with": options}],
    }


def test_a_file_with_the_marker_is_detected_and_the_others_are_clean(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    (root / "hit.txt").write_bytes(b"header ELKSCAN-$NAME-MARKER trailer")
    (root / "clean.txt").write_bytes(b"nothing to see")
    result = run(pipeline(root), report_clean=True)
    assert result.detected == {str(root / "hit.txt"): ["Unix.Test.${Name}-1"]}
    hit = next(r for r in result.records if r.detections)
    assert (hit.detections[0].types, hit.detections[0].class_) == ("Unix", "Test")
    assert result.summary.clean == 1 and result.summary.errors == 0


def test_a_file_above_max_file_size_is_not_scanned_never_clean(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    (root / "big.bin").write_bytes(b"x" * 2048)
    result = run(pipeline(root, max_file_size="1KiB"), report_clean=True)
    assert result.records[0].status == "not_scanned" and result.summary.clean == 0
'''

_README = '''\
# $dist

An elkscan plugin: the engine `$name`, which detects files containing one of its markers. It was written
by `elkscan new-plugin $name` as a starting point: replace the matching in `$package/engine.py`.

```sh
pip install -e .            # into the environment elkscan runs from
python -m pytest            # its test: a real session through elkscan_core.testing.run
elkscan plugins             # lists $name
```

```yaml
version: 1
plugins: [$name, stdout_sink]
engines: [{use: $name, with: {markers: [ELKSCAN-$NAME-MARKER]}}]
sinks: [stdout]
```

| option | default | meaning |
|---|---|---|
| `markers` | `[ELKSCAN-$NAME-MARKER]` | text whose presence in a file is a detection |
| `signature` | `Unix.Test.${Name}-1` | the signature reported |
| `max_file_size` | `16MiB` | larger files are reported not scanned by this engine |

Layout: `$package/plugin.py` registers the components (the `elkscan` entry point in `pyproject.toml`
names it), one module per component beside it (`engine.py`), tests in `tests/`. Add a sink, a source or
an enricher as a module of its own and register it in `plugin.py`; the guide is elkscan's
`docs/writing-plugins.md`.
'''

_GITIGNORE = """\
__pycache__/
*.egg-info/
build/
dist/
.pytest_cache/
"""

FILES = {
    "pyproject.toml": _PYPROJECT,
    ".gitignore": _GITIGNORE,
    "README.md": _README,
    "$package/__init__.py": _INIT,
    "$package/plugin.py": _PLUGIN,
    "$package/engine.py": _ENGINE,
    "tests/test_$name.py": _TEST,
}


def write_plugin(name: str, parent: str | os.PathLike = ".") -> Path:
    """Write the plugin ``name`` into ``parent/name``; ElkscanError for a bad name or an existing path."""
    if not NAME.match(name) or keyword.iskeyword(name):
        raise ElkscanError(f"{name!r} cannot name a plugin: lower-case letters, digits and _, starting with a "
                           "letter, at most 40 (it becomes the component id and elkscan_<name>)")
    root = Path(parent) / name
    if os.path.lexists(root):
        raise ElkscanError(f"{root} exists; choose another name or directory (-o DIR)")
    names = {"name": name, "NAME": name.upper(), "Name": "".join(part.capitalize() for part in name.split("_")),
             "dist": "elkscan-" + name.replace("_", "-"), "package": f"elkscan_{name}"}
    for path, template in FILES.items():
        target = root / Template(path).substitute(names)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(Template(template).substitute(names))
    return root
