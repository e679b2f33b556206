# shellcheck shell=sh
# The holder of a run's host lock (runner/deploy/lock.py), on a channel of the run's SSH
# connection: `sh -c "$(cat lock-lib.sh host-query.sh lock.sh)" sh RUN_ID DEPLOYER STARTED IDLE
# [RECORD BYTES]`. Joins the lock (role `connection`) and prints `locked`; with BYTES, then
# answers the query on the first BYTES bytes of stdin (`waggle_query RECORD BYTES`, see
# host-query.sh: one command fewer per host). Then holds the lock while its stdin stays
# open and something arrives on it at least every IDLE seconds (Waggle's heartbeat).
# At EOF (Waggle is done, or the connection closed), after IDLE silent seconds (a
# connection that died without closing) or on SIGHUP/SIGTERM it leaves the lock, exit 0.
# Held by another run: `held <run id> <deployer> <started>` on stdout, exit 3. Cannot lock:
# `failed` on stdout, the reason on stderr, exit 2. Killed (SIGKILL), it leaves its line
# behind, which counts as free: the process is gone.
WAGGLE_RUN_ID=$1
export WAGGLE_RUN_ID
idle=$4
waggle_lock_join connection "$2" "$3"
case $? in
0) ;;
1) exit 3 ;;
*)
  echo failed
  exit 2
  ;;
esac
trap 'waggle_lock_leave; exit 0' HUP INT TERM PIPE
echo locked
[ -z "${6-}" ] || waggle_query "$5" "$6"
if command -v timeout >/dev/null 2>&1; then
  # Each heartbeat is a few bytes; EOF reads nothing, silence makes timeout fail.
  while got=$(timeout "$idle" dd bs=64 count=1 2>/dev/null) && [ -n "$got" ]; do :; done
else
  cat >/dev/null
fi
trap - HUP INT TERM PIPE
waggle_lock_leave
exit 0
