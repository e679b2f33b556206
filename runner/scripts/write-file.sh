# shellcheck shell=sh
# Write a file on a host: `sh -c "$(cat write-file.sh)" sh PATH MODE SUFFIX`.
# stdin: the content (never an argument). The content goes to a new temporary file next to
# PATH (created with noclobber: an existing name, symlink or not, is refused), its mode is
# set on the open file, and it is renamed over PATH: a symlink at PATH is replaced, never
# followed. Any failure: exit 1 with one line on stderr, and no temporary file left.
set -eu
path=$1 mode=$2 suffix=$3
case $path in
*/*) dir=${path%/*} ;;
*) dir=. ;;
esac
tmp=${dir:-/}/.${path##*/}.waggle-$suffix
umask 077
set -C
exec 3>"$tmp"
set +C
# noclobber still opens an existing symlink to a device or FIFO: it must be a new file.
if [ ! -f /proc/self/fd/3 ] || [ -s /proc/self/fd/3 ]; then
    printf '%s\n' "$tmp is not a new regular file" >&2
    exit 1
fi
# From here on the temporary name is ours: remove it whatever happens.
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM PIPE
cat >&3
chmod -- "$mode" /proc/self/fd/3
exec 3>&-
mv -f -T -- "$tmp" "$path"
