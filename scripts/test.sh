#!/usr/bin/env bash
# The whole test suite, as CI runs it (after scripts/setup.sh).
#
# Most tests run on three workers side by side (a file per worker: guest boots wait
# on QEMU more than they compute). The network-namespace tests and the guest-agent
# exec tests then run alone: they time UDP echoes, DHCP, neighbour discovery and
# streamed exec output of booting guests, which a host busy with other workers'
# guests delays past their bounds.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
serial=(tests/network tests/netvm tests/virt/test_bridge_e2e.py tests/guest)
ignore=()
for path in "${serial[@]}"; do ignore+=("--ignore=$path"); done
"$py" -m pytest -q -n 3 --dist loadgroup "${ignore[@]}" "$@"
"$py" -m pytest -q "${serial[@]}" "$@"
