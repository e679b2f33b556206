# shellcheck shell=sh
# `sh -c "$(cat activation-detach.sh)" sh LOG ARGV...`: ARGV in a session of its own, stdin
# /dev/null, output appended to LOG (the activation where systemd-run is not available).
log=$1; shift; exec setsid -f "$@" </dev/null >>"$log" 2>&1
