"""The per-node deployment pipeline and the run-wide limits.

select -> evaluate (a streaming worker) -> build (or build on target) -> connect and
lock (the lock's channel answers the host query) -> push closure (through the run's
--cache when given) -> pre-activation keys -> set profile + activate (detached) ->
reboot -> health checks -> confirmation (magic rollback) -> post-activation keys -> result.

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
from pathlib import Path
from typing import NoReturn

from runner.build import BuildRun, BuildSettings, evaluate_and_build
from runner.deploy import activation, confirm, health, keys, waves
from runner.deploy.cache import CacheSettings, CacheUploader, cache_facts
from runner.deploy.hoststate import HostQuery, HostState, query_host
from runner.deploy.lock import RunIdentity, hold_lock
from runner.deploy.push import SUBSTITUTE_OPTIONS, Closure, closure_of, push_closure
from runner.errors import WaggleError, failure_text
from runner.evaluate import EvalRun, EvalSettings
from runner.events import Emitter, Sink, discard
from runner.goals import Goal
from runner.hive.hive import Hive
from runner.hive.model import NodeConfig
from runner.hosts import Host
from runner.hosts.ssh import SshSettings, ssh_host_for
from runner.results import NodeResult, Stage, StageResult, Status


def goal_stages(
    goal: Goal,
    *,
    reboot: bool = False,
    keys: bool = True,
    rollback: bool = False,
    health: bool = False,
) -> tuple[Stage, ...]:
    """The stages a goal runs, in order (what reports list for every node). `rollback`: the
    magic rollback is on (switch/test without --reboot get a confirm stage); `health`: nodes
    have health checks to run (after the activation, or the reboot). A rollback stage is
    listed only where one happened."""
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
        stages.append(Stage.REBOOT)
    if health and _checks_health(goal, reboot):
        stages.append(Stage.HEALTH)
    if rollback and _arms_rollback(goal, reboot):
        stages.append(Stage.CONFIRM)
    if keys:
        stages.append(Stage.POST_KEYS)
    return tuple(stages)


def _arms_rollback(goal: Goal, reboot: bool) -> bool:
    """switch and test can go back live; boot has nothing running yet, and a reboot would
    end the host's wait for the confirmation."""
    return goal in (Goal.SWITCH, Goal.TEST) and not reboot


def _checks_health(goal: Goal, reboot: bool) -> bool:
    """Health checks run once the new system runs: after switch/test, or after the reboot."""
    return goal in (Goal.SWITCH, Goal.TEST) or (reboot and goal is Goal.BOOT)


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
    # Safe rollouts: magic rollback, health checks, host locks, waves.
    rollback: bool = True  # switch/test: the host goes back unless confirmed in time
    confirm_timeout: float = 30.0  # seconds from activation's end to the confirmation
    health_checks: bool = True  # run deployment.healthChecks before confirming
    lock_timeout: float = 60.0  # how long to wait for another run's lock on a host
    run: RunIdentity | None = None  # the run in host locks (WAGGLE_RUN_ID); None: a new one
    waves: tuple[str, ...] = ()  # cumulative wave sizes: "1", "10%", "100%"; () = one wave
    max_failures: str = "0"  # failed nodes a wave may have before the next is not started
    wave_order: tuple[str, ...] = ()  # @tag globs ordering the nodes into waves
    cache: CacheSettings | None = None  # --cache: closures go through a binary cache

    def __post_init__(self) -> None:
        waves.Rollout.parse(self.waves, self.max_failures, self.wave_order)  # UsageError


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
    # The activation whose host waits for a confirmation (magic rollback), until decided.
    armed: activation.ActivationResult | None = None
    # What the host lacks and runs (hoststate.py): asked by the lock's channel, else once
    # by the first stage that needs it. The closure pushed, in export order.
    query: HostQuery | None = None
    state: HostState | None = None
    asked: bool = False
    closure: Closure | None = None
    uploader: CacheUploader | None = None  # --cache: the run's, shared by its nodes

    async def make_query(self, built: NodeResult) -> HostQuery | None:
        """The question for the host: the closure of what is pushed to it (None: keys only)."""
        if self.settings.goal is Goal.UPLOAD_KEYS:
            return None
        root = built.drv_path if _builds_on_target(self.settings, self.config) else built.out_path
        if root is None:
            return None
        self.closure = await closure_of(root)
        self.query = HostQuery(self.closure.paths)
        return self.query

    async def host_state(self) -> HostState | None:
        """The answer to the query; asked now (one command) unless the lock's channel did."""
        if self.state is None and self.query is not None and not self.asked:
            self.asked = True
            self.state = await query_host(self.host, self.query)
        return self.state

    async def current_system(self) -> activation.CurrentSystem:
        state = await self.host_state()
        if state is not None:
            return state.system
        return await activation.current_system(self.host)

    async def missing(self) -> list[str] | None:
        """The paths the host lacks; None: not known (the push asks, for its message)."""
        state = await self.host_state()
        return list(state.missing) if state is not None and state.missing is not None else None

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
        except _StageFailedError:
            raise  # the work recorded its own failure (e.g. a rollback)
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
        self.current = stage
        if not any(k.upload_at.value == phase for k in self.config.keys):
            self.stages.append(
                StageResult(stage, Status.OK, 0.0, f"no {phase} keys", started_at=time.time())
            )
            return
        await self.stage(
            stage, lambda: _keys(self.host, self.config, self.settings, phase, require)
        )

    async def run(self, built: NodeResult) -> None:
        """The stages of the goal, in order; a failing stage raises _StageFailedError."""
        goal = self.settings.goal
        if goal is Goal.UPLOAD_KEYS:
            await self.stage(
                Stage.KEYS, lambda: _keys(self.host, self.config, self.settings, "all", True)
            )
            return
        if _builds_on_target(self.settings, self.config):
            assert built.drv_path is not None
            drv = built.drv_path
            await self.stage(Stage.BUILD, lambda: self.build_on_host(drv))
        else:
            assert built.out_path is not None
            toplevel = built.out_path
            await self.stage(Stage.PUSH, lambda: self.push(toplevel))
        if goal in (Goal.BUILD, Goal.PUSH):
            return
        assert built.out_path is not None
        if self.settings.keys:
            await self.keys_stage(Stage.KEYS, "pre-activation", False)
        await self.activate(built.out_path)
        if self.settings.keys:
            await self.keys_stage(Stage.POST_KEYS, "post-activation", True)

    async def build_on_host(self, drv: str) -> tuple[str, Facts]:
        """buildOnTarget: push the derivation's closure, realise it on the host."""
        host, timeout = self.host, self.settings.push_timeout
        missing = await self.missing()
        pushed = await push_closure(
            host, drv, substitute=True, timeout=timeout, closure=self.closure, missing=missing
        )
        done = await host.run(["nix-store", "--no-gc-warning", "--realise", drv], timeout=timeout)
        if not done.ok:
            raise StepError(f"build on {host.name} failed: {done.describe()}", detail=done.stderr)
        # The facts of the .drv closure's push (its size is not the system's).
        return f"built on target ({pushed.describe()})", pushed.facts(closure=False)

    async def push(self, toplevel: str) -> tuple[str, Facts]:
        missing = await self.missing()
        upload = await self.uploader.upload(toplevel) if self.uploader is not None else None
        extra: tuple[str, ...] = ()
        if upload is not None and upload.ok and self.uploader is not None:
            extra = self.uploader.settings.substituter_options()  # for that command only
        result = await push_closure(
            self.host,
            toplevel,
            substitute=self.settings.substitute,
            timeout=self.settings.push_timeout,
            closure=self.closure,
            missing=missing,
            substitute_options=(*SUBSTITUTE_OPTIONS, *extra),
            from_cache=bool(extra),
        )
        if upload is None:
            return result.describe(), result.facts()
        text, facts = await cache_facts(
            upload, result.fetched, result.paths_sent, result.fetched_bytes
        )
        return "; ".join(t for t in (result.describe(), text) if t), (*result.facts(), *facts)

    async def activate(self, toplevel: str) -> None:
        """Activate unless the host already runs `toplevel`; reboot if asked."""
        settings, goal = self.settings, self.settings.goal
        self.current = Stage.ACTIVATE
        current = await self.current_system()
        if (
            not self.config.replace_unknown_profiles
            and not settings.force_replace_unknown_profiles
            and current.profile is not None
            and not os.path.exists(current.profile)
        ):
            message = (
                f"unknown active profile {current.profile} (replaceUnknownProfiles is false; "
                "--force-replace-unknown-profiles overrides)"
            )
            self.fail(Stage.ACTIVATE, message)
            raise _StageFailedError(self.stages[-1])
        if _unchanged(goal, toplevel, current) and not settings.force and not settings.reboot:
            await self.stage(Stage.ACTIVATE, _nothing, skipped="unchanged")
            return
        await self.stage(Stage.ACTIVATE, lambda: self.switch(toplevel))
        if settings.reboot:
            await self.stage(Stage.REBOOT, lambda: self.reboot(toplevel))
        if self.health_checks():
            await self.after_activation(Stage.HEALTH, self.run_health)
        if self.armed is not None:
            await self.after_activation(Stage.CONFIRM, lambda: self.confirmation(toplevel))

    def health_checks(self) -> bool:
        """Whether this node's health checks run (it has some, they are on, a system runs)."""
        settings = self.settings
        return (
            settings.health_checks
            and bool(self.config.health_checks)
            and _checks_health(settings.goal, settings.reboot)
        )

    def confirm_window(self) -> float:
        """How long the host waits for the confirmation: the confirm timeout, plus the time
        the health checks may take (they run between the activation and the confirmation,
        all at once)."""
        window = self.settings.confirm_timeout
        if self.health_checks():
            window += max(c.timeout for c in self.config.health_checks)
            window += health.LAST_TRY + health.SSH_GRACE
        return window

    async def switch(self, toplevel: str) -> str:
        goal, settings = self.settings.goal, self.settings
        rollback = settings.rollback and _arms_rollback(goal, settings.reboot)
        result = await activation.activate(
            self.host,
            toplevel,
            str(goal),
            set_profile=goal.sets_profile,
            timeout=settings.activation_timeout,
            on_line=lambda line: self.emit.log(self.config.name, line, Stage.ACTIVATE),
            confirm_window=self.confirm_window() if rollback else 0.0,
            lock_run_id=settings.run.run_id if settings.run else "",  # the runner holds it
        )
        if not result.ok:
            raise StepError(result.message, detail=result.log_tail)
        if result.armed:
            self.armed = result
        elif rollback:
            why = "first deploy" if "no previous system" in result.rollback_note else ""
            return f"{result.message}; no rollback possible: {why or result.rollback_note}"
        return result.message

    async def run_health(self) -> str:
        return await health.run_health_checks(
            self.host,
            self.config.health_checks,
            default_host=self.config.target_host or "",
            on_line=lambda line: self.emit.log(self.config.name, line, Stage.HEALTH),
        )

    async def confirmation(self, toplevel: str) -> str:
        """Confirm over a new connection before the host's window ends; else the host goes
        back (and this stage fails with "rolled back: not confirmed within N s")."""
        armed = self.armed
        assert armed is not None
        deadline = armed.ended_at + self.confirm_window()
        done = await confirm.confirm(
            self.host, armed.directory, deadline=deadline, toplevel=toplevel
        )
        if not done.confirmed:
            why = f" ({done.why})" if done.why else ""
            raise confirm.NotConfirmedError(
                f"not confirmed within {self.settings.confirm_timeout:g} s{why}",
                outcome=done.outcome,
            )
        self.armed = None
        return f"Confirmed over a new SSH connection in {done.seconds:.1f} s"

    async def after_activation(self, stage: Stage, work: Callable[[], Awaitable[str]]) -> None:
        """A stage between the activation and its confirmation. If it fails while the host
        waits for a confirmation, the host is rolled back first and the failure says so
        ("rolled back: <why>"), followed by a rollback stage saying how that went."""

        async def guarded() -> str:
            started_at, start = time.time(), time.monotonic()
            try:
                return await work()
            except Exception as e:
                if self.armed is None:
                    raise  # nothing to roll back: an ordinary failure of the stage
                why, detail = failure_text(e)
                known = e.outcome if isinstance(e, confirm.NotConfirmedError) else None
                seconds = time.monotonic() - start
                await self.roll_back(stage, why, detail, started_at, seconds, known)

        await self.stage(stage, guarded)

    async def roll_back(
        self,
        stage: Stage,
        why: str,
        detail: str,
        started_at: float,
        seconds: float,
        known: confirm.Outcome | None = None,
    ) -> NoReturn:
        """Have the armed host go back (now, or it did already: `known`, its final outcome
        as read already); record `stage` as failed with the outcome in its message, then
        the rollback stage."""
        armed, node = self.armed, self.config.name
        assert armed is not None
        self.armed = None
        began_at, began = time.time(), time.monotonic()
        self.emit.start(node, Stage.ROLLBACK)
        self.current = Stage.ROLLBACK
        limit = self.settings.activation_timeout + activation.GRACE
        outcome = known
        if outcome is None or not outcome.final:
            outcome = await confirm.roll_back(self.host, armed.directory, timeout=limit)
        if outcome.rolled_back:
            message, status = f"rolled back: {why}", Status.OK
        else:
            message, status = f"{why}; {outcome.describe()}", Status.FAILED
        facts: Facts = ()
        if outcome.host_seconds is not None:
            facts = (("host_seconds", outcome.host_seconds),)
        failed = StageResult(stage, Status.FAILED, seconds, message, detail, started_at)
        back = StageResult(
            Stage.ROLLBACK,
            status,
            time.monotonic() - began,
            outcome.describe(),
            outcome.log,
            began_at,
            facts,
        )
        self.stages += [failed, back]
        self.emit.end(node, failed)
        self.emit.end(node, back)
        raise _StageFailedError(failed)

    async def reboot(self, toplevel: str) -> str:
        result = await activation.reboot_and_wait(
            self.host,
            timeout=self.settings.reboot_timeout,
            expect_toplevel=toplevel if self.settings.goal.sets_profile else None,
        )
        if not result.ok:
            raise StepError(result.message)
        return result.message


class StepError(WaggleError):
    exit_code = 1


@dataclass(frozen=True)
class _Shared:
    """What a run's nodes share: the --parallel permits, the --cache uploader."""

    permits: asyncio.Semaphore
    uploader: CacheUploader | None

    @classmethod
    def of(cls, settings: DeploySettings, nodes: int) -> _Shared:
        permits = asyncio.Semaphore(settings.parallel if settings.parallel > 0 else max(1, nodes))
        return cls(permits, CacheUploader(settings.cache) if settings.cache else None)


async def _deploy_node(
    built: NodeResult,
    config: NodeConfig,
    settings: DeploySettings,
    host: Host,
    shared: _Shared,
    emit: Emitter,
) -> NodeResult:
    """Run one node's pipeline under a --parallel permit. Total: whatever goes wrong
    (inside a stage or between stages) is a failed stage of this node, never an exception."""
    p = _Pipeline(config, settings, host, emit, uploader=shared.uploader)
    permits = shared.permits
    p.current = Stage.KEYS if settings.goal is Goal.UPLOAD_KEYS else Stage.PUSH
    # The host's lock, for all of this node's host work (runner/deploy/lock.py); not
    # getting it is the first stage's failure.
    try:
        async with permits:
            # The lock's channel also answers the query (hoststate.py): one command fewer.
            lock = hold_lock(
                host,
                settings.run or RunIdentity.new(),
                timeout=settings.lock_timeout,
                on_wait=lambda line: emit.log(config.name, line, p.current),
                query=await _connecting_meanwhile(host, p.make_query(built)),
            )
            async with lock as state:
                p.state = state
                await p.run(built)
    except _StageFailedError:
        pass
    except Exception as e:  # noqa: BLE001 - between stages: still this node's failure
        message, detail = failure_text(e)
        p.fail(p.current, message, detail)
    return _result(built, p.stages)


async def _nothing() -> str:
    return ""


async def _connecting_meanwhile(host: Host, work: Awaitable[HostQuery | None]) -> HostQuery | None:
    """`work` (the local closure query) while the host's connection is made (SshHost); a host
    that cannot be reached raises here, as its first command would."""
    connect = getattr(host, "connect", None)
    if connect is None:
        return await work
    connecting = asyncio.ensure_future(connect())
    try:
        found = await work
    except BaseException:
        connecting.cancel()
        connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    await connecting
    return found


def _unchanged(goal: Goal, toplevel: str, current: activation.CurrentSystem) -> bool:
    return current.runs(str(goal), toplevel)  # Waggle recorded that activation as a success


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


def _builds_on_target(settings: DeploySettings, config: NodeConfig) -> bool:
    if settings.goal is Goal.UPLOAD_KEYS:
        return False
    chosen = settings.build_on_target
    return chosen if chosen is not None else config.build_on_target


def _no_target_host(
    names: Sequence[str], configs: Mapping[str, NodeConfig], needs_host: set[str], emit: Emitter
) -> list[NodeResult]:
    """Results of the nodes that need a host but have no targetHost: skipped."""
    skipped = []
    for n in names:
        if n in needs_host and configs[n].target_host is None:
            stage = StageResult(
                Stage.PUSH, Status.SKIPPED, 0.0, "no targetHost", started_at=time.time()
            )
            skipped.append(NodeResult(n, (stage,)))
            emit.queued(n)
            emit.end(n, stage)
            emit.done(skipped[-1])
    return skipped


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
    evaluated: EvalRun | None = None,
) -> DeployRun:
    """Run `settings.goal` for the selected nodes; results in `names` order.

    A node needs its host when the goal does, or when it builds on its target
    (then even the build goal goes to the host). Without a targetHost such a
    node is skipped, unless `require_target_host` is off (apply-local).
    """
    if settings.run is None:  # one run id for every host of this run
        settings = replace(settings, run=RunIdentity.new())
    emit = Emitter(events or discard)
    make_host = host_factory or (lambda c: ssh_host_for(c, settings.ssh))
    shared = _Shared.of(settings, len(names))
    goal = settings.goal
    on_target = {n for n in names if _builds_on_target(settings, configs[n])}
    needs_host = {n for n in names if goal.needs_host or n in on_target}
    skipped = _no_target_host(names, configs, needs_host, emit) if require_target_host else []
    left_out = {r.name for r in skipped}
    reachable = [n for n in names if n not in left_out]
    # --waves gate the host work; the gate sees every node-end event (eval/build failures too)
    gate, emit = waves.gate_for(settings, [n for n in reachable if n in needs_host], configs, emit)
    opened: dict[str, Host] = {}

    async def then(built: NodeResult) -> NodeResult:
        if built.name not in needs_host:
            return built
        if gate is not None and (held := await gate.enter(built.name)) is not None:
            return gate.held_back(built, _first_stage(goal, built.name in on_target), held)
        config = configs[built.name]
        try:
            host = opened[built.name] = make_host(config)
        except Exception as e:  # noqa: BLE001 - e.g. a target that cannot be described
            message, detail = failure_text(e)
            failed = StageResult(Stage.PUSH, Status.FAILED, 0.0, message, detail, time.time())
            emit.end(built.name, failed)
            return _result(built, (failed,))
        try:
            return await _deploy_node(built, config, settings, host, shared, emit)
        finally:
            # Done with this host: its connection (and temp ssh config) goes now, not at
            # the end of the run, so a large fleet never holds a socket per finished node.
            await _close(host)

    async def keys_only(name: str) -> NodeResult:
        emit.queued(name)
        result = await then(NodeResult(name, ()))
        emit.done(result)
        return result

    try:
        if goal is Goal.UPLOAD_KEYS:
            results, run = await asyncio.gather(*(keys_only(n) for n in reachable)), None
        else:
            run = await evaluate_and_build(
                hive,
                reachable,
                eval_settings,
                build_settings,
                build_elsewhere=on_target,
                then=then,
                events=emit.sink,
                evaluated=evaluated,  # head from the change plan (evaluate_and_build)
            )
            results = list(run.nodes)
    finally:
        for host in opened.values():
            await _close(host)
    by_name = {r.name: gate.mark(r) if gate else r for r in [*results, *skipped]}
    return DeployRun(tuple(by_name[n] for n in names), run)


def _first_stage(goal: Goal, on_target: bool) -> Stage:
    """The first stage of a node's host work."""
    if on_target:
        return Stage.BUILD
    return Stage.KEYS if goal is Goal.UPLOAD_KEYS else Stage.PUSH
