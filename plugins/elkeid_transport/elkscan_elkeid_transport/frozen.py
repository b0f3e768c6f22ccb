"""Entry point of the packaged ``scanner``: one executable made by PyInstaller (onefile) and staticx.

At each start staticx's loader unpacks the C libraries and the PyInstaller program into
``$TMPDIR/staticx-XXXXXX``, and PyInstaller's unpacks libpython and the extension modules into
``./_MEIXXXXXX`` (the agent's working directory, the plugin directory); both are private (0700) and
removed at exit. Before elkscan starts, this module puts back the environment the agent gave (clamd is
a host program and must not load the unpacked libraries), stops depending on the names of what is in
/tmp, and removes unpacked directories that a killed instance left behind. Run as a script by the
frozen program, so imports are absolute.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import sys
import time
from typing import Optional

#: An unpacked directory younger than this may belong to a start still unpacking: it is left alone.
UNPACK_GRACE = 60.0


def restore_environment(environ: "os._Environ[str]") -> Optional[str]:
    """Drop what the two loaders added to the environment; the path of the program the agent started.

    PyInstaller prepends its unpacked libraries to ``LD_LIBRARY_PATH`` (saving the agent's value in
    ``LD_LIBRARY_PATH_ORIG``) and adds ``_PYI_*`` for its own processes; staticx adds
    ``STATICX_BUNDLE_DIR`` and ``STATICX_PROG_PATH``."""
    original = environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is None:
        environ.pop("LD_LIBRARY_PATH", None)
    else:
        environ["LD_LIBRARY_PATH"] = original
    for name in [name for name in environ if name.startswith("_PYI_")]:
        del environ[name]
    environ.pop("STATICX_BUNDLE_DIR", None)
    return environ.pop("STATICX_PROG_PATH", None)


def hold_and_sweep(own: str) -> Optional[int]:
    """Hold a shared lock on our unpacked directory for our whole life; remove its siblings whose
    owner is gone (the agent SIGKILLs the process group when a plugin does not exit within 10 s, and
    then PyInstaller's parent cannot remove them). The fd holding the lock, or None."""
    try:
        held = os.open(own, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(held, fcntl.LOCK_SH)
    except OSError:
        return None
    parent = os.path.dirname(own)
    try:
        names = os.listdir(parent)
    except OSError:
        return held
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith("_MEI") or len(name) != 10 or path == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or time.time() - info.st_mtime < UNPACK_GRACE:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held (shared) by every live instance
        except OSError:
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
    return held


def keep_unpacked_program_usable() -> None:
    """Python reads the modules it has not imported yet from the program staticx unpacked into /tmp, by
    its name, and glibc loads libgcc_s from there at the first thread exit. A /tmp cleaner (RHEL's
    systemd-tmpfiles removes files unread for 10 days) may remove them while the plugin runs for weeks:
    so read modules through a descriptor (``/proc/self/fd/N`` opens the same file once its name is
    gone), and load libgcc_s now."""
    archive = getattr(sys.modules.get("pyimod02_importers"), "pyz_archive", None)  # PyInstaller's reader
    path = getattr(archive, "_filename", None)
    if path is None:
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    archive._filename = f"/proc/self/fd/{fd}"
    ctypes.CDLL("libgcc_s.so.1")


def main() -> int:
    program = restore_environment(os.environ) or sys.executable
    unpacked = getattr(sys, "_MEIPASS", None)
    if unpacked:
        keep_unpacked_program_usable()
        hold_and_sweep(unpacked)  # the fd stays open, and the lock held, until the process ends
    from elkscan_elkeid_transport.agent import main as run_agent

    return run_agent([os.path.join(os.path.dirname(program), "pipelines", "elkeid.yaml")])


if __name__ == "__main__":
    sys.exit(main())
