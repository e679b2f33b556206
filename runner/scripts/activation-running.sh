# shellcheck shell=sh
# A fragment that activation.py puts before activation-follow.sh and activation-stop.sh.
# A process is running when /proc/PID/stat exists and its state is not Z (zombie: PID 1
# may be slow to reap an orphan, and `kill -0` succeeds on zombies).
running() {
  read -r s < "/proc/$1/stat" 2>/dev/null || return 1
  s=${s##*) }
  [ "${s%% *}" != Z ]
}
