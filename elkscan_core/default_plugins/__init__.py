"""The core's own components, registered exactly as third-party plugins register theirs."""

from . import dirscan, procscan

#: (plugin name, module) registered into every plugin manager, before the allowed plugins.
DEFAULT_PLUGINS = (("dirscan", dirscan), ("procscan", procscan))
