#!/usr/bin/env bash
# Run the whole benchmark suite by hand: bash bench/run.sh [python -m bench options]
# Installs what it needs if missing (as root): libvirt for the peer arm, matplotlib for the plot.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
if ! command -v libvirtd >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libvirt-daemon-system libvirt-clients >/dev/null || echo "bench: libvirt install failed; libvirt arm will be skipped"
fi
"$py" -c "import matplotlib" 2>/dev/null || "$py" -m pip install -q matplotlib || echo "bench: no matplotlib; no plot"
[ -f guest/out/manifest.json ] || bash guest/build.sh >/dev/null
exec "$py" -m bench "$@"
