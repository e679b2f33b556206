"""Drift: hosts whose running system is not what the head of the branch builds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from runner.deploy.activation import current_system
from runner.errors import WaggleError
from runner.hive.model import NodeConfig
from runner.hosts.ssh import SshSettings, ssh_host_for


async def find_drift(
    configs: Mapping[str, NodeConfig],
    head_outs: Mapping[str, str],
    ssh: SshSettings,
    *,
    parallel: int = 10,
) -> dict[str, str]:
    """Nodes to deploy although the change does not touch them, with the reason.

    A host runs something else than head's system: "drift". A host that cannot
    be asked is deployed too, so its failure is reported by the deploy itself.
    Nodes without a targetHost are never drifted (nothing to compare).
    """
    limit = asyncio.Semaphore(parallel if parallel > 0 else max(1, len(head_outs)))
    found: dict[str, str] = {}

    async def check(name: str, expected: str) -> None:
        config = configs[name]
        if config.target_host is None:
            return
        host = ssh_host_for(config, ssh)
        async with limit:
            try:
                running = await current_system(host)
            except WaggleError as e:
                found[name] = f"drift unknown: {e.message}"
                return
            finally:
                with contextlib.suppress(Exception):
                    await host.close()
        if running.current != expected:
            found[name] = f"drift: the host runs {running.current or 'no system'}"
        elif running.activated != expected:  # e.g. a switch that failed half-way
            found[name] = "drift: no successful activation of this system was recorded there"

    await asyncio.gather(*(check(n, out) for n, out in head_outs.items()))
    return found
