"""Magic rollback, the deployer's side: confirm an armed activation, or have it rolled back.

After a successful `switch`/`test` with a confirm window, the host's activation runner
(runner/scripts/activation-runner.sh) waits for a decision in its run directory. The
decision is a symlink `decision` that is made once (`ln -s` fails when it exists), so the
deployer and the host can never both win:

- `confirm` is made by the deployer over a NEW SSH connection (`confirm`): the handshake
  proves that sshd, the network and the login still work after the switch. The runner then
  records the system as activated and writes the outcome `confirmed`;
- `rollback` is made by the deployer when a health check failed (`roll_back`), or by the
  runner itself once the window has passed without a decision (the deployer may be gone,
  or unable to reach the host). The runner sets the system profile back to the generation
  that was current before this run (exactly one step, never `nix-env --rollback`), activates
  the previous system again, and writes `rolled-back SECONDS PREVIOUS` or `rollback-failed
  <why>`.

Every remote step is bounded; the run directory is removed once its outcome has been read
(activation-decide.sh). When nobody reads it, the outcome stays on the host for a later run
or a human (activation-setup.sh keeps the newest ten).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from runner.deploy.activation import STEP_TIMEOUT, current_system, run_step
from runner.errors import WaggleError
from runner.hosts import Host, RemoteResult
from runner.hosts.ssh import SshHost
from runner.scripts import script

DECIDE_SCRIPT = script("activation-running.sh") + script("activation-decide.sh")  # DIR WANT WAIT
ACK_WAIT = 10.0  # seconds the runner may take to acknowledge a decision it did not make
RETRY_PAUSE = (0.2, 1.0)  # first and largest pause between attempts to confirm


class NotConfirmedError(WaggleError):
    """The host was not confirmed in time (it rolls back; the node fails)."""

    exit_code = 1

    def __init__(self, message: str, *, outcome: Outcome | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome  # the host's answer, when it already gave one


@runtime_checkable
class Connectable(Protocol):
    async def connect(self) -> object: ...


@dataclass(frozen=True)
class Outcome:
    """What the host's runner says happened, as read from its run directory."""

    kind: str  # confirmed, rolled-back, rollback-failed; none (no outcome), gone, unreadable
    decision: str = ""  # "confirm", "rollback" or "" (none made yet)
    text: str = ""  # the outcome after its kind: "<seconds> <previous>" or the failure
    log: str = ""  # the rollback's output on the host
    reason: str = ""  # why there is no outcome (kind none, gone, unreadable)
    timed_out: bool = False  # unreadable: the command did not end in time (a hung connection)

    @property
    def rolled_back(self) -> bool:
        return self.kind == "rolled-back"

    @property
    def final(self) -> bool:
        """The runner has finished: rolled back, failed to, or confirmed."""
        return self.kind in ("rolled-back", "rollback-failed", "confirmed")

    @property
    def previous(self) -> str:
        """The system the host went back to (rolled-back only)."""
        return self.text.partition(" ")[2].strip() if self.rolled_back else ""

    @property
    def host_seconds(self) -> float | None:
        """How long the rollback took on the host (rolled-back only)."""
        first = self.text.partition(" ")[0]
        return int(first) / 100 if self.rolled_back and first.isdigit() else None

    def describe(self) -> str:
        """One line: how the rollback went (or why that is not known)."""
        if self.rolled_back:
            took = self.host_seconds
            return f"rolled back to {self.previous}" + (f" in {took:.1f} s" if took else "")
        if self.kind == "rollback-failed":
            return f"rollback failed: {self.text or 'no reason given'}"
        if self.kind == "confirmed":
            return "confirmed"
        return f"outcome unknown: {self.reason or self.kind}"


@dataclass(frozen=True)
class Confirmation:
    confirmed: bool
    seconds: float
    attempts: int
    why: str = ""  # why it was not confirmed, e.g. "no new SSH connection: ..."
    outcome: Outcome | None = None  # the host's answer, when one came


def parse(done: RemoteResult) -> Outcome:
    """The decide script's output."""
    if not done.ok:
        return Outcome("unreadable", reason=done.describe())
    head, _, log = done.stdout.partition("\nlog:\n")
    fields = {}
    for line in head.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    kind, _, text = fields.get("outcome", "").partition(" ")
    if not kind:
        return Outcome("unreadable", reason=f"unexpected answer: {done.stdout.strip()[:200]!r}")
    reason = {
        "none": "the runner on the host ended without an outcome, or did not answer in time",
        "gone": "the run directory is gone (was the host rebooted?)",
    }.get(kind, "")
    return Outcome(kind, fields.get("decision", ""), text.strip(), log, reason)


async def decide(host: Host, directory: str, want: str, *, wait: float, timeout: float) -> Outcome:
    """Make `want` ("confirm", "rollback", or "" for none) the decision unless one was made,
    then read the outcome (waiting up to `wait` s for it); one attempt, within `timeout`."""
    argv = ["sh", "-c", DECIDE_SCRIPT, "sh", directory, want, str(math.ceil(wait * 100))]
    done = await run_step(host, argv, timeout=timeout)
    if done.lost or done.timed_out:
        return Outcome("unreadable", reason=done.describe(), timed_out=done.timed_out)
    return parse(done)


def fresh_host(host: Host) -> Host | None:
    """A new host object with the same target and settings (its own, new connection), or
    None for a host that has no connection to make (apply-local, test doubles)."""
    if isinstance(host, SshHost):
        return SshHost(host.target, host.settings)
    return None


async def _close(host: Host) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(host.close(), 5)


async def _attempt(
    make: Callable[[], Host | None],
    fallback: Host,
    directory: str,
    left: float,
    toplevel: str | None,
) -> tuple[Outcome | None, str]:
    """One confirmation over a new connection: (outcome, why it failed to connect or run)."""
    fresh = make()
    host = fresh if fresh is not None else fallback
    try:
        if fresh is not None and isinstance(fresh, Connectable):
            try:
                await asyncio.wait_for(fresh.connect(), max(left, 0.05))
            except TimeoutError:
                return None, f"no new SSH connection within {left:.1f} s"
            except (WaggleError, OSError) as e:
                return None, f"no new SSH connection: {e}"
        outcome = await decide(host, directory, "confirm", wait=ACK_WAIT, timeout=ACK_WAIT + 5)
        if outcome.kind == "gone" and toplevel is not None:
            # An earlier attempt's answer was lost after the runner had finished? Its record
            # says whether this very system was confirmed (it is cleared before activating).
            with contextlib.suppress(WaggleError):
                if (await current_system(host, timeout=ACK_WAIT)).activated == toplevel:
                    return Outcome("confirmed", "confirm"), ""
        return outcome, outcome.reason if outcome.kind == "unreadable" else ""
    finally:
        if fresh is not None:
            await _close(fresh)


async def confirm(
    host: Host,
    directory: str,
    *,
    deadline: float,
    toplevel: str | None = None,
    make_host: Callable[[], Host | None] | None = None,
) -> Confirmation:
    """Confirm the activation of `toplevel` waiting in `directory`, over a new connection,
    retrying until `deadline` (monotonic). Not confirmed: the host rolls back (by itself at
    its own deadline, or already did: `outcome` says so). `make_host` makes the new host
    (default: `fresh_host`)."""
    began = time.monotonic()
    make = make_host or (lambda: fresh_host(host))
    pause, largest = RETRY_PAUSE
    attempts, why = 0, ""
    while time.monotonic() < deadline:
        attempts += 1
        left = deadline - time.monotonic()
        outcome, problem = await _attempt(make, host, directory, left, toplevel)
        took = time.monotonic() - began
        if outcome is not None and outcome.kind == "confirmed":
            return Confirmation(True, took, attempts, outcome=outcome)
        if outcome is not None and outcome.kind != "unreadable":
            # The host decided (rolled back, or is rolling back) or its runner is gone.
            late = outcome.decision == "rollback" or outcome.kind.startswith("roll")
            text = "the new connection came only after the host had decided to roll back"
            text = text if late else outcome.describe()
            return Confirmation(False, took, attempts, text, outcome)
        why = problem or why
        await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(pause * 2, largest)
    return Confirmation(False, time.monotonic() - began, attempts, why)


async def roll_back(host: Host, directory: str, *, timeout: float) -> Outcome:
    """Decide "rollback" (unless the host decided already) and wait, up to `timeout` s, for
    the host's outcome; the connection is reopened as needed (it may have been the switch
    that broke it). Over `host`, the run's own connection: any working one will do here.
    (An outcome read once is gone: its run directory is removed after it was read.)"""
    deadline = time.monotonic() + timeout
    outcome = Outcome("unreadable", reason="no attempt made")
    pause, largest = RETRY_PAUSE
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return outcome
        outcome = await decide(host, directory, "rollback", wait=left, timeout=left + STEP_TIMEOUT)
        if outcome.kind != "unreadable":
            return outcome
        if outcome.timed_out:  # a hung connection: the next attempt makes a new one (a lost
            await _close(host)  # one is made again by the host itself)
        await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(pause * 2, largest)
