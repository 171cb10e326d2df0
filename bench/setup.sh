#!/usr/bin/env bash
# Install what the benchmark suite needs; safe to run again (idempotent).
#   Debian packages: dnsperf (with resperf), dnsmasq-base, unbound, nsd, nginx-light (the
#                    crawler burst's web servers), iproute2, dnsutils,
#                    procps, util-linux (taskset)
#   Python: matplotlib and py-spy into the given interpreter's environment
# Usage: sudo bash bench/setup.sh [PYTHON]      (PYTHON defaults to python3; pass the venv's)
# Installing the unbound/nsd packages does not start them as services in a container without
# systemd; if your host runs them as services, the suite's own instances use other ports.
set -euo pipefail

PY="${1:-python3}"

pkgs=(dnsperf dnsmasq-base unbound nsd nginx-light iproute2 dnsutils procps util-linux)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The packaged services must not hold ports or answer anything: stop them if systemd started them.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for s in unbound nsd dnsmasq nginx; do
        systemctl is-active --quiet "$s" 2>/dev/null && { systemctl stop "$s" || true; }
    done
fi

"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install -q matplotlib
"$PY" -c "import shutil, sys, os; sys.exit(0 if shutil.which('py-spy', path=os.path.dirname(sys.executable)) or shutil.which('py-spy') else 1)" \
    || "$PY" -m pip install -q py-spy
# the product itself (with uvloop), when the suite runs from a checkout
REPO="$(cd "$(dirname "$0")/.." && pwd)"
"$PY" -c "import sidecar, uvloop" 2>/dev/null || "$PY" -m pip install -q -e "$REPO[fast]"

for t in dnsperf resperf nsd dnsmasq unbound nginx taskset ip; do
    command -v "$t" >/dev/null || { echo "setup: $t still missing" >&2; exit 1; }
done
echo "bench setup ok ($PY)"
