#!/usr/bin/env bash
# Set up, then run Waggle's main job on the bundled example hive:
# evaluate and build every node, and print what was built.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The example hive needs no binary cache; don't wait on one without network.
export NIX_CONFIG="${NIX_CONFIG:-substituters =}"
exec .venv/bin/waggle -f examples/hive.nix -v build "$@"
