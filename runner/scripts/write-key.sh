# shellcheck shell=sh
# Install one deployment key on a host, as root:
# `sh -c "$(cat dest-dir-lib.sh write-key.sh)" sh ARGS...` (runner/deploy/keys.py).
#   $1 destDir   $2 file name   $3 temporary file name (in destDir)
#   $4 user   $5 group   $6 mode (octal)   $7 "1": the owner must exist
# stdin: the key's content (never an argument). stdout: "waggle: owner-deferred" when the
# owner does not exist yet and the key stays root's (pre-activation keys; activation chowns).
# Any failure: exit 1 with one line on stderr, and no temporary file left.
#
# No path is followed twice. Every directory from / down to destDir must be owned by root
# (or by the user running this) and not group- or world-writable unless sticky, so nobody
# else can swap a name in it; missing ones are created, each in a parent that passed
# (waggle_dest_dir, in runner/hive/nix/dest-dir-lib.sh, which is sent first). The
# temporary file is created with noclobber (O_EXCL: an existing name, symlink or not, is
# refused), owner and mode are set on the open file (/proc/self/fd/3, which is the file
# itself whatever its name points to by then), and it is renamed over the destination
# (atomic) only while its name still is that file.
# Few processes: each one costs about a millisecond on the host, per key.
set -eu
dir=$1 name=$2 tmp=$3 user=$4 group=$5 mode=$6 strict=$7

fail() {
    printf '%s\n' "$*" >&2
    exit 1
}

# destDir checked, its missing directories created (mode 0755).
umask 022
waggle_dest_dir '' "$dir" 1 || exit 1
cd -P -- "$dir"

umask 077
set -C
exec 3>"$tmp"
set +C
# noclobber still opens an existing symlink to a device or FIFO: it must be a new file.
if [ ! -f /proc/self/fd/3 ] || [ -s /proc/self/fd/3 ]; then
    fail "$dir/$tmp is not a new regular file"
fi
# From here on the temporary name is ours: remove it whatever happens.
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM PIPE
cat >&3

if ! chown -- "$user:$group" /proc/self/fd/3 2>/dev/null; then
    missing=
    getent passwd "$user" >/dev/null || missing="user $user"
    getent group "$group" >/dev/null || missing="${missing:+$missing, }group $group"
    if [ -z "$missing" ]; then
        chown -- "$user:$group" /proc/self/fd/3 # again, for its error
    elif [ "$strict" = 1 ]; then
        fail "owner not found on the host: $missing"
    else
        echo 'waggle: owner-deferred'
    fi
fi
chmod -- "$mode" /proc/self/fd/3

# -ef (same device and inode): not POSIX, but in dash, bash and busybox sh alike.
# shellcheck disable=SC3013
if [ -L "$tmp" ] || ! [ "$tmp" -ef /proc/self/fd/3 ]; then
    fail "$dir/$tmp was replaced while it was written"
fi
exec 3>&-
mv -f -T -- "$tmp" "$name"
