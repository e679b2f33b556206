# Waggle activation runner (runner/deploy/activation.py): DIR TOPLEVEL GOAL SET_PROFILE
# shellcheck shell=sh
# Run as `/bin/sh DIR/run.sh DIR TOPLEVEL GOAL SET_PROFILE(1|0)`, detached from the SSH session.
# Writes its pid to DIR/pid, its output to DIR/log and, once done, its exit status to
# DIR/status (each through a rename, so a reader never sees half a file).
dir=$1 toplevel=$2 goal=$3 set_profile=$4
echo "$$" > "$dir/pid.tmp" && mv -f "$dir/pid.tmp" "$dir/pid"
exec </dev/null >>"$dir/log" 2>&1
status=0
if [ "$set_profile" = 1 ]; then
  nix-env --profile /nix/var/nix/profiles/system --set "$toplevel" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "waggle: setting the system profile failed with exit status $status"
  fi
fi
if [ "$status" -eq 0 ]; then
  "$toplevel/bin/switch-to-configuration" "$goal" || status=$?
fi
echo "$status" > "$dir/status.tmp" && mv -f "$dir/status.tmp" "$dir/status"
exit "$status"
