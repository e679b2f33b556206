"""Activation and reboot of a node's host, surviving dropped SSH connections.

Colmena runs `switch-to-configuration` inside the SSH session, so a network restart during
activation kills or hangs it (#343, #290, #262), and it waits for a rebooted host forever
(#166, #303, #315). Waggle instead:

- starts the activation detached on the host, in one command (the launch: prepare and
  start): a runner script in a per-run directory `/run/waggle/activation-<id>/` (`run.sh`,
  `log`, `pid`, `status`), as a transient systemd unit where systemd runs, else as a process
  in a session of its own (`setsid -f`). The directory is made once, so a launch whose
  answer was lost with the connection can be sent again without starting a second runner;
- follows its log with a separate command that prints every log line with its byte offset
  (`<offset>:<text>`, from GNU grep's `-b`) and, once the runner is done, `status:<code>`,
  and then removes the run directory when the deployer says it has the status (on a duplex
  host: the same command, no extra round trip). After a lost connection it reconnects and
  follows again from the start of the last line it delivered, skipping lines it has
  already seen, so no line is lost or duplicated;
- bounds everything: the whole activation by `timeout` (a timed-out activation is killed
  on the host), reconnecting by `reconnect_timeout`, a reboot wait by its `timeout`; on the
  host, switch-to-configuration is stopped after `timeout` + GRACE seconds even when no
  deployer is left to do it;
- with `confirm_window`, arms the magic rollback (switch and test): after a successful
  activation the runner waits for a decision in its run directory and, without a
  confirmation in time, goes back to the system that ran before by itself (runner/deploy/
  confirm.py is the deployer's side). The directory then stays until the outcome is read;
- records what it activated successfully in RECORD (/nix/var/waggle/activated: `running
  <system>`, `boot <system>`), which `current_system` reads: a host counts as running a
  system only when Waggle saw that activation succeed (and confirmed, with a rollback).

Every remote command is an argv quoted per argument; the shell scripts are package data
(runner/scripts/activation-*.sh, checked by shellcheck) that take their values as
positional parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from runner.errors import WaggleError
from runner.goals import ACTIVATION_GOALS
from runner.hosts import Host, RemoteResult, duplex
from runner.scripts import script

Method = Literal["systemd-run", "detached"]
MethodChoice = Literal["auto", "systemd-run", "detached"]
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
CURRENT_SYSTEM = "/run/current-system"
ACTIVATED_RECORD = "/nix/var/waggle/activated"  # per host and kept across boots, as /nix is
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
    # The magic rollback: `armed` when the host now waits for a confirmation (its run
    # directory stays); `rollback_note` why none could be armed ("no previous system").
    armed: bool = False
    rollback_note: str = ""
    directory: str = ""  # the run directory on the host
    ended_at: float = 0.0  # monotonic time the exit status arrived (the confirm window began)


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
    # What Waggle recorded as successfully activated (ACTIVATED_RECORD): the running system
    # after a switch/test, the boot default after a switch/boot; None: no such record.
    activated: str | None = None
    activated_boot: str | None = None

    def runs(self, goal: str, toplevel: str) -> bool:
        """Whether the host already is where `goal` would take it: the links point at
        `toplevel` and Waggle recorded that activating it succeeded (a switch that failed
        half-way, profile set and a unit failed, does not count)."""
        running = self.current == toplevel and self.activated == toplevel
        booting = self.profile == toplevel and self.activated_boot == toplevel
        if goal == "switch":
            return running and booting
        if goal == "boot":
            return booting
        if goal == "test":
            return running
        return False  # dry-activate always runs: it only reports


@runtime_checkable
class Reconnectable(Protocol):
    async def reconnect(self) -> None: ...


# -- scripts run on the host (runner/scripts/activation-*.sh; values only as positional
# parameters, see each file for its arguments) ----------------------------------------

SETUP_SCRIPT = script("activation-running.sh") + script("activation-setup.sh")  # the prepare
DETACH_SCRIPT = script("activation-detach.sh")  # defines detach LOG ARGV...
# sh -c LAUNCH sh DIR METHOD UNIT DESCRIPTION RUNNER... < RUNNER_SCRIPT: prepare and start.
LAUNCH_SCRIPT = SETUP_SCRIPT + DETACH_SCRIPT + script("activation-launch.sh")
# DIR/run.sh on the host: the host lock's functions, then the runner (which holds the lock).
RUNNER_SCRIPT = script("lock-lib.sh", comments=True) + script("activation-runner.sh", comments=True)
FOLLOW_SCRIPT = script("activation-running.sh") + script("activation-follow.sh")
STOP_SCRIPT = script("activation-running.sh") + script("activation-stop.sh")
CURRENT_SCRIPT = script("current-system.sh")  # sh -c CURRENT sh RECORD PATH...


def _new_run_id() -> str:
    """32 hex digits that sort by time: milliseconds since the epoch, then random ones."""
    return f"{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[:20]}"


def run_directory(run_id: str, state_dir: str = STATE_DIR) -> str:
    return f"{state_dir}/activation-{run_id}"


def unit_name(run_id: str) -> str:
    """The transient unit's name, as given to `systemd-run --unit=` (".service" implied)."""
    return f"waggle-activate-{run_id}"


def launch_argv(
    method: MethodChoice,
    directory: str,
    toplevel: str,
    goal: str,
    *,
    set_profile: bool,
    run_id: str,
    confirm_window: float = 0.0,
    limit: float = 0.0,
    record: str = "",
    lock_run_id: str = "",
) -> list[str]:
    """The argv of the launch (exactly what is sent, quoted per argument): it prepares the
    run directory (run.sh from stdin) and starts the runner with `method` (auto: systemd-run
    where systemd runs, else detached; see activation-launch.sh for the unit's properties)."""
    runner = [
        "/bin/sh",
        f"{directory}/run.sh",
        directory,
        toplevel,
        goal,
        "1" if set_profile else "0",
        str(math.ceil(confirm_window * 100)),  # hundredths of a second; 0: no rollback
        str(math.ceil(limit)),
        record,
        lock_run_id or run_id,
    ]
    description = f"Waggle activation: {goal} {toplevel}"
    return [
        "sh",
        "-c",
        LAUNCH_SCRIPT,
        "sh",
        directory,
        method,
        unit_name(run_id),
        description,
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
    acknowledge: asyncio.Event | None = None,
) -> RemoteResult:
    """host.run bounded by `timeout` (connecting included); a host error counts as lost.

    With `acknowledge` (duplex hosts only), stdin stays open until that event is set, then
    carries the line `done` (the follow script's cue to remove the run directory)."""
    timeout = max(timeout, 0.05)
    began = time.monotonic()
    if acknowledge is not None and duplex(host):
        running = host.run_fed(
            argv, _acknowledgement(acknowledge), timeout=timeout, on_line=on_line
        )
    else:
        running = host.run(argv, input_data=input_data, timeout=timeout, on_line=on_line)
    try:
        return await asyncio.wait_for(running, timeout + 1.0)
    except TimeoutError:
        return RemoteResult(tuple(argv), None, "", "", time.monotonic() - began, timed_out=True)
    except (WaggleError, OSError) as e:
        return RemoteResult(tuple(argv), None, "", str(e), time.monotonic() - began, lost=True)


run_step = _run  # one bounded remote step that never raises (for runner.deploy.confirm)


async def _acknowledgement(event: asyncio.Event) -> AsyncIterator[bytes]:
    """stdin of a follow command: `done` once the status has arrived, then EOF."""
    await event.wait()
    yield b"done\n"


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
        self.armed: str | None = None  # the runner's DIR/armed, when it wrote one
        self.removed = False  # the follow command removed the run directory
        self.has_status = asyncio.Event()  # the status arrived (the follow command is told)

    def begin(self) -> int:
        """The byte offset to follow from: the start of the last line delivered."""
        self.base = max(self.last_start, 0)
        self.status = None
        self.has_status = asyncio.Event()
        return self.base

    def line(self, text: str) -> None:
        if text.startswith("status:"):
            self.status = text.removeprefix("status:").strip()
            self.has_status.set()
            return
        if text == "removed":
            self.removed = True
            return
        if text.startswith("armed:"):
            self.armed = text.removeprefix("armed:").strip()
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
    confirm_window: float = 0.0,
    record: str = ACTIVATED_RECORD,
    lock_run_id: str = "",
) -> ActivationResult:
    """Set the profile (if asked) and run `<toplevel>/bin/switch-to-configuration <goal>`.

    Runs detached on the host, so it survives the SSH connection dropping; streams the
    output to `on_line`; reconnects after a drop (for up to `reconnect_timeout` s); kills it
    on the host when `timeout` expires. Never raises for a failure on the host: the result
    says what happened. Returns within `timeout` plus a few seconds of clean-up.

    With `confirm_window` (seconds; switch and test only) a successful activation arms the
    magic rollback: the result is `armed` and the host goes back by itself unless
    runner.deploy.confirm confirms within the window (`rollback_note` says why none could
    be armed: no previous system). `record` is the host's record of activated systems ("":
    none); `lock_run_id` the run id the runner holds the host lock under (default: its own).
    """
    if goal not in ACTIVATION_GOALS:
        raise ValueError(f"not an activation goal: {goal!r} (one of {', '.join(ACTIVATION_GOALS)})")
    if not toplevel.startswith("/"):
        raise ValueError(f"not a store path: {toplevel!r}")
    run_id = _new_run_id()
    run = _Activation(
        host,
        toplevel,
        goal,
        set_profile,
        timeout,
        reconnect_timeout,
        method,
        run_id,
        run_directory(run_id, state_dir),
        _Follower(on_line),
        confirm_window=confirm_window if goal in ("switch", "test") else 0.0,
        record=record,
        lock_run_id=lock_run_id,
    )
    return await run.run()


@dataclass
class _Activation:
    """One activation's steps: prepare, start, follow, read the status (see `activate`).

    A step that ends the activation returns its result; None means go on.
    """

    host: Host
    toplevel: str
    goal: str
    set_profile: bool
    timeout: float
    reconnect_timeout: float
    method: MethodChoice
    run_id: str
    directory: str
    follower: _Follower
    confirm_window: float = 0.0
    record: str = ""
    lock_run_id: str = ""
    began: float = field(default_factory=time.monotonic)
    reconnects: int = 0
    chosen: Method = "detached"  # how it runs on the host, once known
    unit: str = ""  # the transient unit, once started with systemd-run

    def __post_init__(self) -> None:
        if self.method == "systemd-run":
            self.chosen = "systemd-run"

    @property
    def deadline(self) -> float:
        return self.began + self.timeout

    async def run(self) -> ActivationResult:
        ended = await self._start() or await self._follow()
        return ended or await self._finish()

    def result(
        self,
        ok: bool,
        message: str,
        status: int | None = None,
        *,
        timed_out: bool = False,
        armed: bool = False,
    ) -> ActivationResult:
        note = self.follower.armed or ""
        return ActivationResult(
            ok=ok,
            exit_status=status,
            log_tail="\n".join(self.follower.tail),
            seconds=time.monotonic() - self.began,
            reconnects=self.reconnects,
            method=self.chosen,
            message=message,
            timed_out=timed_out,
            armed=armed,
            rollback_note=note.removeprefix("none:").strip() if note.startswith("none:") else "",
            directory=self.directory,
            ended_at=time.monotonic(),
        )

    async def stop(self) -> bool:
        """Kill the activation and remove the run directory; whether that was done."""
        give_up = time.monotonic() + GRACE
        argv = ["sh", "-c", STOP_SCRIPT, "sh", self.directory, self.unit]
        done = await _run(self.host, argv, timeout=GRACE)
        if done.lost and await _reconnect(self.host, give_up):
            done = await _run(self.host, argv, timeout=give_up - time.monotonic())
        return done.ok

    async def _start(self) -> ActivationResult | None:
        """1. Prepare and start the runner, one command. A lost connection may or may not
        have started it: the launch is sent again (it starts nothing when the run directory
        exists: `already`), and otherwise the follower finds out (`unstarted` if no pid
        appears)."""
        argv = launch_argv(
            self.method,
            self.directory,
            self.toplevel,
            self.goal,
            set_profile=self.set_profile,
            run_id=self.run_id,
            confirm_window=self.confirm_window,
            limit=self.timeout + GRACE,
            record=self.record,
            lock_run_id=self.lock_run_id,
        )
        started, n = await _run_retrying(
            self.host,
            argv,
            deadline=min(self.deadline, time.monotonic() + STEP_TIMEOUT),
            reconnect_timeout=self.reconnect_timeout,
            input_data=RUNNER_SCRIPT.encode(),
        )
        self.reconnects += n
        for line in started.stdout.splitlines():
            if line in ("method=systemd-run", "method=detached"):
                self.chosen = "systemd-run" if line == "method=systemd-run" else "detached"
        self.unit = f"{unit_name(self.run_id)}.service" if self.chosen == "systemd-run" else ""
        if not started.ok and not started.lost and not started.timed_out:
            await self.stop()
            return self.result(
                False, f"Activation failed: could not start it: {started.describe()}"
            )
        return None

    async def _follow(self) -> ActivationResult | None:
        """3. Follow the log until the status arrives (or the deadline), reconnecting after
        drops."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return None
            offset = self.follower.begin()
            argv = ["sh", "-c", FOLLOW_SCRIPT, "sh", self.directory, str(offset), str(START_WAIT)]
            done = await _run(
                self.host,
                argv,
                timeout=left,
                on_line=self.follower.line,
                acknowledge=self.follower.has_status if duplex(self.host) else None,
            )
            if self.follower.status is not None or done.timed_out:
                return None
            if not done.lost:
                return self.result(
                    False, f"Activation failed: could not follow its output: {done.describe()}"
                )
            give_up = min(time.monotonic() + self.reconnect_timeout, self.deadline)
            if await _reconnect(self.host, give_up):
                self.reconnects += 1
                continue
            if time.monotonic() < self.deadline:
                return self.result(
                    False,
                    f"Activation failed: lost the connection to {self.host.name} and could not"
                    f" reconnect within {self.reconnect_timeout:g} s; it may still be running"
                    f" on the host ({self.directory})",
                )
            return None

    async def _finish(self) -> ActivationResult:
        """4. The runner's exit status, or why there is none; the run directory removed."""
        status = self.follower.status
        if status is None:  # the deadline passed
            stopped = await self.stop()
            suffix = (
                "" if stopped else f" (could not stop it on {self.host.name}: {self.directory})"
            )
            return self.result(
                False, f"activation timed out after {self.timeout:g} s{suffix}", timed_out=True
            )
        if status == "unstarted":
            await self.stop()
            return self.result(
                False, f"Activation failed: the activation did not start within {START_WAIT} s"
            )
        armed = status == "0" and (self.follower.armed or "").startswith("armed")
        if armed:  # the runner waits for a decision: its directory stays (confirm.py)
            return self.result(True, "Activation successful", 0, armed=True)
        if not self.follower.removed:  # the follow command did not remove it (not duplex)
            await _run_retrying(
                self.host,
                ["rm", "-rf", "--", self.directory],
                deadline=time.monotonic() + GRACE,
                reconnect_timeout=GRACE,
            )
        if status == "none":
            return self.result(
                False, "Activation failed: the activation ended without an exit status"
            )
        try:
            code = int(status)
        except ValueError:
            return self.result(False, f"Activation failed: unreadable exit status {status!r}")
        if code == 0:
            return self.result(True, "Activation successful", 0)
        return self.result(False, f"Activation failed: exit status {code}", code)


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


async def current_system(
    host: Host, *, timeout: float = STEP_TIMEOUT, record: str = ACTIVATED_RECORD
) -> CurrentSystem:
    """/run/current-system and the system profile, resolved (readlink -e); None if absent;
    with what Waggle recorded as activated there (`record`).

    Raises ActivationError when the host cannot be asked.
    """
    done, _ = await _run_retrying(
        host,
        ["sh", "-c", CURRENT_SCRIPT, "sh", record, CURRENT_SYSTEM, SYSTEM_PROFILE],
        deadline=time.monotonic() + timeout,
        reconnect_timeout=timeout,
    )
    lines = done.stdout.split("\n")
    if not done.ok or len(lines) < 2:
        raise ActivationError(f"{host.name}: could not read the current system: {done.describe()}")
    recorded: dict[str, str] = {}
    for line in lines[2:]:
        kind, _, system = line.strip().partition(" ")
        recorded.setdefault(kind, system)
    return CurrentSystem(
        current=lines[0].strip() or None,
        profile=lines[1].strip() or None,
        activated=recorded.get("running") or None,
        activated_boot=recorded.get("boot") or None,
    )
