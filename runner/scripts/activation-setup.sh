# shellcheck shell=sh
# Prepare and start an activation, one command: `sh -c "$(cat activation-running.sh
# activation-setup.sh activation-detach.sh activation-launch.sh)" sh DIR METHOD UNIT
# DESCRIPTION RUNNER... < activation-runner.sh`. This part prepares: it makes the run
# directory DIR (mode 0700) with the runner script from stdin as DIR/run.sh and an empty
# DIR/log, and resolves METHOD "auto" to systemd-run where systemd runs, else detached.
# DIR is made once (`mkdir`, not `-p`): if it exists, an earlier attempt of this launch (its
# answer lost with a connection) got here first, and this one prints `method=<what that one
# used, if known>` and `already`, and starts nothing.
dir=$1 method=$2
umask 077
mkdir -p -- "${dir%/*}" || exit 1
if ! mkdir -- "$dir" 2>/dev/null; then
  [ -d "$dir" ] || { echo "waggle: cannot create $dir" >&2; exit 1; }
  used=
  read -r used < "$dir/method" 2>/dev/null
  printf 'method=%s\nalready\n' "$used"
  exit 0
fi
# Run directories of earlier activations stay when no deployer collected them (one that was
# killed, or lost the host). Their names sort by time (run ids begin with the time): while
# there are more than KEEP, the oldest whose runner has ended go.
prune() { # KEEP DIR...
  keep=$1 left=$(($# - 1))
  shift
  for old in "$@"; do
    [ "$left" -gt "$keep" ] || break
    left=$((left - 1))
    [ "$old" != "$dir" ] || continue
    pid=
    read -r pid < "$old/pid" 2>/dev/null || continue
    running "$pid" || rm -rf -- "$old"
  done
}
prune 10 "${dir%/*}"/activation-*
cat > "$dir/run.sh" && : > "$dir/log" || exit 1
if [ "$method" = auto ]; then
  if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
    method=systemd-run
  else
    method=detached
  fi
fi
