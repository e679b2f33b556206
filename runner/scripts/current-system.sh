# shellcheck shell=sh
# `sh -c "$(cat current-system.sh)" sh PATH...`: each path resolved (readlink -e), an empty
# line when it is not.
for p in "$@"; do readlink -e -- "$p" || echo; done
