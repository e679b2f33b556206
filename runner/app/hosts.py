"""`waggle exec` (one command on many hosts) and `waggle apply-local` (this machine)."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace
from pathlib import Path

from runner.app.requests import ApplyLocalRequest, ExecRequest
from runner.app.run import gc_root_dir, open_hive, progress, select
from runner.deploy.exec import ExecOutcome, run_everywhere
from runner.deploy.pipeline import DeploySettings, deploy
from runner.errors import UsageError
from runner.goals import Goal
from runner.hosts.local import LocalHost
from runner.results import NodeResult

log = logging.getLogger("waggle")


async def exec_command(request: ExecRequest) -> list[ExecOutcome]:
    if not request.command:
        raise UsageError("exec: give the command after --, e.g. waggle exec -- uptime")
    if request.parallel < 0:
        raise UsageError("--parallel must not be negative")
    hive = await open_hive(request.hive)
    selection = await select(hive, request.on)
    return await run_everywhere(
        selection.configs,
        selection.names,
        request.command,
        request.ssh,
        parallel=request.parallel,
        timeout=request.timeout,
    )


def is_nixos(os_release: Path = Path("/etc/os-release")) -> bool:
    try:
        lines = os_release.read_text().splitlines()
    except OSError:
        return False
    return any(line.strip() in ("ID=nixos", 'ID="nixos"') for line in lines)


async def apply_local(request: ApplyLocalRequest) -> list[NodeResult]:
    """Build and activate the node named like this machine (or `node`) right here."""
    goal = request.goal
    node = request.node or socket.gethostname()
    hive = await open_hive(request.hive)
    names = await hive.node_names()
    if node not in names:
        raise UsageError(
            f"apply-local: this machine's node {node!r} is not in the hive (use --node NAME)"
        )
    config = (await hive.deployment([node]))[node]
    if not config.allow_local_deployment:
        raise UsageError(f"apply-local: node {node} does not set deployment.allowLocalDeployment")
    if goal.activates and not is_nixos():
        raise UsageError("apply-local: this machine is not NixOS (/etc/os-release has no ID=nixos)")
    meta = await hive.meta()
    hive = hive.with_flags(replace(hive.flags, machines_file=meta.machines_file))
    settings = DeploySettings(
        goal=goal,
        activation_timeout=request.activation_timeout,
        keys=request.keys,
        build_on_target=False,
        base_dir=hive.source.directory,
    )
    escalation = config.privilege_escalation_command if request.sudo else ()
    if not request.sudo and os.geteuid() != 0:
        log.warning("apply-local runs as a non-root user without --sudo; activation may fail")
    build = replace(request.build, gc_root_dir=gc_root_dir(hive, request.keep_result))
    # sudo may prompt, and dry-activate's output is the point: plain lines then.
    plain = request.sudo or goal is Goal.DRY_ACTIVATE
    with progress(request.view, [node], plain=plain) as out:
        run = await deploy(
            hive,
            {node: config},
            [node],
            request.eval,
            build,
            settings,
            host_factory=lambda c: LocalHost(c.name, tuple(escalation)),
            require_target_host=False,
            events=out,
        )
    return list(run.nodes)
