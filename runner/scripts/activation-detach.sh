# shellcheck shell=sh
# A part of the launch (activation-setup.sh): `detach LOG ARGV...` runs ARGV in a session of
# its own, stdin /dev/null, output appended to LOG (the activation where systemd-run is not
# available).
detach() {
  _log=$1
  shift
  setsid -f "$@" </dev/null >>"$_log" 2>&1
}
