# shellcheck shell=sh
# Install one deployment key on a host, as root: `sh -c "$(cat write-key.sh)" sh ARGS...`.
#   $1 destDir   $2 file name   $3 temporary file name (in destDir)
#   $4 user   $5 group   $6 mode (octal)   $7 "1": the owner must exist
# stdin: the key's content (never an argument). stdout: "waggle: owner-deferred" when the
# owner does not exist yet and the key stays root's (pre-activation keys; activation chowns).
# Any failure: exit 1 with one line on stderr, and no temporary file left.
#
# No path is followed twice. Every directory from / down to destDir must be owned by root
# (or by the user running this) and not group- or world-writable unless sticky, so nobody
# else can swap a name in it; missing ones are created, each in a parent that passed. The
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

case $dir in
/*) ;;
*) fail "unsafe destDir $dir: not an absolute path" ;;
esac
# Every directory from / down to destDir, as the positional parameters.
set -- /
path='' rest=${dir#/}
while [ -n "$rest" ]; do
    part=${rest%%/*}
    case $rest in
    */*) rest=${rest#*/} ;;
    *) rest='' ;;
    esac
    case $part in
    '' | .) continue ;;
    ..) fail "unsafe destDir $dir: it must not contain .." ;;
    esac
    path=$path/$part
    set -- "$@" "$path"
done
# Those that exist come first (a missing directory has no subdirectories): one stat checks
# them all, in order; the rest are then created one level at a time.
for p do
    if [ ! -e "$p" ] && [ ! -L "$p" ]; then
        break
    fi
    if [ ! -d "$p" ]; then
        fail "unsafe destDir $dir: $p is not a directory"
    fi
done
info=$(stat -L -c '%u %a' -- "$@" 2>/dev/null) || true
while read -r owner perm; do
    if [ "$owner" != 0 ] && ! [ -O "$1" ]; then
        fail "unsafe destDir $dir: $1 is owned by uid $owner, not root"
    fi
    if [ $((0$perm & 022)) != 0 ] && [ $((0$perm & 01000)) = 0 ]; then
        fail "unsafe destDir $dir: $1 is group- or world-writable without the sticky bit"
    fi
    shift
done <<DIRS
$info
DIRS
umask 022
for p do
    mkdir -m 0755 -- "$p" || fail "cannot create $p"
done
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
