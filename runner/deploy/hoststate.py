"""What a deploy needs to know about a host before it works there, asked in one command.

Which paths of the closure the host's store lacks, what it runs now (/run/current-system,
the system profile) and what Waggle recorded as activated there (ACTIVATED_RECORD) come
from one script, runner/scripts/host-query.sh. On SSH hosts the host lock's channel answers
it once it holds the lock (runner/deploy/lock.py), so a deploy that finds nothing to do
costs one remote command per host; elsewhere `query_host` runs it as a command of its own.
The answer stays true while the run holds the host's lock: no other run changes the host
meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from runner.deploy.activation import (
    ACTIVATED_RECORD,
    STEP_TIMEOUT,
    CurrentSystem,
    run_step,
)
from runner.hosts import Host
from runner.scripts import script

QUERY_FUNCTION = script("host-query.sh")  # defines waggle_query RECORD BYTES
QUERY_SCRIPT = QUERY_FUNCTION + 'waggle_query "$@"\n'  # sh -c QUERY sh RECORD BYTES
DONE = "query:"  # the answer's last line: query:<nix-store's exit status>


@dataclass(frozen=True)
class HostQuery:
    """The question: which of `paths` are missing, and the host's system (`record`: the
    file of systems Waggle activated there)."""

    paths: tuple[str, ...]
    record: str = ACTIVATED_RECORD

    def payload(self) -> bytes:
        """The paths as the script reads them on stdin."""
        return "".join(f"{p}\n" for p in self.paths).encode()


@dataclass(frozen=True)
class HostState:
    """The answer. `missing` keeps the query's order; it is None when the store could not
    be asked (`error` says why: then the push asks again on its own, for the message)."""

    system: CurrentSystem
    missing: tuple[str, ...] | None
    error: str = ""
    seconds: float = 0.0


def query_argv(query: HostQuery) -> list[str]:
    """The argv of the standalone query (exactly what is sent, quoted per argument)."""
    return ["sh", "-c", QUERY_SCRIPT, "sh", query.record, str(len(query.payload()))]


def parse(query: HostQuery, lines: Iterable[str], seconds: float = 0.0) -> HostState | None:
    """The script's lines (its whole output, or the lock channel's after `locked`) as a
    HostState; None when they end before the last line (the answer is incomplete)."""
    current = profile = ""
    recorded: dict[str, str] = {}
    invalid: set[str] = set()
    in_paths = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(DONE):
            status = line.removeprefix(DONE)
            system = CurrentSystem(
                current=current or None,
                profile=profile or None,
                activated=recorded.get("running") or None,
                activated_boot=recorded.get("boot") or None,
            )
            if status != "0":
                return HostState(system, None, f"exit status {status}", seconds)
            return HostState(system, tuple(p for p in query.paths if p in invalid), "", seconds)
        if in_paths:
            invalid.add(line)
        elif line == "paths:":
            in_paths = True
        elif line.startswith("current:"):
            current = line.removeprefix("current:")
        elif line.startswith("profile:"):
            profile = line.removeprefix("profile:")
        elif line.startswith("record:"):
            kind, _, system_path = line.removeprefix("record:").partition(" ")
            recorded.setdefault(kind, system_path.strip())
    return None


async def query_host(
    host: Host, query: HostQuery, *, timeout: float = STEP_TIMEOUT
) -> HostState | None:
    """Ask `host` in a command of its own; None when it could not be asked at all."""
    began = time.monotonic()
    done = await run_step(host, query_argv(query), timeout=timeout, input_data=query.payload())
    if done.returncode is None:
        return None
    state = parse(query, done.stdout.splitlines(), time.monotonic() - began)
    if state is not None and state.error:
        tail = done.stderr.strip().splitlines()[-1:]
        state = HostState(
            state.system, None, f"{state.error}: {tail[0]}" if tail else state.error, state.seconds
        )
    return state
