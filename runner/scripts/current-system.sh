# shellcheck shell=sh
# `sh -c "$(cat current-system.sh)" sh RECORD PATH...`: each PATH resolved (readlink -e), an
# empty line when it is not; then the lines of RECORD, what Waggle's activation runner
# recorded as activated here (`running <system>`, `boot <system>`), if it exists.
record=$1
shift
for p in "$@"; do readlink -e -- "$p" || echo; done
[ ! -r "$record" ] || cat -- "$record"
