# shellcheck shell=sh
# What Waggle asks a host before deploying to it, in one go (runner/deploy/hoststate.py):
# `waggle_query RECORD BYTES`, with BYTES bytes of store paths (one a line) on stdin, read
# exactly (what follows on stdin stays for the caller: lock.sh's heartbeat). Sent before
# lock.sh (the host lock's channel answers it once it holds the lock), or alone as
# `sh -c "$(cat host-query.sh) waggle_query \"\$@\"" sh RECORD BYTES`. Prints:
#   current:<resolved /run/current-system, or nothing>
#   profile:<resolved system profile, or nothing>
#   record:<line>   each line of RECORD (what Waggle's activation runner recorded)
#   paths:          then each path of stdin that is not valid in the store, one a line
#   query:<status>  nix-store's exit status (0: the list is complete); its error on stderr
# Few processes (each costs the host a fork and exec): links are resolved with `cd -P` in
# a subshell (a system is a directory), the record is read by the shell.
waggle_query() {
  printf 'current:%s\n' "$(cd -P -- /run/current-system 2>/dev/null && pwd -P)"
  printf 'profile:%s\n' "$(cd -P -- /nix/var/nix/profiles/system 2>/dev/null && pwd -P)"
  if [ -r "$1" ]; then
    while IFS= read -r _wq_line; do echo "record:$_wq_line"; done < "$1"
  fi
  echo paths:
  if [ "$2" -gt 0 ]; then
    head -c "$2" | xargs -r nix-store --check-validity --print-invalid
  fi
  echo "query:$?"
}
