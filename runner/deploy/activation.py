"""Activation and reboot of a node's host, surviving dropped SSH connections.

Colmena runs `switch-to-configuration` inside the SSH session, so a network restart during
activation kills or hangs it (#343, #290, #262), and it waits for a rebooted host forever
(#166, #303, #315). Waggle instead:

- starts the activation detached on the host: a runner script in a per-run directory
  `/run/waggle/activation-<id>/` (`run.sh`, `log`, `pid`, `status`), as a transient systemd
  unit where systemd runs, else as a process in a session of its own (`setsid -f`);
- follows its log with a separate command that prints every log line with its byte offset
  (`<offset>:<text>`, from GNU grep's `-b`) and, once the runner is done, `status:<code>`.
  After a lost connection it reconnects and follows again from the start of the last line
  it delivered, skipping lines it has already seen, so no line is lost or duplicated;
- bounds everything: the whole activation by `timeout` (a timed-out activation is killed
  on the host), reconnecting by `reconnect_timeout`, a reboot wait by its `timeout`.

Every remote command is an argv quoted per argument; the shell scripts here are constants
that take their values as positional parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from runner.errors import WaggleError
from runner.goals import ACTIVATION_GOALS
from runner.hosts import Host, RemoteResult

Method = Literal["systemd-run", "detached"]
MethodChoice = Literal["auto", "systemd-run", "detached"]
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
CURRENT_SYSTEM = "/run/current-system"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
STATE_DIR = "/run/waggle"
LOG_TAIL_LINES = 20
START_WAIT = 30  # seconds the follower waits for the runner to write its pid
STEP_TIMEOUT = 30.0  # bound of one short remote step (read a link, write a script)
GRACE = 15.0  # allowed past a deadline to stop a timed-out activation and clean up
RECONNECT_BACKOFF = (0.1, 2.0)  # first and largest pause between reconnect attempts


class ActivationError(WaggleError):
    """A host could not be asked about its system (exit 1: the node fails)."""

    exit_code = 1


@dataclass(frozen=True)
class ActivationResult:
    ok: bool
    exit_status: int | None  # of the runner: nix-env's if setting the profile failed
    log_tail: str  # the last LOG_TAIL_LINES lines of the activation's output
    seconds: float
    reconnects: int
    method: Method
    message: str  # "Activation successful", "Activation failed: exit status 1", ...
    timed_out: bool = False


@dataclass(frozen=True)
class RebootResult:
    ok: bool
    message: str
    seconds: float
    old_boot_id: str | None
    new_boot_id: str | None
    current: str | None = None  # /run/current-system after the reboot, if checked


@dataclass(frozen=True)
class CurrentSystem:
    current: str | None  # /run/current-system, resolved; None if missing or dangling
    profile: str | None  # /nix/var/nix/profiles/system, resolved; None likewise


@runtime_checkable
class Reconnectable(Protocol):
    async def reconnect(self) -> None: ...


# -- scripts run on the host (values only as positional parameters) --------------------

# sh -c SETUP sh DIR METHOD < RUNNER: make the run directory, report method and PATH.
SETUP_SCRIPT = """\
set -e
dir=$1 method=$2
umask 077
mkdir -p -- "$dir"
cat > "$dir/run.sh"
: > "$dir/log"
if [ "$method" = auto ]; then
  if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
    method=systemd-run
  else
    method=detached
  fi
fi
printf 'method=%s\\nPATH=%s\\nLOCALE_ARCHIVE=%s\\n' "$method" "$PATH" "${LOCALE_ARCHIVE-}"
"""

# /bin/sh DIR/run.sh DIR TOPLEVEL GOAL SET_PROFILE(1|0)
RUNNER_SCRIPT = """\
# Waggle activation runner (runner/activation.py): DIR TOPLEVEL GOAL SET_PROFILE
dir=$1 toplevel=$2 goal=$3 set_profile=$4
echo "$$" > "$dir/pid.tmp" && mv -f "$dir/pid.tmp" "$dir/pid"
exec </dev/null >>"$dir/log" 2>&1
status=0
if [ "$set_profile" = 1 ]; then
  nix-env --profile /nix/var/nix/profiles/system --set "$toplevel" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "waggle: setting the system profile failed with exit status $status"
  fi
fi
if [ "$status" -eq 0 ]; then
  "$toplevel/bin/switch-to-configuration" "$goal" || status=$?
fi
echo "$status" > "$dir/status.tmp" && mv -f "$dir/status.tmp" "$dir/status"
exit "$status"
"""

# sh -c DETACH sh LOG ARGV...: ARGV in a session of its own, stdin /dev/null, output to LOG.
DETACH_SCRIPT = 'log=$1; shift; exec setsid -f "$@" </dev/null >>"$log" 2>&1'

# A process is running when /proc/PID/stat exists and its state is not Z (zombie: PID 1
# may be slow to reap an orphan, and `kill -0` succeeds on zombies).
_RUNNING = """\
running() {
  read -r s < "/proc/$1/stat" 2>/dev/null || return 1
  s=${s##*) }
  [ "${s%% *}" != Z ]
}
"""

# sh -c FOLLOW sh DIR OFFSET START_WAIT: the log from byte OFFSET as it grows, each line as
# `<offset relative to OFFSET>:<text>`, then `status:<code>` (or `status:none` when the
# runner died without one, `status:unstarted` when it never wrote its pid).
FOLLOW_SCRIPT = (
    _RUNNING
    + """\
dir=$1 off=$2 wait=$3
n=0
while [ ! -e "$dir/pid" ] && [ ! -e "$dir/status" ]; do
  if [ "$n" -ge $((wait * 20)) ]; then echo status:unstarted; exit 0; fi
  n=$((n + 1))
  sleep 0.05
done
pid=
read -r pid < "$dir/pid" 2>/dev/null
last=
# Poll quickly at first (most activations are short), then back off to 0.4 s so
# many hosts' followers do not keep the host busy.
delay=0.05
while :; do
  [ -e "$dir/status" ] && last=1
  size=$(wc -c < "$dir/log" 2>/dev/null) || { size=$off; last=1; }
  if [ "$size" -gt "$off" ]; then
    tail -c "+$((off + 1))" "$dir/log" | head -c "$((size - off))"
    off=$size
  fi
  [ -n "$last" ] && break
  if ! running "$pid"; then last=1; continue; fi
  sleep "$delay"
  case $delay in 0.05) delay=0.1 ;; 0.1) delay=0.2 ;; *) delay=0.4 ;; esac
done | LC_ALL=C grep -a -b --line-buffered ''
if [ -e "$dir/status" ]; then echo "status:$(cat "$dir/status")"; else echo status:none; fi
"""
)

# sh -c STOP sh DIR UNIT: TERM the activation (unit and process group), KILL after 2 s,
# remove the run directory. UNIT is empty for a detached activation.
STOP_SCRIPT = (
    _RUNNING
    + """\
dir=$1 unit=$2
pid=
read -r pid < "$dir/pid" 2>/dev/null
case $pid in ''|*[!0-9]*|0|1) pid= ;; esac
signal() {
  [ -z "$unit" ] || systemctl kill --signal="$1" "$unit" >/dev/null 2>&1
  [ -z "$pid" ] || kill "-$1" "-$pid" 2>/dev/null
}
signal TERM
n=0
while [ -n "$pid" ] && [ "$n" -lt 20 ] && running "$pid"; do
  n=$((n + 1))
  sleep 0.1
done
signal KILL
rm -rf -- "$dir"
"""
)

# sh -c CURRENT sh PATH...: each path resolved (readlink -e), an empty line when it is not.
CURRENT_SCRIPT = 'for p in "$@"; do readlink -e -- "$p" || echo; done'


def _new_run_id() -> str:
    return uuid.uuid4().hex


def run_directory(run_id: str, state_dir: str = STATE_DIR) -> str:
    return f"{state_dir}/activation-{run_id}"


def unit_name(run_id: str) -> str:
    """The transient unit's name, as given to `systemd-run --unit=` (".service" implied)."""
    return f"waggle-activate-{run_id}"


def launch_argv(
    method: Method,
    directory: str,
    toplevel: str,
    goal: str,
    *,
    set_profile: bool,
    run_id: str,
    env: Mapping[str, str],
) -> list[str]:
    """The argv that starts the runner on the host (exactly what is sent, quoted per argument)."""
    runner = [
        "/bin/sh",
        f"{directory}/run.sh",
        directory,
        toplevel,
        goal,
        "1" if set_profile else "0",
    ]
    if method == "detached":
        return ["sh", "-c", DETACH_SCRIPT, "sh", f"{directory}/log", *runner]
    return [
        "systemd-run",
        f"--unit={unit_name(run_id)}",
        f"--description=Waggle activation: {goal} {toplevel}",
        "--collect",  # unload the unit once it has ended, failed or not
        "--no-block",  # return once queued; the follower watches it
        "--quiet",
        "--no-ask-password",
        "--service-type=exec",  # a runner that cannot be executed fails the start
        # Waggle bounds the activation itself (and kills the unit when that expires).
        "--property=TimeoutStartSec=infinity",
        # Its own unit, hence its own cgroup: stopping or restarting sshd.service or the
        # SSH session's scope (network units restarted by the activation) does not touch
        # it. Stopping the unit TERMs the runner first, then whatever is left.
        "--property=KillMode=mixed",
        "--property=SendSIGHUP=no",
        # The SSH session's PATH (nix-env, activation hooks) and LOCALE_ARCHIVE, as
        # nixos-rebuild passes it; a unit would otherwise get systemd's defaults.
        *(f"--setenv={k}={v}" for k, v in env.items() if v),
        *runner,
    ]


# -- remote steps, bounded, never raising ----------------------------------------------


async def _run(
    host: Host,
    argv: Sequence[str],
    *,
    timeout: float,
    input_data: bytes | None = None,
    on_line: Callable[[str], None] | None = None,
) -> RemoteResult:
    """host.run bounded by `timeout` (connecting included); a host error counts as lost."""
    timeout = max(timeout, 0.05)
    began = time.monotonic()
    try:
        return await asyncio.wait_for(
            host.run(argv, input_data=input_data, timeout=timeout, on_line=on_line),
            timeout + 1.0,
        )
    except TimeoutError:
        return RemoteResult(tuple(argv), None, "", "", time.monotonic() - began, timed_out=True)
    except (WaggleError, OSError) as e:
        return RemoteResult(tuple(argv), None, "", str(e), time.monotonic() - began, lost=True)


async def _reconnect(host: Host, give_up_at: float) -> bool:
    """Reconnect, retrying with backoff until `give_up_at` (monotonic); whether it worked."""
    pause, largest = RECONNECT_BACKOFF
    while True:
        left = give_up_at - time.monotonic()
        if left <= 0:
            return False
        try:
            if isinstance(host, Reconnectable):
                await asyncio.wait_for(host.reconnect(), left)
                return True
            probe = await _run(host, ["true"], timeout=left)
            if probe.ok:
                return True
        except (WaggleError, OSError, TimeoutError):
            pass
        await asyncio.sleep(max(0.0, min(pause, give_up_at - time.monotonic())))
        pause = min(pause * 2, largest)


async def _run_retrying(
    host: Host,
    argv: Sequence[str],
    *,
    deadline: float,
    reconnect_timeout: float,
    input_data: bytes | None = None,
) -> tuple[RemoteResult, int]:
    """Run an idempotent command, reconnecting and retrying after a lost connection."""
    reconnects = 0
    while True:
        done = await _run(host, argv, timeout=deadline - time.monotonic(), input_data=input_data)
        if not done.lost:
            return done, reconnects
        if not await _reconnect(host, min(time.monotonic() + reconnect_timeout, deadline)):
            return done, reconnects
        reconnects += 1


class _Follower:
    """Turns the follow command's lines into log lines, each delivered exactly once."""

    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line = on_line
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.base = 0  # byte offset the current follow command started at
        self.last_start = -1  # byte offset of the last line delivered
        self.status: str | None = None

    def begin(self) -> int:
        """The byte offset to follow from: the start of the last line delivered."""
        self.base = max(self.last_start, 0)
        self.status = None
        return self.base

    def line(self, text: str) -> None:
        if text.startswith("status:"):
            self.status = text.removeprefix("status:").strip()
            return
        offset, sep, body = text.partition(":")
        if not sep or not offset.isdigit():
            return
        start = self.base + int(offset)
        if start <= self.last_start:
            return  # seen before the connection dropped
        self.last_start = start
        self.tail.append(body)
        if self.on_line is not None:
            self.on_line(body)


async def activate(
    host: Host,
    toplevel: str,
    goal: str,
    *,
    set_profile: bool,
    timeout: float,
    on_line: Callable[[str], None] | None = None,
    reconnect_timeout: float = 60.0,
    method: MethodChoice = "auto",
    state_dir: str = STATE_DIR,
) -> ActivationResult:
    """Set the profile (if asked) and run `<toplevel>/bin/switch-to-configuration <goal>`.

    Runs detached on the host, so it survives the SSH connection dropping; streams the
    output to `on_line`; reconnects after a drop (for up to `reconnect_timeout` s); kills it
    on the host when `timeout` expires. Never raises for a failure on the host: the result
    says what happened. Returns within `timeout` plus a few seconds of clean-up.
    """
    if goal not in ACTIVATION_GOALS:
        raise ValueError(f"not an activation goal: {goal!r} (one of {', '.join(ACTIVATION_GOALS)})")
    if not toplevel.startswith("/"):
        raise ValueError(f"not a store path: {toplevel!r}")
    began = time.monotonic()
    deadline = began + timeout
    run_id = _new_run_id()
    directory = run_directory(run_id, state_dir)
    follower = _Follower(on_line)
    reconnects = 0
    chosen: Method = "systemd-run" if method == "systemd-run" else "detached"

    def result(
        ok: bool, message: str, status: int | None = None, *, timed_out: bool = False
    ) -> ActivationResult:
        return ActivationResult(
            ok=ok,
            exit_status=status,
            log_tail="\n".join(follower.tail),
            seconds=time.monotonic() - began,
            reconnects=reconnects,
            method=chosen,
            message=message,
            timed_out=timed_out,
        )

    async def stop(unit: str) -> bool:
        """Kill the activation and remove the run directory; whether that was done."""
        give_up = time.monotonic() + GRACE
        argv = ["sh", "-c", STOP_SCRIPT, "sh", directory, unit]
        done = await _run(host, argv, timeout=GRACE)
        if done.lost and await _reconnect(host, give_up):
            done = await _run(host, argv, timeout=give_up - time.monotonic())
        return done.ok

    # 1. The run directory, the runner script, the method.
    setup, n = await _run_retrying(
        host,
        ["sh", "-c", SETUP_SCRIPT, "sh", directory, method],
        deadline=min(deadline, time.monotonic() + STEP_TIMEOUT),
        reconnect_timeout=reconnect_timeout,
        input_data=RUNNER_SCRIPT.encode(),
    )
    reconnects += n
    if not setup.ok:
        return result(False, f"Activation failed: could not prepare it: {setup.describe()}")
    info: dict[str, str] = {}
    for line in setup.stdout.splitlines():
        key, _, value = line.partition("=")
        info[key] = value
    chosen = "systemd-run" if info.get("method") == "systemd-run" else "detached"
    env = {k: info.get(k, "") for k in ("PATH", "LOCALE_ARCHIVE")}

    # 2. Start the runner. A lost connection may or may not have started it: the follower
    # finds out (it reports `unstarted` if no pid appears).
    def launch(m: Method) -> list[str]:
        return launch_argv(
            m, directory, toplevel, goal, set_profile=set_profile, run_id=run_id, env=env
        )

    started = await _run(
        host, launch(chosen), timeout=min(STEP_TIMEOUT, deadline - time.monotonic())
    )
    refused = not started.ok and not started.lost and not started.timed_out
    if refused and method == "auto" and chosen == "systemd-run":
        chosen = "detached"  # e.g. systemd without D-Bus: a process of its own session then
        started = await _run(
            host, launch(chosen), timeout=min(STEP_TIMEOUT, deadline - time.monotonic())
        )
    unit = f"{unit_name(run_id)}.service" if chosen == "systemd-run" else ""
    if not started.ok and not started.lost and not started.timed_out:
        await stop(unit)
        return result(False, f"Activation failed: could not start it: {started.describe()}")

    # 3. Follow the log until the status arrives, reconnecting after drops.
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        offset = follower.begin()
        done = await _run(
            host,
            ["sh", "-c", FOLLOW_SCRIPT, "sh", directory, str(offset), str(START_WAIT)],
            timeout=left,
            on_line=follower.line,
        )
        if follower.status is not None:
            break
        if done.timed_out:
            break
        if done.lost:
            give_up = min(time.monotonic() + reconnect_timeout, deadline)
            if await _reconnect(host, give_up):
                reconnects += 1
                continue
            if time.monotonic() < deadline:
                return result(
                    False,
                    f"Activation failed: lost the connection to {host.name} and could not"
                    f" reconnect within {reconnect_timeout:g} s; it may still be running"
                    f" on the host ({directory})",
                )
            break
        return result(False, f"Activation failed: could not follow its output: {done.describe()}")

    status = follower.status
    if status is None:  # the deadline passed
        stopped = await stop(unit)
        suffix = "" if stopped else f" (could not stop it on {host.name}: {directory})"
        return result(False, f"activation timed out after {timeout:g} s{suffix}", timed_out=True)
    if status == "unstarted":
        await stop(unit)
        return result(
            False, f"Activation failed: the activation did not start within {START_WAIT} s"
        )
    await _run_retrying(
        host,
        ["rm", "-rf", "--", directory],
        deadline=time.monotonic() + GRACE,
        reconnect_timeout=GRACE,
    )
    if status == "none":
        return result(False, "Activation failed: the activation ended without an exit status")
    try:
        code = int(status)
    except ValueError:
        return result(False, f"Activation failed: unreadable exit status {status!r}")
    if code == 0:
        return result(True, "Activation successful", 0)
    return result(False, f"Activation failed: exit status {code}", code)


# -- reboot ----------------------------------------------------------------------------


async def reboot_and_wait(
    host: Host, *, timeout: float, expect_toplevel: str | None, poll_interval: float = 2.0
) -> RebootResult:
    """Reboot the host and wait (at most `timeout` s) until its boot id changes.

    With `expect_toplevel`, /run/current-system must then resolve to it. Never raises for a
    failure on the host; every remote step is bounded.
    """
    began = time.monotonic()
    deadline = began + timeout
    old_id: str | None = None

    def left() -> float:
        return deadline - time.monotonic()

    def result(
        ok: bool, message: str, new_id: str | None = None, current: str | None = None
    ) -> RebootResult:
        return RebootResult(ok, message, time.monotonic() - began, old_id, new_id, current)

    read_id = ["cat", BOOT_ID]
    first, _ = await _run_retrying(
        host,
        read_id,
        deadline=min(deadline, time.monotonic() + STEP_TIMEOUT),
        reconnect_timeout=STEP_TIMEOUT,
    )
    if not first.ok or not first.stdout.strip():
        return result(False, f"Reboot failed: could not read the boot id: {first.describe()}")
    old_id = first.stdout.strip()
    done = await _run(host, ["reboot"], timeout=min(STEP_TIMEOUT, left()))
    # The connection closing under `reboot` (lost, exit 255) means it has begun.
    if not (done.ok or done.lost or done.timed_out or done.returncode == 255):
        return result(False, f"Reboot failed: {done.describe()}")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(host.close(), 5)

    new_id: str | None = None
    while new_id is None:
        if left() <= 0:
            return result(False, f"host did not come back within {timeout:g} s")
        await asyncio.sleep(max(0.0, min(poll_interval, left())))
        if left() <= 0:
            return result(False, f"host did not come back within {timeout:g} s")
        probe = await _run(host, read_id, timeout=min(STEP_TIMEOUT, left()))
        seen = probe.stdout.strip()
        if probe.ok and seen and seen != old_id:
            new_id = seen
        elif not probe.ok:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(host.close(), 5)

    if expect_toplevel is None:
        return result(True, "Rebooted", new_id)
    check = await _run(
        host,
        ["readlink", "-e", "--", CURRENT_SYSTEM],
        timeout=min(STEP_TIMEOUT, max(left(), 5.0)),
    )
    current = check.stdout.strip() or None
    if not check.ok and check.returncode != 1:  # 1: no /run/current-system
        return result(
            False, f"Rebooted, but could not read the active system: {check.describe()}", new_id
        )
    if current != expect_toplevel:
        return result(
            False,
            f"Unexpected active system after reboot: {current or '(none)'}"
            f" (expected {expect_toplevel})",
            new_id,
            current,
        )
    return result(True, "Rebooted into the expected system", new_id, current)


# -- the host's current system ---------------------------------------------------------


async def current_system(host: Host, *, timeout: float = STEP_TIMEOUT) -> CurrentSystem:
    """/run/current-system and the system profile, resolved (readlink -e); None if absent.

    Raises ActivationError when the host cannot be asked.
    """
    done, _ = await _run_retrying(
        host,
        ["sh", "-c", CURRENT_SCRIPT, "sh", CURRENT_SYSTEM, SYSTEM_PROFILE],
        deadline=time.monotonic() + timeout,
        reconnect_timeout=timeout,
    )
    lines = done.stdout.split("\n")
    if not done.ok or len(lines) < 2:
        raise ActivationError(f"{host.name}: could not read the current system: {done.describe()}")
    return CurrentSystem(current=lines[0].strip() or None, profile=lines[1].strip() or None)
