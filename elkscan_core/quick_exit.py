"""A command's end without the interpreter's teardown (docs/performance.md#start-up-and-shut-down).

After a scan's last output, tearing the interpreter down (every module's objects freed one by one, a
last garbage collection over all of them, the compiled rules and the verdict cache's index freed) took
20-30 ms; the kernel frees the same memory at once. ``quick_exit`` does first, in the interpreter's
order, everything of its exit that anyone outside the process can see: it waits for non-daemon threads
(and runs what ``threading`` runs then), runs the ``atexit`` callbacks (logging's shutdown, temporary
directories' removal, multiprocessing's children), and flushes every open file object, as the teardown
would when it frees them. Only when all of that succeeded does it end with ``os._exit``; otherwise it
leaves by ``sys.exit`` and the interpreter's own teardown (which then finds those steps done).
"""

from __future__ import annotations

import _io
import atexit
import gc
import io
import os
import sys
import threading
from typing import NoReturn

#: The C base of every file object: ``isinstance`` against ``io.IOBase``, an ABC, costs ten times more
#: over the few ten thousand objects a scan holds.
_IOBASE = getattr(_io, "_IOBase", io.IOBase)


def quick_exit(code: int) -> NoReturn:
    """End the process with exit status ``code`` once nothing the teardown would still do is left."""
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter's exit calls first
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:
        sys.exit(code)
    shutdown()  # joins every non-daemon thread, then threading's own exit callbacks (executors' joins)
    run_exitfuncs()  # each callback once: the interpreter's exit finds none left if we fall back to it
    if not _flush_open_files():
        sys.exit(code)  # the interpreter reports the failure (and exits 120 when stdout cannot take it)
    os._exit(code)


def _flush_open_files() -> bool:
    """Flush every open writable file object (the standard streams last); False if one fails."""
    files = [obj for obj in gc.get_objects() if isinstance(obj, _IOBASE)]
    streams = [stream for stream in (sys.stdout, sys.stderr) if stream is not None]
    ok = True
    for stream in [*(f for f in files if f is not sys.stdout and f is not sys.stderr), *streams]:
        ok = _flush(stream) and ok
    return ok


def _flush(stream) -> bool:
    try:
        if not stream.closed and stream.writable():
            stream.flush()
    except ValueError:  # closed (or detached) under us: nothing of it is left to write
        return True
    except Exception:
        return False
    return True
