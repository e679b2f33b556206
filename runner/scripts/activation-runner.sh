# Waggle activation runner (runner/deploy/activation.py): DIR TOPLEVEL GOAL SET_PROFILE WINDOW LIMIT RECORD RUN_ID
# shellcheck shell=sh
# Run as `/bin/sh DIR/run.sh DIR TOPLEVEL GOAL SET_PROFILE WINDOW LIMIT RECORD RUN_ID`, detached
# from the SSH session (a transient unit, or a process in a session of its own):
#   SET_PROFILE  1: set the system profile to TOPLEVEL first (switch, boot); 0: not
#   WINDOW       hundredths of a second to wait for a confirmation after a successful switch
#                or test (magic rollback); 0: no rollback
#   LIMIT        seconds switch-to-configuration (the activation, a rollback) may run here
#                before it is stopped, so that nothing waits forever without a deployer; 0: none
#   RECORD       the file recording which systems Waggle activated here (`running <system>`
#                after a switch/test, `boot <system>` after a switch/boot); "" for none
#   RUN_ID       the run's id, exported as WAGGLE_RUN_ID (the host lock's holder)
# Files in DIR, each written through a rename so that a reader never sees half of one:
#   pid       this runner's pid            log       all output
#   previous  what ran before: system=, profile=, generation=
#   armed     "armed WINDOW" (the rollback waits for a decision) or "none: <why>"; written
#             before status when a rollback was asked for
#   status    the activation's exit status (the deployer's follower stops here)
#   decision  a symlink made once, by whoever is first (`ln -s` fails if it exists):
#             "confirm" (the deployer, over a new connection), "rollback" (the deployer,
#             after a failed health check, or this runner once WINDOW has passed)
#   outcome   "confirmed", "rolled-back SECONDS PREVIOUS" or "rollback-failed <why>"
#   rollback-from  the log's size when the rollback began (its output follows)
#   child     the pid of the running switch-to-configuration (a session of its own)
dir=$1 toplevel=$2 goal=$3 set_profile=$4 window=${5:-0} limit=${6:-0} record=${7-}
WAGGLE_RUN_ID=${8-}
export WAGGLE_RUN_ID
profile=/nix/var/nix/profiles/system
trap 'woken=1' USR1  # a decision was made (activation-decide.sh): before the pid is known
echo "$$" > "$dir/pid.tmp" && mv -f "$dir/pid.tmp" "$dir/pid"
exec </dev/null >>"$dir/log" 2>&1
# lock: join
# The host lock (lock-lib.sh comes before this script in run.sh), kept in the state directory
# that holds DIR (/run/waggle): held by this runner for as long as it lives, the rollback's
# wait included, so a deployer gone mid-activation leaves the host locked until this ends.
WAGGLE_LOCK_DIR=${dir%/*}
export WAGGLE_LOCK_DIR
held=$(waggle_lock_join activation)
case $? in
  0) ;;
  1)
    held=${held#held } && by=${held#* }
    echo "waggle: not activating: host locked by run ${held%% *} from ${by%% *} since ${by#* }"
    echo 75 > "$dir/status.tmp" && mv -f "$dir/status.tmp" "$dir/status"
    exit 75
    ;;
  *) echo "waggle: warning: activating without the host lock" ;;
esac

put() { # NAME TEXT: DIR/NAME holds TEXT, written through a rename
  printf '%s\n' "$2" > "$dir/$1.tmp" && mv -f "$dir/$1.tmp" "$dir/$1"
}

# The record: read once (the host lock keeps other runs' runners away while this one lives),
# written whole by `record KIND [SYSTEM]` (KIND's line says SYSTEM, or is removed).
rec_running='' rec_boot=''
if [ -n "$record" ] && [ -r "$record" ]; then
  while read -r kind system; do
    case $kind in running) rec_running=$system ;; boot) rec_boot=$system ;; esac
  done < "$record"
fi
record() {
  case $1 in running) rec_running=${2-} ;; boot) rec_boot=${2-} ;; esac
  [ -n "$record" ] || return 0
  [ -d "${record%/*}" ] || mkdir -p -- "${record%/*}" || return 0
  {
    [ -z "$rec_running" ] || printf 'running %s\n' "$rec_running"
    [ -z "$rec_boot" ] || printf 'boot %s\n' "$rec_boot"
  } > "$record.tmp" && mv -f "$record.tmp" "$record"
}

# now: t = the uptime in hundredths of a second (monotonic, no process started).
now() {
  read -r up _ < /proc/uptime
  frac=${up#*.}
  t=$((${up%.*} * 100 + ${frac#0}))
}

# bounded CMD...: CMD in a session of its own (so it can be stopped as a whole); after LIMIT
# seconds TERM, 5 s later KILL. Returns its exit status.
bounded() {
  if command -v setsid >/dev/null 2>&1; then setsid "$@" & else "$@" & fi
  child=$!
  put child "$child"
  watchdog=
  if [ "$limit" -gt 0 ]; then
    (
      trap 'kill "$nap" 2>/dev/null; exit 0' TERM
      sleep "$limit" & nap=$!
      wait "$nap"
      echo "waggle: $1 still running after $limit s: stopping it"
      kill -TERM "-$child" 2>/dev/null
      sleep 5 & nap=$!
      wait "$nap"
      kill -KILL "-$child" 2>/dev/null
    ) &
    watchdog=$!
  fi
  while :; do
    woken=
    wait "$child"
    ended=$?
    # A USR1 (see below) ends `wait` early: wait again while the command still runs.
    if [ -z "$woken" ] || ! kill -0 "$child" 2>/dev/null; then break; fi
  done
  [ -z "$watchdog" ] || kill "$watchdog" 2>/dev/null
  rm -f "$dir/child"
  return "$ended"
}

# What ran before: the running system, the profile's system and generation (system-N-link).
prev_system=$(readlink -e /run/current-system) || prev_system=
prev_boot=$(readlink -e "$profile" 2>/dev/null) || prev_boot=
prev_gen=$(readlink "$profile" 2>/dev/null) || prev_gen=
prev_gen=${prev_gen##*/}
prev_gen=${prev_gen#system-}
prev_gen=${prev_gen%-link}
case $prev_gen in '' | *[!0-9]*) prev_gen= ;; esac
put previous "system=$prev_system
profile=$prev_boot
generation=$prev_gen"

arm=
if [ "$window" -gt 0 ]; then
  case $goal in
    switch | test)
      if [ -n "$prev_system" ] && [ -x "$prev_system/bin/switch-to-configuration" ]; then
        arm=1
      else
        put armed "none: no previous system"
        echo "waggle: no rollback possible: there is no previous system (first deploy)"
      fi
      ;;
  esac
fi

# Nothing counts as activated while this run changes it (a failure half-way stays unrecorded).
case $goal in
  switch) rec_running='' && record boot ;;
  test) record running ;;
  boot) record boot ;;
esac

activated() { # record what a successful activation of $1 with goal $2 made true
  case $2 in
    switch) rec_running=$1 && record boot "$1" ;;
    test) record running "$1" ;;
    boot) record boot "$1" ;;
  esac
}

status=0
new_link=
if [ "$set_profile" = 1 ]; then
  nix-env --profile "$profile" --set "$toplevel" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "waggle: setting the system profile failed with exit status $status"
  fi
  new_link=$(readlink "$profile" 2>/dev/null) || new_link=
fi
if [ "$status" -eq 0 ]; then
  bounded "$toplevel/bin/switch-to-configuration" "$goal" || status=$?
fi
if [ "$status" -ne 0 ]; then
  arm=
elif [ -n "$arm" ]; then
  echo "waggle: rollback armed: back to $prev_system unless confirmed within $((window / 100)) s"
  put armed "armed $window"
else
  activated "$toplevel" "$goal"
fi
put status "$status"

# The rollback: the profile exactly one step back (the generation that was current before
# this run; never `--rollback`, which goes back from wherever the profile is now), then the
# previous system activated again (and, if it was not the boot default, that made the boot
# default again).
roll_back() {
  now
  began=$t
  put rollback-from "$(wc -c < "$dir/log")"
  echo "waggle: rolling back to $prev_system"
  rc=0
  if [ "$goal" = switch ]; then
    if [ -n "$prev_gen" ]; then
      nix-env --profile "$profile" --switch-generation "$prev_gen" || rc=$?
    elif [ -n "$new_link" ]; then
      rm -f -- "$profile" "${profile%/*}/$new_link" || rc=$?  # there was no profile before
    fi
    [ "$rc" -eq 0 ] || why="resetting the system profile failed with exit status $rc"
  fi
  if [ "$rc" -eq 0 ]; then
    if [ "$goal" = switch ] && [ "$prev_boot" = "$prev_system" ]; then
      bounded "$prev_system/bin/switch-to-configuration" switch || rc=$?
    else
      bounded "$prev_system/bin/switch-to-configuration" test || rc=$?
      if [ "$rc" -eq 0 ] && [ "$goal" = switch ] && [ -n "$prev_boot" ]; then
        bounded "$prev_boot/bin/switch-to-configuration" boot || rc=$?
      fi
    fi
    [ "$rc" -eq 0 ] || why="switch-to-configuration of $prev_system failed with exit status $rc"
  fi
  now
  if [ "$rc" -eq 0 ]; then
    activated "$prev_system" test
    [ "$goal" != switch ] || [ -z "$prev_boot" ] || activated "$prev_boot" boot
    echo "waggle: rolled back to $prev_system"
    put outcome "rolled-back $((t - began)) $prev_system"
  else
    echo "waggle: rollback failed: $why"
    put outcome "rollback-failed $why"
  fi
}

if [ -n "$arm" ]; then
  # Wait for the decision; once WINDOW has passed, decide to roll back (unless the deployer
  # was first). Whoever decides sends USR1, which ends the nap at once; naps of at most 1 s
  # bound the delay should the signal come between the check and the nap.
  now
  end=$((t + window))
  while [ ! -L "$dir/decision" ]; do
    now
    if [ "$t" -ge "$end" ]; then
      ln -s rollback "$dir/decision" 2>/dev/null && echo "waggle: not confirmed in time"
      break
    fi
    nap=$((end - t))
    [ "$nap" -le 100 ] || nap=100
    cs=$((nap % 100))
    [ "$cs" -ge 10 ] || cs=0$cs
    sleep "$((nap / 100)).$cs" &
    napping=$!
    wait "$napping"
    kill "$napping" 2>/dev/null
  done
  if [ "$(readlink "$dir/decision")" = confirm ]; then
    activated "$toplevel" "$goal"
    echo "waggle: confirmed"
    put outcome confirmed
  else
    roll_back
  fi
fi
# lock: leave
waggle_lock_leave
exit "$status"
