# shellcheck shell=sh
# The destDir check of both key scripts, as a function that comes before each of them:
# runner/scripts/write-key.sh (the upload; runner/deploy/keys.py sends this file, then it)
# and chown-key.sh (activation's chown; modules.nix reads this file, then it). It lives
# here, beside the Nix files, because only this directory is copied into the store.
#
# `waggle_dest_dir PREFIX DIR CREATE` returns 0 when DIR is safe to hold a key, and 1 with
# a line on stderr that starts with PREFIX when it is not (after mkdir's own, when mkdir
# fails). DIR must be an absolute path without a `..` component, and every directory from
# / down to DIR must be a directory owned by root (or by the user running this, for
# write-key.sh; activation runs as root) and not group- or world-writable unless sticky,
# so nobody else can swap a name in it. Directories that do not exist yet come last (a
# missing directory has no subdirectories): with CREATE 1 they are created, mode 0755, one
# level at a time, each in a parent that passed; otherwise the first one is refused.
# One stat reads the owner and mode of every existing directory (each process costs about
# a millisecond on a host, per key); one that cannot be read is refused.
# Function-local names start with waggle_dd_ (POSIX sh has no `local`).

waggle_dd_unsafe() { # $1 why DIR is refused
    printf '%s\n' "${waggle_dd_prefix}unsafe destDir $waggle_dd_dir: $1" >&2
}

waggle_dest_dir() {
    waggle_dd_prefix=$1 waggle_dd_dir=$2 waggle_dd_create=$3
    case $waggle_dd_dir in
    /*) ;;
    *)
        waggle_dd_unsafe "not an absolute path"
        return 1
        ;;
    esac
    # Every directory from / down to DIR, as the positional parameters.
    set -- /
    waggle_dd_path='' waggle_dd_rest=${waggle_dd_dir#/}
    while [ -n "$waggle_dd_rest" ]; do
        waggle_dd_part=${waggle_dd_rest%%/*}
        case $waggle_dd_rest in
        */*) waggle_dd_rest=${waggle_dd_rest#*/} ;;
        *) waggle_dd_rest='' ;;
        esac
        case $waggle_dd_part in
        '' | .) continue ;;
        ..)
            waggle_dd_unsafe "it must not contain .."
            return 1
            ;;
        esac
        waggle_dd_path=$waggle_dd_path/$waggle_dd_part
        set -- "$@" "$waggle_dd_path"
    done
    # The existing ones (the first waggle_dd_left) must be directories; one stat reads them
    # all, in order (the missing ones print nothing), and each line is checked and shifted.
    waggle_dd_left=0
    for waggle_dd_p do
        if [ ! -e "$waggle_dd_p" ] && [ ! -L "$waggle_dd_p" ]; then
            break
        fi
        if [ ! -d "$waggle_dd_p" ]; then
            waggle_dd_unsafe "$waggle_dd_p is not a directory"
            return 1
        fi
        waggle_dd_left=$((waggle_dd_left + 1))
    done
    waggle_dd_info=$(stat -L -c '%u %a' -- "$@" 2>/dev/null) || true
    while read -r waggle_dd_owner waggle_dd_perm; do
        case $waggle_dd_owner in
        '' | *[!0-9]*) break ;; # not an owner: refused below
        esac
        case $waggle_dd_perm in
        '' | *[!0-7]*) break ;; # not a mode: refused below
        esac
        if [ "$waggle_dd_owner" != 0 ] && ! [ -O "$1" ]; then
            waggle_dd_unsafe "$1 is owned by uid $waggle_dd_owner, not root"
            return 1
        fi
        if [ $((0$waggle_dd_perm & 022)) != 0 ] && [ $((0$waggle_dd_perm & 01000)) = 0 ]; then
            waggle_dd_unsafe "$1 is group- or world-writable without the sticky bit"
            return 1
        fi
        waggle_dd_left=$((waggle_dd_left - 1))
        shift
    done <<WAGGLE_DIRS
$waggle_dd_info
WAGGLE_DIRS
    if [ "$waggle_dd_left" != 0 ]; then
        waggle_dd_unsafe "cannot read the owner and mode of $1"
        return 1
    fi
    for waggle_dd_p do
        if [ "$waggle_dd_create" != 1 ]; then
            waggle_dd_unsafe "$waggle_dd_p is not a directory"
            return 1
        fi
        mkdir -m 0755 -- "$waggle_dd_p" || {
            printf '%s\n' "${waggle_dd_prefix}cannot create $waggle_dd_p" >&2
            return 1
        }
    done
}
