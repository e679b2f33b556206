# shellcheck shell=sh
# Part of the waggle-chown-keys activation snippet (modules.nix): gives a pre-activation
# key to its owner once activation has created users and groups (Colmena's
# colmena-chown-keys). Runs as root, inside NixOS' activation script (bash; sh-compatible).
#
# `waggle_chown_key PATH USER:GROUP` returns 0 when the owner is set or there is no key
# (not uploaded yet), 1 with a line on stderr when it refuses or chown fails. It never
# follows a symlink and cannot be pointed at another file: the key must be a regular file
# with a single link, in a directory that - like every directory above it - is owned by
# root and not group- or world-writable unless sticky (so nobody but root can swap a name
# in it; waggle_dest_dir, from dest-dir-lib.sh, which modules.nix puts before this file),
# and the owner is set with `chown -h` on that name.
# Function-local names start with waggle_ (POSIX sh has no `local`).

waggle_chown_key() { # $1 the key's path, $2 USER:GROUP
    if [ ! -e "$1" ] && [ ! -L "$1" ]; then
        echo "waggle: key $1 does not exist; not changing its owner" >&2
        return 0
    fi
    waggle_dir=${1%/*}
    waggle_dest_dir 'waggle: ' "${waggle_dir:-/}" 0 || return 1
    if [ -L "$1" ] || [ ! -f "$1" ]; then
        echo "waggle: key $1 is not a regular file; not changing its owner" >&2
        return 1
    fi
    if [ "$(stat -c '%h' -- "$1")" != 1 ]; then
        echo "waggle: key $1 has more than one link; not changing its owner" >&2
        return 1
    fi
    chown -h -- "$2" "$1"
}
