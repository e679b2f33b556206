"""`waggle eval`/`introspect`, `waggle nodes` and `waggle nix-info`: looking, not deploying."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from runner import nix
from runner.app.requests import HiveRef
from runner.app.run import open_hive, select
from runner.errors import UsageError
from runner.evaluate import MemoryBudget
from runner.hive.hive import nix_string
from runner.hive.model import NodeConfig


async def introspect(hive_ref: HiveRef, file: str | None, expression: str | None) -> Any:
    """The JSON value of `{ nodes, pkgs, lib }: ...` (from FILE or -E) applied to the hive."""
    if file and expression:
        raise UsageError("eval: give either FILE or -E EXPR, not both")
    if file:
        path = (hive_ref.cwd / file).resolve()
        if not path.is_file():
            raise UsageError(f"eval: {file}: no such file")
        function = f"import {nix_string(str(path))}"
    elif expression:
        function = expression
    else:
        raise UsageError("eval: give a FILE or -E '{ nodes, pkgs, lib }: ...'")
    hive = await open_hive(hive_ref)
    return await hive.introspect(function)


async def nodes(hive_ref: HiveRef, on: str | None) -> list[NodeConfig]:
    """The selected nodes' deployment settings, in the hive's order."""
    hive = await open_hive(hive_ref)
    selection = await select(hive, on)
    return [selection.configs[n] for n in selection.names]


def node_json(c: NodeConfig) -> dict[str, Any]:
    """A node's settings for `nodes --json`; key contents are never included."""
    return {
        "name": c.name,
        "targetHost": c.target_host,
        "targetPort": c.target_port,
        "targetUser": c.target_user,
        "tags": list(c.tags),
        "allowLocalDeployment": c.allow_local_deployment,
        "buildOnTarget": c.build_on_target,
        "replaceUnknownProfiles": c.replace_unknown_profiles,
        "privilegeEscalationCommand": list(c.privilege_escalation_command),
        "sshOptions": list(c.ssh_options),
        "keys": [
            {
                "name": k.name,
                "path": k.path,
                "source": k.source.kind,
                "user": k.user,
                "group": k.group,
                "permissions": k.permissions,
                "uploadAt": str(k.upload_at),
            }
            for k in c.keys
        ],
        "healthChecks": _health_json(c),
    }


def _health_json(c: NodeConfig) -> dict[str, Any]:
    """deployment.healthChecks as set (header values left out: they may hold a token)."""
    checks = c.health_checks
    return {
        "cmd": [
            {"description": h.description, "cmd": list(h.cmd), "period": h.period,
             "timeout": h.timeout}
            for h in checks.cmd
        ],
        "http": [
            {"description": h.description, "scheme": h.scheme, "host": h.host, "port": h.port,
             "path": h.path, "headers": [name for name, _ in h.headers], "period": h.period,
             "timeout": h.timeout, "insecureSSL": h.insecure_ssl}
            for h in checks.http
        ],
    }  # fmt: skip


@dataclass(frozen=True)
class NixInfo:
    version: str
    flakes: bool
    cores: int
    budget: MemoryBudget


async def nix_info() -> NixInfo:
    info = await nix.info()
    return NixInfo(info.version, info.flakes, os.cpu_count() or 1, MemoryBudget.measure())
