"""`waggle exec`: one command on many hosts, output kept per host."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from runner.hive.model import NodeConfig
from runner.hosts import HostError
from runner.hosts.ssh import SshSettings, ssh_host_for


@dataclass(frozen=True)
class ExecOutcome:
    node: str
    ok: bool
    status: str  # "exit 0", "exit 3", "cannot connect ...", "skipped: no targetHost"
    stdout: str = ""
    stderr: str = ""


def remote_argv(command: Sequence[str]) -> list[str]:
    """What runs on the host for `waggle exec -- COMMAND...`.

    One argument is a shell command line, as with Colmena (and ssh): pipes,
    redirections and `&&` work (`waggle exec -- 'journalctl -u x | tail'`).
    Several arguments run exactly as given, each one quoted.
    """
    if len(command) == 1:
        return ["sh", "-c", command[0]]
    return list(command)


async def run_everywhere(
    configs: Mapping[str, NodeConfig],
    names: Sequence[str],
    argv: Sequence[str],
    ssh: SshSettings,
    *,
    parallel: int = 0,
    timeout: float = 600.0,
) -> list[ExecOutcome]:
    limit = asyncio.Semaphore(parallel if parallel > 0 else max(1, len(names)))

    async def one(name: str) -> ExecOutcome:
        config = configs[name]
        if config.target_host is None:
            return ExecOutcome(name, True, "skipped: no targetHost")
        host = ssh_host_for(config, ssh)
        async with limit:
            try:
                done = await host.run(remote_argv(argv), timeout=timeout)
            except HostError as e:
                return ExecOutcome(name, False, e.message)
            finally:
                with contextlib.suppress(Exception):
                    await host.close()
        status = "exit 0" if done.ok else done.describe()
        if done.returncode is not None and not done.ok:
            status = f"exit {done.returncode}"
        return ExecOutcome(name, done.ok, status, done.stdout, done.stderr)

    return list(await asyncio.gather(*(one(n) for n in names)))
