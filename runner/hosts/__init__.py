"""Hosts: where a node's system is pushed and activated.

`Host` is the protocol the deploy pipeline talks to; `ssh.SshHost` (asyncssh,
one connection per host for the whole run) and `local.LocalHost` (the machine
Waggle runs on, for apply-local) implement it. Remote argv is always a list,
quoted per argument; privilege escalation is a prefix chosen per host.
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeGuard

from typing_extensions import override

from runner.errors import WaggleError

LineCallback = Callable[[str], None]


class HostError(WaggleError):
    """A step on a host failed; the node fails, the run goes on (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class RemoteResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: no exit status (connection lost or timed out)
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    lost: bool = False  # the connection dropped while it ran

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One line saying how the command ended."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        if self.lost:
            return "the connection was lost"
        tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-1:] or [""]
        return f"exit status {self.returncode}" + (f": {tail[0]}" if tail[0] else "")


def command_line(argv: Sequence[str], prefix: Sequence[str] = ()) -> str:
    """A remote shell command line running exactly argv (each argument quoted)."""
    return " ".join(shlex.quote(a) for a in [*prefix, *argv])


class Host(Protocol):
    name: str

    async def run(
        self,
        argv: Sequence[str],
        *,
        input_data: bytes | None = None,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult:
        """Run argv on the host; never raises for a non-zero exit."""
        ...

    async def run_fed(
        self,
        argv: Sequence[str],
        chunks: AsyncIterator[bytes],
        *,
        timeout: float | None = None,
        privileged: bool = True,
    ) -> RemoteResult:
        """Run argv with its stdin fed from `chunks` (e.g. a closure export)."""
        ...

    async def write_file(
        self, path: str, data: bytes, *, mode: int, timeout: float | None = None
    ) -> None:
        """Write a file atomically enough for keys: only `path` is written, with `mode`."""
        ...

    async def close(self) -> None: ...


class DuplexHost(Host, Protocol):
    """A host whose `run_fed` talks both ways at once (SshHost): its `chunks` may wait for
    lines of the command's output (`on_line`), so one command can answer, then take more
    input. Other hosts (LocalHost gathers the input first) get one command per question."""

    @override
    async def run_fed(
        self,
        argv: Sequence[str],
        chunks: AsyncIterator[bytes],
        *,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult: ...


def duplex(host: Host) -> TypeGuard[DuplexHost]:
    """Whether `host` is a DuplexHost (it says so: a `duplex` attribute that is true)."""
    return bool(getattr(host, "duplex", False))
