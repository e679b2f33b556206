"""A lock per host: one run at a time does its work on a host (push through post-keys).

Two runs (a watcher and a person, two pipelines) must never interleave `nix-env --set` and
a switch on one host. The lock lives on the host, in /run/waggle/lock (see
runner/scripts/lock-lib.sh for the file and its rules): a list of holders, each a process
of the host with its boot id and start time, and the run it belongs to. A run holds the
lock through:

- its connection: `lock.sh` on a channel of the node's SSH connection, started by
  `hold_lock`, holds it until its stdin ends (the block is left, or the connection closes)
  or Waggle's heartbeat stops for IDLE seconds (a connection that died without closing).
  Once it holds the lock it answers the run's query about the host, if given (missing
  paths, current system: runner/deploy/hoststate.py), so that needs no command of its own;
- its host-side activation (activation-runner.sh joins the run's lock with
  `waggle_lock_join` and leaves it when done, magic rollback's wait included), so a
  deployer killed mid-activation leaves the host locked until that work ends.

A holder that is gone (process dead, connection closed, host rebooted) counts as free, so
no lock ever needs a human to remove a file. If the run's own channel ends while the block
is still running (a reconnect, a reboot), the lock is taken again in the background; if
another run got it in between, the block is cancelled at once and HostLockLostError raised.

Only SSH hosts are locked: `apply-local` (LocalHost) and hosts of tests take no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from runner.deploy.hoststate import QUERY_FUNCTION, HostQuery, HostState, parse
from runner.errors import WaggleError
from runner.hosts import Host, HostError, RemoteResult
from runner.hosts.ssh import SshHost
from runner.scripts import script

# sh -c LOCK sh RUN DEPLOYER SINCE IDLE [RECORD BYTES]
LOCK_SCRIPT = script("lock-lib.sh") + QUERY_FUNCTION + script("lock.sh")
POLL = 0.5  # seconds between attempts while another run holds the host
HEARTBEAT = 5.0  # seconds between the bytes that tell lock.sh the run is still there
IDLE = 120.0  # seconds without a heartbeat after which lock.sh lets go
RELEASE_WAIT = 5.0  # bound of the lock's release when the block is left
QUERY_WAIT = 30.0  # bound of the query's answer once the lock is held
HELD_EXIT = 3  # lock.sh's status when another run holds the host

_WORD = re.compile(r"[A-Za-z0-9._:+-]{1,128}\Z")


class HostLockedError(WaggleError):
    """Another run held the host for longer than --lock-timeout (the node fails)."""

    exit_code = 1


class HostLockLostError(WaggleError):
    """The run lost its host lock to another run while it worked there (the node fails)."""

    exit_code = 1


@dataclass(frozen=True)
class RunIdentity:
    """What a host's lock says about the run holding it."""

    run_id: str  # one per Waggle run (a uuid unless given)
    deployer: str  # the host name of the machine Waggle runs on
    started_at: float  # epoch seconds

    def __post_init__(self) -> None:
        for what, word in (("run id", self.run_id), ("deployer", self.deployer)):
            if not _WORD.match(word):
                raise ValueError(f"bad {what} for a host lock: {word!r} (letters, digits, ._:+-)")

    @classmethod
    def new(cls, run_id: str | None = None) -> RunIdentity:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:128] or "unknown"
        return cls(run_id or uuid.uuid4().hex, name, time.time())

    @property
    def since(self) -> str:
        """The run's start in UTC, as the lock file has it: 2024-05-01T12:03:04Z."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))


@dataclass(frozen=True)
class Holder:
    """Another run holding a host, as lock.sh reported it (`held RUN DEPLOYER SINCE`)."""

    run_id: str
    deployer: str
    since: str

    @classmethod
    def parse(cls, line: str) -> Holder:
        words = [*line.split()[1:], "?", "?", "?"]
        return cls(words[0], words[1], words[2])

    def describe(self) -> str:
        return f"run {self.run_id} from {self.deployer} since {self.since}"


def lock_argv(owner: RunIdentity, idle: float = IDLE, query: HostQuery | None = None) -> list[str]:
    """The argv of lock.sh for `owner` (exactly what is sent, quoted per argument); with
    `query`, lock.sh answers it once it holds the lock (its paths come first on stdin)."""
    asked = [query.record, str(len(query.payload()))] if query is not None else []
    return [
        "sh",
        "-c",
        LOCK_SCRIPT,
        "sh",
        owner.run_id,
        owner.deployer,
        owner.since,
        str(math.ceil(idle)),
        *asked,
    ]


@dataclass
class _Channel:
    """One run of lock.sh on the host: its answer (`locked`, `held ...`, `failed`), then,
    when locked, the query's answer (if asked) and a heartbeat on its stdin until `close`."""

    host: SshHost
    argv: list[str]
    heartbeat: float
    query: HostQuery | None = None
    eager: bool = True  # send the query's paths before the answer
    answer: str | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[RemoteResult] | None = None
    lines: list[str] = field(default_factory=list)  # after `locked`, until the query's end
    state: HostState | None = None
    queried: asyncio.Event = field(default_factory=asyncio.Event)
    began: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self.task = asyncio.create_task(
            self.host.run_fed(self.argv, self._feed(), on_line=self._line)
        )

    def _line(self, text: str) -> None:
        if self.answer is None:
            if text.split(" ", 1)[0] in ("locked", "held", "failed"):
                self.answer = text.strip()
                self.answered.set()
                self.began = time.monotonic()
            return
        if self.query is not None and not self.queried.is_set():
            self.lines.append(text)
            if text.startswith("query:"):
                self.state = parse(self.query, self.lines, time.monotonic() - self.began)
                self.queried.set()

    async def _feed(self) -> AsyncIterator[bytes]:
        # The query's paths are read by lock.sh once it holds the lock (exactly): sent at
        # once (no round trip waits for them), except after the host was found held (then
        # only once it is taken, not again at every attempt).
        if self.query is not None and self.eager:
            yield self.query.payload()
        await self.answered.wait()  # nothing more before the answer; none after a refusal
        if self.answer != "locked":
            return
        if self.query is not None and not self.eager:
            yield self.query.payload()
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), self.heartbeat)
            except TimeoutError:
                yield b"."

    async def wait_state(self, timeout: float) -> HostState | None:
        """The query's answer (within `timeout` s); None without a query, or when the
        channel ended or stayed silent first (the pipeline then asks on its own)."""
        if self.query is None or self.task is None:
            return None
        queried = asyncio.create_task(self.queried.wait())
        try:
            await asyncio.wait(
                {self.task, queried}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            queried.cancel()
        return self.state

    async def wait_answer(self) -> str | None:
        """The answer, or None when the command ended without one (raising a host error)."""
        assert self.task is not None
        answered = asyncio.create_task(self.answered.wait())
        try:
            await asyncio.wait({self.task, answered}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            answered.cancel()
        if self.answer is None:
            self.answered.set()  # the feed ends: the command is over
            await self.task  # raises what the host raised (cannot connect, ...)
        return self.answer

    def abandon(self) -> None:
        """End the channel without waiting (cancelled): EOF on lock.sh's stdin."""
        self.stop.set()
        self.answered.set()
        if self.task is not None:
            self.task.add_done_callback(_retrieve)

    async def close(self) -> None:
        """End the channel: EOF on lock.sh's stdin, which then leaves the lock (bounded)."""
        self.stop.set()
        self.answered.set()
        if self.task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.task), RELEASE_WAIT)
        except (TimeoutError, WaggleError, OSError):
            self.task.cancel()  # the host's close ends the channel, and lock.sh with it


def _retrieve(task: asyncio.Task[RemoteResult]) -> None:
    """Done callback of an abandoned channel: its outcome is of no interest any more."""
    if not task.cancelled():
        task.exception()


@dataclass
class _HostLock:
    host: SshHost
    owner: RunIdentity
    poll: float
    heartbeat: float
    idle: float
    channel: _Channel | None = None
    lost: Holder | None = None  # another run took the host while this one still worked

    async def attempt(self, query: HostQuery | None = None, *, eager: bool = True) -> Holder | None:
        """Take the lock once: None when taken (the channel holds it), else the holder.

        Raises HostError when the host cannot be asked (cannot connect, no flock).
        """
        argv = lock_argv(self.owner, self.idle, query)
        channel = _Channel(self.host, argv, self.heartbeat, query, eager)
        channel.start()
        try:
            answer = await channel.wait_answer()
        except BaseException:
            channel.abandon()
            raise
        if answer == "locked":
            self.channel = channel
            return None
        assert channel.task is not None
        done = await channel.task
        if answer is not None and answer.startswith("held") and done.returncode == HELD_EXIT:
            return Holder.parse(answer)
        reason = done.stderr.strip().splitlines()[-1:] or [done.describe()]
        raise HostError(f"{self.host.name}: could not take the host lock: {reason[0]}")

    async def acquire(
        self,
        timeout: float,
        on_wait: Callable[[str], None] | None,
        query: HostQuery | None = None,
    ) -> HostState | None:
        """Take the lock, retrying every `poll` s while another run holds the host; the
        answer to `query` (None: none asked, or none came)."""
        began = time.monotonic()
        seen: Holder | None = None
        while True:
            holder = await self.attempt(query, eager=seen is None)
            if holder is None:
                assert self.channel is not None
                return await self.channel.wait_state(QUERY_WAIT)
            waited = time.monotonic() - began
            if waited >= timeout:
                raise HostLockedError(f"host locked by {holder.describe()} (waited {waited:.0f} s)")
            if holder != seen and on_wait is not None:
                on_wait(f"waiting for the host lock: held by {holder.describe()}")
            seen = holder
            await asyncio.sleep(min(self.poll, max(0.0, timeout - waited)))

    async def keep(self, on_lost: Callable[[], object] = lambda: None) -> None:
        """While the block runs: when the run's channel ends (a reconnect, a reboot), take
        the lock again (the run's activation may hold it meanwhile: joining is allowed);
        if another run has it by then, record who and call `on_lost`."""
        while self.channel is not None and self.channel.task is not None:
            await asyncio.wait({self.channel.task})
            self.channel = None
            while self.channel is None:
                await asyncio.sleep(self.poll)
                try:
                    holder = await self.attempt()
                except (WaggleError, OSError):
                    continue  # e.g. rebooting: try again
                if holder is not None:
                    self.lost = holder
                    on_lost()
                    return

    async def release(self, keeper: asyncio.Task[None]) -> None:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await keeper
        if self.channel is not None:
            await self.channel.close()
            self.channel = None


@contextlib.asynccontextmanager
async def hold_lock(
    host: Host,
    owner: RunIdentity,
    *,
    timeout: float,
    on_wait: Callable[[str], None] | None = None,
    poll: float = POLL,
    heartbeat: float = HEARTBEAT,
    idle: float = IDLE,
    query: HostQuery | None = None,
) -> AsyncIterator[HostState | None]:
    """Hold `host`'s lock for `owner`'s run while the block runs; the block gets the
    answer to `query`, asked by the lock's own channel once it holds the lock (None: no
    query, no answer, or a host that is not locked: then ask with hoststate.query_host).

    Waits up to `timeout` s while another run holds the host (`on_wait` hears who, once
    per holder), then raises HostLockedError: "host locked by run <id> from <deployer>
    since <time>". Raises HostError when the host cannot be locked at all, and
    HostLockLostError when another run took the host meanwhile: the block is cancelled
    at that moment (see the module doc). Hosts other than SshHost are not locked.
    """
    if not isinstance(host, SshHost):
        yield None
        return
    lock = _HostLock(host, owner, poll, heartbeat, idle)
    state = await lock.acquire(timeout, on_wait, query)
    # Another run took the host: the block's work stops now (a push or key upload must not
    # go on beside the other run's), not when it ends.
    block = asyncio.current_task()
    keeper = asyncio.create_task(lock.keep(block.cancel if block is not None else lambda: None))
    try:
        yield state
    except asyncio.CancelledError:
        if lock.lost is None or block is None or block.uncancel() > 0:
            raise  # cancelled for another reason too (Ctrl-C, SIGTERM)
    finally:
        await lock.release(keeper)
    if lock.lost is not None:
        raise HostLockLostError(
            f"lost the host lock while working there: now held by {lock.lost.describe()}"
        )
