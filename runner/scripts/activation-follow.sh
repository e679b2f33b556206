# shellcheck shell=sh
# `sh -c "$(cat activation-running.sh activation-follow.sh)" sh DIR OFFSET START_WAIT`: the
# log from byte OFFSET as it grows, each line as `<offset relative to OFFSET>:<text>`, then
# `status:<code>` (or `status:none` when the runner died without one, `status:unstarted` when
# it never wrote its pid within START_WAIT seconds), after `armed:<DIR/armed>` if that exists
# (whether the rollback waits for a confirmation); then removes DIR once told (see the end).
dir=$1 off=$2 wait=$3
n=0
while [ ! -e "$dir/pid" ] && [ ! -e "$dir/status" ]; do
  if [ "$n" -ge $((wait * 20)) ]; then echo status:unstarted; exit 0; fi
  n=$((n + 1))
  sleep 0.05
done
pid=
read -r pid < "$dir/pid" 2>/dev/null
last=
# Poll quickly at first (most activations are short), then back off to 0.4 s so
# many hosts' followers do not keep the host busy.
delay=0.05
while :; do
  [ -e "$dir/status" ] && last=1
  size=$(wc -c < "$dir/log" 2>/dev/null) || { size=$off; last=1; }
  if [ "$size" -gt "$off" ]; then
    tail -c "+$((off + 1))" "$dir/log" | head -c "$((size - off))"
    off=$size
  fi
  [ -n "$last" ] && break
  if ! running "$pid"; then last=1; continue; fi
  sleep "$delay"
  case $delay in 0.05) delay=0.1 ;; 0.1) delay=0.2 ;; *) delay=0.4 ;; esac
done | LC_ALL=C grep -a -b --line-buffered ''
keep=
if [ -e "$dir/status" ]; then
  armed=
  [ ! -e "$dir/armed" ] || { armed=$(cat "$dir/armed"); echo "armed:$armed"; }
  status=$(cat "$dir/status")
  echo "status:$status"
  case $status:$armed in 0:armed*) keep=1 ;; esac
else
  echo status:none
fi
# The run directory goes once the deployer has the status, which it says with a line `done`
# on stdin (EOF without it: the connection was lost, and the next follow reads it all again),
# then `removed`. One waiting for a confirmation (magic rollback) stays for activation-decide.sh.
[ -z "$keep" ] || exit 0
ack=
read -r ack || :
[ "$ack" = "done" ] || exit 0
rm -rf -- "$dir" && echo removed
