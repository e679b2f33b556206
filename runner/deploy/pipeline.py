"""The per-node deployment pipeline and the run-wide limits.

select -> evaluate (in a chunk) -> build (or build on target) -> connect ->
push closure -> pre-activation keys -> set profile + activate (detached) ->
reboot -> post-activation keys -> result.

Nodes never wait on each other except through the explicit limits: the
evaluation memory budget, `--build-jobs`, and `--parallel` (one permit per
node for connect, push and activation, as Colmena's apply semaphore).
Every remote step has a timeout; a failing node ends only its own pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from typing_extensions import override

from runner.build import BuildRun, BuildSettings, evaluate_and_build
from runner.deploy import activation, keys
from runner.deploy.push import push_closure
from runner.errors import WaggleError, failure_text
from runner.evaluate import EvalSettings
from runner.events import Emitter, Sink, discard
from runner.hive.hive import Hive
from runner.hive.model import NodeConfig
from runner.hosts import Host
from runner.hosts.ssh import SshSettings, ssh_host_for
from runner.results import NodeResult, Stage, StageResult, Status


class Goal(Enum):
    BUILD = "build"
    PUSH = "push"
    SWITCH = "switch"
    BOOT = "boot"
    TEST = "test"
    DRY_ACTIVATE = "dry-activate"
    UPLOAD_KEYS = "upload-keys"

    @override
    def __str__(self) -> str:
        return self.value

    @property
    def sets_profile(self) -> bool:
        return self in (Goal.SWITCH, Goal.BOOT)

    @property
    def activates(self) -> bool:
        return self in (Goal.SWITCH, Goal.BOOT, Goal.TEST, Goal.DRY_ACTIVATE)

    @property
    def needs_host(self) -> bool:
        return self is not Goal.BUILD


def goal_stages(goal: Goal, *, reboot: bool = False, keys: bool = True) -> tuple[Stage, ...]:
    """The stages a goal runs, in order (what reports list for every node)."""
    if goal is Goal.UPLOAD_KEYS:
        return (Stage.KEYS,)
    stages = [Stage.EVAL, Stage.BUILD]
    if goal is Goal.BUILD:
        return tuple(stages)
    stages.append(Stage.PUSH)
    if goal is Goal.PUSH:
        return tuple(stages)
    if keys:
        stages.append(Stage.KEYS)
    stages.append(Stage.ACTIVATE)
    if reboot:
        stages.append(Stage.CONFIRM)
    if keys:
        stages.append(Stage.POST_KEYS)
    return tuple(stages)


@dataclass(frozen=True)
class DeploySettings:
    goal: Goal = Goal.SWITCH
    parallel: int = 10  # 0: unlimited
    push_timeout: float = 3600.0
    activation_timeout: float = 600.0
    reboot: bool = False
    reboot_timeout: float = 600.0
    keys: bool = True
    key_timeout: float = 120.0
    substitute: bool = True
    force: bool = False  # activate even when the host already runs the system
    force_replace_unknown_profiles: bool = False
    build_on_target: bool | None = None  # None: per node, from deployment.buildOnTarget
    ssh: SshSettings = field(default_factory=SshSettings)
    base_dir: Path | None = None  # where relative keyFile paths are read from


HostFactory = Callable[[NodeConfig], Host]


Facts = tuple[tuple[str, int | float | str], ...]


class _StageFailedError(Exception):
    def __init__(self, stage: StageResult) -> None:
        self.stage = stage


@dataclass
class _Pipeline:
    """One node's way from a built system to an activated host."""

    config: NodeConfig
    settings: DeploySettings
    host: Host
    emit: Emitter
    stages: list[StageResult] = field(default_factory=list)
    current: Stage = Stage.PUSH  # the stage running, or the next one between stages

    def fail(self, stage: Stage, message: str, detail: str = "") -> None:
        """Record `stage` as failed without running it (a check or an error between stages)."""
        failed = StageResult(stage, Status.FAILED, 0.0, message, detail, started_at=time.time())
        self.stages.append(failed)
        self.emit.end(self.config.name, failed)

    async def stage(
        self,
        stage: Stage,
        work: Callable[[], Awaitable[str | tuple[str, Facts]]],
        *,
        skipped: str | None = None,
    ) -> str:
        node = self.config.name
        started_at, start = time.time(), time.monotonic()
        if skipped is not None:
            result = StageResult(stage, Status.SKIPPED, 0.0, skipped, started_at=started_at)
            self.stages.append(result)
            self.emit.end(node, result)
            return skipped
        self.emit.start(node, stage)
        self.current = stage
        try:
            outcome = await work()
        except Exception as e:
            message, detail = failure_text(e)
            failed = StageResult(
                stage, Status.FAILED, time.monotonic() - start, message, detail, started_at
            )
            self.stages.append(failed)
            self.emit.end(node, failed)
            raise _StageFailedError(failed) from e
        message, facts = outcome if isinstance(outcome, tuple) else (outcome, ())
        result = StageResult(
            stage, Status.OK, time.monotonic() - start, message, started_at=started_at, facts=facts
        )
        self.stages.append(result)
        self.emit.end(node, result)
        return message

    async def keys_stage(self, stage: Stage, phase: keys.Phase, require: bool) -> None:
        """Upload the phase's keys; with none, record the stage without any output."""
        if not any(k.upload_at.value == phase for k in self.config.keys):
            self.stages.append(
                StageResult(stage, Status.OK, 0.0, f"no {phase} keys", started_at=time.time())
            )
            return
        await self.stage(
            stage, lambda: _keys(self.host, self.config, self.settings, phase, require)
        )


class StepError(WaggleError):
    exit_code = 1


async def _deploy_node(
    built: NodeResult,
    config: NodeConfig,
    settings: DeploySettings,
    host: Host,
    permits: asyncio.Semaphore,
    emit: Emitter,
) -> NodeResult:
    goal = settings.goal
    p = _Pipeline(config, settings, host, emit)
    p.current = Stage.KEYS if goal is Goal.UPLOAD_KEYS else Stage.PUSH
    toplevel = built.out_path
    build_on_target = (
        settings.build_on_target if settings.build_on_target is not None else config.build_on_target
    )
    try:
        async with permits:
            if build_on_target and goal is not Goal.UPLOAD_KEYS:
                assert built.drv_path is not None

                async def build_remote() -> tuple[str, Facts]:
                    pushed = await push_closure(
                        host, built.drv_path or "", substitute=True, timeout=settings.push_timeout
                    )
                    done = await host.run(
                        ["nix-store", "--no-gc-warning", "--realise", built.drv_path or ""],
                        timeout=settings.push_timeout,
                    )
                    if not done.ok:
                        raise StepError(
                            f"build on {host.name} failed: {done.describe()}", detail=done.stderr
                        )
                    # The facts of the .drv closure's push (its size is not the system's).
                    return f"built on target ({pushed.describe()})", pushed.facts(closure=False)

                await p.stage(Stage.BUILD, build_remote)
            elif goal is not Goal.UPLOAD_KEYS:

                async def push() -> tuple[str, Facts]:
                    assert toplevel is not None
                    result = await push_closure(
                        host,
                        toplevel,
                        substitute=settings.substitute,
                        timeout=settings.push_timeout,
                    )
                    return result.describe(), result.facts()

                await p.stage(Stage.PUSH, push)
            if goal in (Goal.BUILD, Goal.PUSH):
                return _result(built, p.stages)

            if goal is Goal.UPLOAD_KEYS:
                await p.stage(Stage.KEYS, lambda: _keys(host, config, settings, "all", True))
                return _result(built, p.stages)

            assert toplevel is not None
            if settings.keys:
                p.current = Stage.KEYS
                await p.keys_stage(Stage.KEYS, "pre-activation", False)
            p.current = Stage.ACTIVATE
            current = await activation.current_system(host)
            if (
                not config.replace_unknown_profiles
                and not settings.force_replace_unknown_profiles
                and current.profile is not None
                and not os.path.exists(current.profile)
            ):
                p.fail(
                    Stage.ACTIVATE,
                    f"unknown active profile {current.profile} (replaceUnknownProfiles is false; "
                    "--force-replace-unknown-profiles overrides)",
                )
                return _result(built, p.stages)
            unchanged = _unchanged(goal, toplevel, current)
            if unchanged and not settings.force and not settings.reboot:
                await p.stage(Stage.ACTIVATE, _nothing, skipped="unchanged")
            else:

                async def activate() -> str:
                    assert toplevel is not None
                    result = await activation.activate(
                        host,
                        toplevel,
                        str(goal),
                        set_profile=goal.sets_profile,
                        timeout=settings.activation_timeout,
                        on_line=lambda line: emit.log(config.name, line, Stage.ACTIVATE),
                    )
                    if not result.ok:
                        raise StepError(result.message, detail=result.log_tail)
                    return result.message

                await p.stage(Stage.ACTIVATE, activate)
                if settings.reboot:

                    async def reboot() -> str:
                        result = await activation.reboot_and_wait(
                            host,
                            timeout=settings.reboot_timeout,
                            expect_toplevel=toplevel if goal.sets_profile else None,
                        )
                        if not result.ok:
                            raise StepError(result.message)
                        return result.message

                    await p.stage(Stage.CONFIRM, reboot)
            if settings.keys:
                p.current = Stage.POST_KEYS
                await p.keys_stage(Stage.POST_KEYS, "post-activation", True)
    except _StageFailedError:
        pass
    except Exception as e:  # noqa: BLE001 - between stages: still this node's failure
        message, detail = failure_text(e)
        p.fail(p.current, message, detail)
    return _result(built, p.stages)


async def _nothing() -> str:
    return ""


def _unchanged(goal: Goal, toplevel: str, current: activation.CurrentSystem) -> bool:
    running = current.current == toplevel
    booting = current.profile == toplevel
    if goal is Goal.SWITCH:
        return running and booting
    if goal is Goal.BOOT:
        return booting
    if goal is Goal.TEST:
        return running
    return False  # dry-activate always runs: it only reports


async def _keys(
    host: Host, config: NodeConfig, settings: DeploySettings, phase: keys.Phase, require: bool
) -> str:
    outcome = await keys.upload_keys(
        host,
        config.keys,
        phase=phase,
        require_ownership=require,
        base_dir=settings.base_dir,
        timeout=settings.key_timeout,
    )
    return outcome.message


async def _close(host: Host) -> None:
    """Close a host's connection; idempotent, never raises, bounded by the host's own close."""
    with contextlib.suppress(Exception):
        await host.close()


def _result(built: NodeResult, stages: Sequence[StageResult]) -> NodeResult:
    return replace(built, stages=(*built.stages, *stages))


@dataclass(frozen=True)
class DeployRun:
    nodes: tuple[NodeResult, ...]
    build: BuildRun | None


async def deploy(
    hive: Hive,
    configs: Mapping[str, NodeConfig],
    names: Sequence[str],
    eval_settings: EvalSettings,
    build_settings: BuildSettings,
    settings: DeploySettings,
    *,
    host_factory: HostFactory | None = None,
    events: Sink | None = None,
    require_target_host: bool = True,
) -> DeployRun:
    """Run `settings.goal` for the selected nodes; results in `names` order.

    A node needs its host when the goal does, or when it builds on its target
    (then even the build goal goes to the host). Without a targetHost such a
    node is skipped, unless `require_target_host` is off (apply-local).
    """
    emit = Emitter(events or discard)
    make_host = host_factory or (lambda c: ssh_host_for(c, settings.ssh))
    limit = settings.parallel if settings.parallel > 0 else max(1, len(names))
    permits = asyncio.Semaphore(limit)
    goal = settings.goal

    def builds_on_target(n: str) -> bool:
        if goal is Goal.UPLOAD_KEYS:
            return False
        if settings.build_on_target is not None:
            return settings.build_on_target
        return configs[n].build_on_target

    on_target = {n for n in names if builds_on_target(n)}
    needs_host = {n for n in names if goal.needs_host or n in on_target}
    skipped: list[NodeResult] = []
    if require_target_host:
        for n in names:
            if n in needs_host and configs[n].target_host is None:
                stage = StageResult(
                    Stage.PUSH, Status.SKIPPED, 0.0, "no targetHost", started_at=time.time()
                )
                skipped.append(NodeResult(n, (stage,)))
                emit.queued(n)
                emit.end(n, stage)
                emit.done(skipped[-1])
    left_out = {r.name for r in skipped}
    reachable = [n for n in names if n not in left_out]
    hosts: dict[str, Host] = {n: make_host(configs[n]) for n in reachable if n in needs_host}

    async def then(built: NodeResult) -> NodeResult:
        host = hosts.get(built.name)
        if host is None:
            return built
        try:
            return await _deploy_node(built, configs[built.name], settings, host, permits, emit)
        finally:
            # Done with this host: its connection (and temp ssh config) goes now, not at
            # the end of the run, so a large fleet never holds a socket per finished node.
            await _close(host)

    try:
        if goal is Goal.UPLOAD_KEYS:

            async def keys_only(name: str) -> NodeResult:
                emit.queued(name)
                result = await then(NodeResult(name, ()))
                emit.done(result)
                return result

            results = await asyncio.gather(*(keys_only(n) for n in reachable))
            run = None
        else:
            run = await evaluate_and_build(
                hive,
                reachable,
                eval_settings,
                build_settings,
                build_elsewhere=on_target,
                then=then,
                events=emit.sink,
            )
            results = list(run.nodes)
    finally:
        for host in hosts.values():
            await _close(host)
    by_name = {r.name: r for r in [*results, *skipped]}
    return DeployRun(tuple(by_name[n] for n in names), run)
