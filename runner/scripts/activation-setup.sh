# shellcheck shell=sh
# Prepare an activation: `sh -c "$(cat activation-running.sh activation-setup.sh)" sh DIR METHOD
# < activation-runner.sh`.
# Makes the run directory DIR (mode 0700) with the runner script from stdin as DIR/run.sh and
# an empty DIR/log; resolves METHOD "auto" to systemd-run where systemd runs, else detached.
# stdout: `method=...`, then the session's PATH and LOCALE_ARCHIVE for the transient unit.
set -e
dir=$1 method=$2
umask 077
mkdir -p -- "$dir"
# Run directories of earlier activations stay when no deployer collected them (one that was
# killed, or lost the host). Their names sort by time (run ids begin with the time): while
# there are more than KEEP, the oldest whose runner has ended go.
keep=10
set -- "${dir%/*}"/activation-*
left=$#
for old in "$@"; do
  [ "$left" -gt "$keep" ] || break
  left=$((left - 1))
  [ "$old" != "$dir" ] || continue
  pid=
  read -r pid < "$old/pid" 2>/dev/null || continue
  running "$pid" || rm -rf -- "$old"
done
cat > "$dir/run.sh"
: > "$dir/log"
if [ "$method" = auto ]; then
  if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
    method=systemd-run
  else
    method=detached
  fi
fi
printf 'method=%s\nPATH=%s\nLOCALE_ARCHIVE=%s\n' "$method" "$PATH" "${LOCALE_ARCHIVE-}"
