# shellcheck shell=sh
# The last part of the launch (activation-setup.sh comes first, with DIR METHOD UNIT
# DESCRIPTION RUNNER...): starts RUNNER as the transient unit UNIT (systemd-run, with the
# session's PATH and LOCALE_ARCHIVE, as nixos-rebuild passes them) or detached. With METHOD
# auto, a systemd-run that refuses (systemd without D-Bus) falls back to detached. Writes
# DIR/method and prints `method=<the one used>`.
dir=$1 asked=$2 unit=$3 description=$4
shift 4
if [ "$method" = systemd-run ]; then
  # Its own unit, hence its own cgroup: stopping or restarting sshd.service or the SSH
  # session's scope (network units restarted by the activation) does not touch it. Stopping
  # the unit TERMs the runner first, then whatever is left. Waggle bounds the activation
  # itself (and kills the unit when that expires); --no-block returns once it is queued.
  if ! systemd-run --unit="$unit" --description="$description" --collect --no-block --quiet \
    --no-ask-password --service-type=exec --property=TimeoutStartSec=infinity \
    --property=KillMode=mixed --property=SendSIGHUP=no \
    ${PATH:+"--setenv=PATH=$PATH"} ${LOCALE_ARCHIVE:+"--setenv=LOCALE_ARCHIVE=$LOCALE_ARCHIVE"} \
    "$@"; then
    [ "$asked" = auto ] || exit 1
    method=detached
  fi
fi
if [ "$method" = detached ]; then
  detach "$dir/log" "$@" || exit 1
fi
echo "$method" > "$dir/method"
echo "method=$method"
