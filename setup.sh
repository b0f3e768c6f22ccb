#!/usr/bin/env bash
# Set up elkscan on Debian 12 (or similar): system packages (as root), a virtualenv in .venv with the
# core and every plugin installed in editable mode. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

# System packages: ClamAV's daemon and tools (the clamav engine and its tests), the yara CLI (benchmarks),
# Debian's ClamAV test corpus, venv support for the system Python, fatrace (reference of
# bench/fanotify_bench.py), binutils (objdump, objcopy, strip: `elkscan elkeid package` freezes with
# PyInstaller and staticx, which the elkeid plugin's pip dependencies bring), nats-server (the nats
# sink's tests and bench run a real JetStream server on a loopback port; its service is not needed), and
# openssl (the http sink's tests make a certificate authority with it).
APT_PACKAGES=(clamav clamav-daemon clamdscan clamav-testfiles yara python3-venv util-linux fatrace binutils
              nats-server openssl)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "setup: not root or no apt-get; install ${APT_PACKAGES[*]} yourself for the ClamAV engine" >&2
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
plugins=()
for dir in plugins/*/; do [ -f "$dir/pyproject.toml" ] && plugins+=(-e "$dir"); done
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" "${plugins[@]}"
# Editable installs leave the sources uncompiled; compiled once here, no run compiles them again (even
# where PYTHONDONTWRITEBYTECODE keeps Python from saving what it compiles).
.venv/bin/python -m compileall -q -x '/(build|tests)/' elkscan_core plugins >/dev/null
echo "setup: ready; run .venv/bin/elkscan --help" >&2
