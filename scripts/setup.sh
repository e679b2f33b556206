#!/usr/bin/env bash
# Sets up everything Waggle's demo and tests need on a Debian/Ubuntu machine.
# Idempotent: installs only what is missing and reinstalls the Python package
# only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=()
[ "$(id -u)" = 0 ] || sudo_cmd=(sudo)

missing=()
command -v nix-instantiate >/dev/null 2>&1 || missing+=(nix-bin)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v git >/dev/null 2>&1 || missing+=(git)
command -v sudo >/dev/null 2>&1 || missing+=(sudo)  # tests of targetUser with sudo
command -v tmux >/dev/null 2>&1 || missing+=(tmux)  # tests of the live view
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)  # tests of the host scripts
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.waggle-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing waggle and its test tools into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
