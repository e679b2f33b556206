#!/usr/bin/env bash
# Set up, then run Waggle's demo: start a local fleet of eight hosts, deploy
# the example hive to it, change one node and deploy again, stop the fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The example hive needs no binary cache; don't wait on one without network.
export NIX_CONFIG="${NIX_CONFIG:-substituters =}"
exec .venv/bin/python scripts/demo.py "$@"
