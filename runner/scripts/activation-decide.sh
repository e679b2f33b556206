# shellcheck shell=sh
# `sh -c "$(cat activation-running.sh activation-decide.sh)" sh DIR WANT WAIT`: the
# deployer's side of a magic rollback (activation-runner.sh). WANT "confirm" or "rollback" is
# made the decision unless one was made already (a symlink, made once: the first one wins);
# "" only reads. Then waits up to WAIT hundredths of a second for the runner's outcome and
# prints `decision:<decision>`, `outcome:<outcome>` (`outcome:none` when the runner ended
# without one or the wait ran out, `outcome:gone` when DIR does not exist), a line `log:` and
# the rollback's output (the log from DIR/rollback-from on). DIR is removed once the outcome
# has been read: the runner has nothing left to do there.
dir=$1 want=$2 wait=$3
if [ ! -d "$dir" ]; then echo outcome:gone; exit 0; fi
[ -z "$want" ] || ln -s "$want" "$dir/decision" 2>/dev/null
pid=
read -r pid < "$dir/pid" 2>/dev/null
# Wake the runner from its nap (it traps USR1) if it still runs: that pid, and that runner.
if [ -n "$want" ] && [ ! -e "$dir/outcome" ] && running "$pid" \
  && grep -qF "$dir/run.sh" "/proc/$pid/cmdline" 2>/dev/null; then
  kill -USR1 "$pid" 2>/dev/null
fi
read -r up _ < /proc/uptime
frac=${up#*.}
end=$((${up%.*} * 100 + ${frac#0} + wait))
delay=0.02 n=0
while [ ! -e "$dir/outcome" ]; do
  if ! running "$pid"; then
    [ -e "$dir/outcome" ] || break
  fi
  read -r up _ < /proc/uptime
  frac=${up#*.}
  [ $((${up%.*} * 100 + ${frac#0})) -lt "$end" ] || break
  sleep "$delay"
  n=$((n + 1))
  case $n in 10) delay=0.05 ;; 50) delay=0.2 ;; esac
done
echo "decision:$(readlink "$dir/decision" 2>/dev/null)"
if [ -e "$dir/outcome" ]; then
  echo "outcome:$(cat "$dir/outcome")"
  done=1
else
  echo outcome:none
  done=
fi
echo log:
if read -r from < "$dir/rollback-from" 2>/dev/null; then
  tail -c "+$((from + 1))" "$dir/log" 2>/dev/null
fi
[ -z "$done" ] || rm -rf -- "$dir"
