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
# in it), and the owner is set with `chown -h` on that name.
# Function-local names start with waggle_ (POSIX sh has no `local`).

waggle_dir_ok() { # $1 a directory, $2 the key's destDir (for the message)
    if [ ! -d "$1" ]; then
        echo "waggle: unsafe destDir $2: $1 is not a directory" >&2
        return 1
    fi
    waggle_stat=$(stat -L -c '%u %a' -- "$1") || return 1
    waggle_owner=${waggle_stat% *} waggle_perm=${waggle_stat#* }
    if [ "$waggle_owner" != 0 ]; then
        echo "waggle: unsafe destDir $2: $1 is owned by uid $waggle_owner, not root" >&2
        return 1
    fi
    if [ $((0$waggle_perm & 022)) != 0 ] && [ $((0$waggle_perm & 01000)) = 0 ]; then
        echo "waggle: unsafe destDir $2: $1 is group- or world-writable without the sticky bit" >&2
        return 1
    fi
}

waggle_chown_key() { # $1 the key's path, $2 USER:GROUP
    if [ ! -e "$1" ] && [ ! -L "$1" ]; then
        echo "waggle: key $1 does not exist; not changing its owner" >&2
        return 0
    fi
    waggle_dir=${1%/*}
    waggle_dir=${waggle_dir:-/}
    waggle_dir_ok / "$waggle_dir" || return 1
    waggle_path='' waggle_rest=${waggle_dir#/}
    while [ -n "$waggle_rest" ]; do
        waggle_part=${waggle_rest%%/*}
        case $waggle_rest in
        */*) waggle_rest=${waggle_rest#*/} ;;
        *) waggle_rest='' ;;
        esac
        case $waggle_part in
        '' | .) continue ;;
        ..)
            echo "waggle: unsafe destDir $waggle_dir: it must not contain .." >&2
            return 1
            ;;
        esac
        waggle_path=$waggle_path/$waggle_part
        waggle_dir_ok "$waggle_path" "$waggle_dir" || return 1
    done
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
