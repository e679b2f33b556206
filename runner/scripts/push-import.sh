# shellcheck shell=sh
# The host's side of a push (runner/deploy/push.py), one command:
# `sh -c "$(cat push-import.sh)" sh LIMIT GRACE BYTES MORE [NIX_OPTION...]`.
# stdin: BYTES bytes of store paths (one a line) the host may fetch from its own
# substituters, then `nix-store --export` of the paths Waggle sends.
# With BYTES > 0: substitutes those paths (`nix-store --realise NIX_OPTION...`, stopped by
# `timeout` after LIMIT seconds, KILLed GRACE seconds later, so no stray nix-store holds
# path locks the import would wait for), prints `missing:`, each of them still not valid,
# then `ready`; Waggle exports what is still missing. Then, unless nothing comes (none
# missing and MORE, the number of other paths to send, is 0), imports the rest of stdin.
limit=$1 grace=$2 bytes=$3 more=$4
shift 4
if [ "$bytes" -gt 0 ]; then
  paths=$(head -c "$bytes")
  printf '%s\n' "$paths" | timeout -k "$grace" "$limit" xargs -r nix-store --realise "$@" >/dev/null
  echo missing:
  still=$(printf '%s\n' "$paths" | xargs -r nix-store --check-validity --print-invalid) || {
    echo "waggle: cannot ask the store which paths are still missing" >&2
    exit 1
  }
  [ -z "$still" ] || printf '%s\n' "$still"
  echo ready
  [ -n "$still" ] || [ "$more" -gt 0 ] || exit 0
fi
exec nix-store --import
