# shellcheck shell=sh
# Waggle's host lock (runner/deploy/lock.py) as shell functions, sent before lock.sh (the
# holder on a run's SSH channel) and before the activation runner (which holds the lock
# while it lives, the magic-rollback wait included).
#
# /run/waggle/lock lists the holders, one a line:
#   <pid> <boot id> <run id> <role> <start time of pid> <deployer host> <run start, UTC>
# A holder is alive while <pid> is a running process (not a zombie) of this boot with that
# start time (field 22 of /proc/<pid>/stat; a reused pid has another one). A run may lock
# the host when no live holder belongs to another run: a killed holder, a closed connection
# or a reboot frees the host by itself. The file is only read and changed under
# `flock /run/waggle/lock.guard` (util-linux), and replaced through a rename; every change
# drops the lines of dead holders. /run/waggle is root's, mode 0700.
#
#   waggle_lock_join ROLE [DEPLOYER STARTED]
#       adds this shell ($$) as a holder of run $WAGGLE_RUN_ID (DEPLOYER and STARTED are
#       copied from a live line of the same run when not given). Status 0: joined; 1: held by
#       another run (`held <run id> <deployer> <started>` on stdout); 2: cannot lock (one
#       line on stderr).
#   waggle_lock_leave
#       removes this shell's line (and dead ones). Status 0, or 2 as above.
# WAGGLE_LOCK_DIR replaces /run/waggle (for tests of these functions only).

waggle_lock_join() {
  _waggle_lock join "$1" "$$" "${2:--}" "${3:--}"
}

waggle_lock_leave() {
  _waggle_lock leave - "$$" - -
}

# _waggle_lock MODE ROLE PID DEPLOYER STARTED: checks its words, then edits under the guard.
_waggle_lock() {
  for _wl_word in "${WAGGLE_RUN_ID-}" "$2" "$4" "$5"; do
    case $_wl_word in
    '' | *[!A-Za-z0-9._:+-]*)
      echo "waggle: cannot lock the host: bad run id, role, deployer or time: '$_wl_word'" >&2
      return 2
      ;;
    esac
  done
  if ! command -v flock >/dev/null 2>&1; then
    echo "waggle: cannot lock the host: flock (util-linux) is not installed on it" >&2
    return 2
  fi
  _wl_dir=${WAGGLE_LOCK_DIR:-/run/waggle}
  if ! [ -d "$_wl_dir" ] && ! (umask 077 && mkdir -p -- "$_wl_dir"); then
    echo "waggle: cannot lock the host: cannot create $_wl_dir" >&2
    return 2
  fi
  if [ -L "$_wl_dir" ] || ! [ -O "$_wl_dir" ] || ! chmod 0700 -- "$_wl_dir"; then
    echo "waggle: cannot lock the host: $_wl_dir is not a directory of this user" >&2
    return 2
  fi
  {
    if ! flock -w 10 9; then
      echo "waggle: cannot lock the host: $_wl_dir/lock.guard stayed taken for 10 s" >&2
      return 2
    fi
    _waggle_lock_edit "$@"
  } 9>>"$_wl_dir/lock.guard"
}

# _waggle_lock_start PID: its start time in _wl_start; status 1 when it is not running.
_waggle_lock_start() {
  _wl_start=
  case $1 in '' | *[!0-9]*) return 1 ;; esac
  read -r _wl_stat 2>/dev/null <"/proc/$1/stat" || return 1
  _wl_stat=${_wl_stat##*) }
  case $_wl_stat in Z* | X*) return 1 ;; esac
  # Fields 3 (the state) to 22 (the start time): drop 19 of them.
  for _wl_n in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19; do
    _wl_stat=${_wl_stat#* }
  done
  _wl_start=${_wl_stat%% *}
  [ -n "$_wl_start" ]
}

# _waggle_lock_edit MODE ROLE PID DEPLOYER STARTED, under the guard: the file rewritten
# with the live holders (without PID's line for leave; with it for join, unless another
# run holds the host).
_waggle_lock_edit() {
  _wl_file=$_wl_dir/lock
  if ! read -r _wl_boot </proc/sys/kernel/random/boot_id || [ -z "$_wl_boot" ]; then
    echo "waggle: cannot lock the host: cannot read its boot id" >&2
    return 2
  fi
  _wl_keep='' _wl_held='' _wl_dep=$4 _wl_since=$5
  if [ -f "$_wl_file" ]; then
    while read -r _wl_p _wl_b _wl_r _wl_role _wl_st _wl_d _wl_s _wl_rest; do
      # Dead holders (another boot, no such process, a reused pid) and PID's own line go.
      [ "$_wl_b" = "$_wl_boot" ] || continue
      _waggle_lock_start "$_wl_p" || continue
      [ "$_wl_start" = "$_wl_st" ] || continue
      [ "$_wl_p" != "$3" ] || continue
      if [ "$_wl_r" != "$WAGGLE_RUN_ID" ]; then
        _wl_held="$_wl_r $_wl_d $_wl_s"
      elif [ "$_wl_dep" = - ]; then
        _wl_dep=$_wl_d _wl_since=$_wl_s
      fi
      _wl_keep="$_wl_keep$_wl_p $_wl_b $_wl_r $_wl_role $_wl_st $_wl_d $_wl_s
"
    done <"$_wl_file"
  fi
  if [ "$1" = join ] && [ -z "$_wl_held" ]; then
    if ! _waggle_lock_start "$3"; then
      echo "waggle: cannot lock the host: cannot read the start time of process $3" >&2
      return 2
    fi
    _wl_keep="$_wl_keep$3 $_wl_boot $WAGGLE_RUN_ID $2 $_wl_start ${_wl_dep:--} ${_wl_since:--}
"
  fi
  if ! { printf %s "$_wl_keep" >"$_wl_file.tmp" && mv -f -- "$_wl_file.tmp" "$_wl_file"; }; then
    echo "waggle: cannot lock the host: cannot write $_wl_file" >&2
    return 2
  fi
  if [ "$1" = join ] && [ -n "$_wl_held" ]; then
    echo "held $_wl_held"
    return 1
  fi
  return 0
}
