#!/usr/bin/env bash
# Set up vmdriver on a fresh Debian 12 machine (as root) and boot the demo VM.
#
#   bash scripts/setup.sh            # install everything, then run the demo job
#   bash scripts/setup.sh --no-demo  # install everything only (what CI does)
#
# Installs the Debian packages in scripts/apt-packages.txt (QEMU, qemu-img, the
# tools that build the test guest), a virtual environment in .venv with
# vmdriver and its development tools, and builds the test guest into
# /var/cache/vmdriver/guest (cached by content; guest/out points at it).
set -euo pipefail
cd "$(dirname "$0")/.."
demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

packages=$(grep -hv '^\s*#' scripts/apt-packages.txt guest/apt-packages.txt | sort -u | tr '\n' ' ')
missing=""
for p in $packages; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing="$missing $p"
done
# kubectl (for `kubectl kustomize` in the pod runner's tests) may come from another
# package already; Debian's kubernetes-client only where there is none.
command -v kubectl >/dev/null 2>&1 || missing="$missing kubernetes-client"
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# The Ceph (python3-rados, python3-rbd) and libnftables (python3-nftables) bindings
# are Debian packages built for the CPython 3.11 ABI. Expose just those three to the
# venv through a .pth (not --system-site-packages: Debian's 3.11.2 and its other
# packages would come along; tarfile's extraction filters need 3.11.4).
bindings=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/../debian-bindings
mkdir -p "$bindings"
for m in rados.cpython-311-x86_64-linux-gnu.so rbd.cpython-311-x86_64-linux-gnu.so nftables; do
    [ -e "/usr/lib/python3/dist-packages/$m" ] && ln -sfn "/usr/lib/python3/dist-packages/$m" "$bindings/$m"
done
(cd "$bindings" && pwd -P) > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian-bindings.pth"
log=$(mktemp)
if ! { .venv/bin/python -m pip install -q --upgrade pip setuptools &&
       .venv/bin/python -m pip install -q -e '.[dev]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install failed" >&2
    exit 1
fi
rm -f "$log"
.venv/bin/vmdriver --version >/dev/null

echo "setup: building the test guest" >&2
bash guest/build.sh >/dev/null
echo "setup: building the Debian cloud guest (debootstrap; cached by content)" >&2
bash guest/cloud/build.sh >/dev/null

if [ "$demo" = 1 ]; then
    # The demo's artifact is the built guest image, outside the job file's dir: the
    # operator (this script) allows its directory, as a host config would.
    demo_host=$(mktemp --suffix=.hcl)
    printf 'image_paths = ["%s"]\n' "$(cd guest/out && pwd -P)" >"$demo_host"
    echo "setup: booting the demo VM (Ctrl-C stops it gracefully); try: curl http://127.0.0.1:8080/" >&2
    exec .venv/bin/vmdriver run examples/demo.nomad.hcl --host-config "$demo_host" \
        --ready VMDRIVER-GUEST-READY
fi
