# shellcheck shell=sh
# `sh -c "$(cat activation-running.sh activation-stop.sh)" sh DIR UNIT`: TERM the activation
# (unit, the runner's process group and its switch-to-configuration's, which has a session of
# its own), KILL after 2 s, remove the run directory. UNIT is empty for a detached activation.
dir=$1 unit=$2
pid=
read -r pid < "$dir/pid" 2>/dev/null
case $pid in ''|*[!0-9]*|0|1) pid= ;; esac
child=
read -r child < "$dir/child" 2>/dev/null
case $child in ''|*[!0-9]*|0|1) child= ;; esac
signal() {
  [ -z "$unit" ] || systemctl kill --signal="$1" "$unit" >/dev/null 2>&1
  [ -z "$pid" ] || kill "-$1" "-$pid" 2>/dev/null
  [ -z "$child" ] || kill "-$1" "-$child" 2>/dev/null
}
signal TERM
n=0
while [ -n "$pid" ] && [ "$n" -lt 20 ] && running "$pid"; do
  n=$((n + 1))
  sleep 0.1
done
signal KILL
rm -rf -- "$dir"
