"""Start elkscan from the unpacked package: its own code and the dependencies vendored for this
Python, nothing from the host's site-packages. Kept to old syntax so that any Python 3 can at least
explain that it is not supported."""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
tag = "py%d.%d" % sys.version_info[:2]
vendor = os.path.join(here, "vendor", tag)
if not os.path.isdir(vendor):
    carried = sorted(os.listdir(os.path.join(here, "vendor"))) if os.path.isdir(os.path.join(here, "vendor")) else []
    sys.stderr.write("scanner: this package carries dependencies for %s, but %s is Python %d.%d; rebuild "
                     "it with 'elkscan elkeid package --python %s'\n"
                     % (", ".join(carried) or "no Python", sys.executable, sys.version_info[0],
                        sys.version_info[1], sys.executable))
    sys.exit(1)
sys.path[:0] = [os.path.join(here, "lib"), vendor]

from elkscan_elkeid_transport.agent import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
