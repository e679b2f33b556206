"""Building evaluated nodes, overlapping with the evaluation of later nodes."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner import nix
from runner.errors import NixError, failure_text
from runner.evaluate import EvalRun, EvalSettings, NodeEval, evaluate
from runner.events import Emitter, Sink, discard
from runner.hive.hive import Hive
from runner.nix import NixFlags
from runner.results import NodeResult, Stage, StageResult, Status

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class BuildSettings:
    jobs: int = 2  # concurrent nix-store --realise processes
    timeout: float = 3 * 3600.0
    gc_root_dir: Path | None = None  # --keep-result: <dir>/node-<name>


def gc_root_path(directory: Path, node: str) -> Path:
    return directory / f"node-{_SAFE.sub('_', node)}"


def _eval_stage(ev: NodeEval) -> StageResult:
    if ev.ok:
        return StageResult(Stage.EVAL, Status.OK, ev.seconds, started_at=ev.started_at)
    return StageResult(
        Stage.EVAL, Status.FAILED, ev.seconds, ev.error or "failed", ev.detail, ev.started_at
    )


async def build_node(ev: NodeEval, flags: NixFlags, settings: BuildSettings) -> NodeResult:
    """`nix-store --realise` of an evaluated node (the eval stage and the build stage).

    `waggle build`/`apply` and `waggle plan` (`gitops.plan.build_and_diff`) build with it.
    """
    eval_stage = _eval_stage(ev)
    if not ev.ok or ev.drv_path is None:
        return NodeResult(ev.name, (eval_stage,))
    root = None
    if settings.gc_root_dir is not None:
        settings.gc_root_dir.mkdir(parents=True, exist_ok=True)
        root = str(gc_root_path(settings.gc_root_dir, ev.name))
    start, started_at = time.monotonic(), time.time()
    try:
        realised = await nix.realise([ev.drv_path], flags, gc_root=root, timeout=settings.timeout)
    except NixError as e:
        stage = StageResult(
            Stage.BUILD, Status.FAILED, time.monotonic() - start, e.summary, e.detail, started_at
        )
        return NodeResult(ev.name, (eval_stage, stage), ev.drv_path)
    del realised  # the output path is known from evaluation
    stage = StageResult(
        Stage.BUILD, Status.OK, time.monotonic() - start, ev.out_path or "", started_at=started_at
    )
    return NodeResult(ev.name, (eval_stage, stage), ev.drv_path, ev.out_path)


class _Validity:
    """Which outputs are already valid in the local store, asked once per batch.

    Nodes that finished at about the same moment ask together; one
    `nix-store --check-validity` answers them all, and their builds are skipped.
    Any doubt (Nix failing) counts as "not valid": the build then runs as usual.
    """

    def __init__(self) -> None:
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._task: asyncio.Task[None] | None = None

    async def valid(self, path: str) -> bool:
        future = self._pending.get(path)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[path] = future
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._answer())
        return await future

    async def _answer(self) -> None:
        await asyncio.sleep(0)  # let the rest of the batch ask first
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                invalid = await nix.invalid(list(batch), timeout=120)
            except NixError:
                invalid = frozenset(batch)
            for path, future in batch.items():
                if not future.done():
                    future.set_result(path not in invalid)


@dataclass(frozen=True)
class BuildRun:
    nodes: tuple[NodeResult, ...]
    evaluation: EvalRun


Continuation = Callable[[NodeResult], Awaitable[NodeResult]]


async def evaluate_and_build(
    hive: Hive,
    names: Sequence[str],
    eval_settings: EvalSettings,
    build_settings: BuildSettings | None,
    *,
    build_elsewhere: Container[str] = (),
    then: Continuation | None = None,
    events: Sink | None = None,
    evaluated: EvalRun | None = None,
) -> BuildRun:
    """Evaluate `names` (streaming workers); build each node as soon as it is evaluated.

    Nodes in `build_elsewhere` (buildOnTarget) are evaluated only. `then`
    continues each node that got this far without failing (push, activate).
    Nodes in `evaluated` (a change plan's head) are not evaluated again (`_evaluate_rest`).
    """
    limit = asyncio.Semaphore(max(1, build_settings.jobs if build_settings else 1))
    tasks: list[asyncio.Task[NodeResult]] = []
    emit = Emitter(events or discard)
    for name in names:
        emit.queued(name)

    validity = _Validity()

    async def build_one(ev: NodeEval) -> NodeResult:
        try:
            result = await build_then(ev)
        except Exception as e:  # noqa: BLE001 - a bug or surprise stays this node's failure
            message, detail = failure_text(e)
            failed = StageResult(Stage.BUILD, Status.FAILED, 0.0, message, detail, time.time())
            emit.end(ev.name, failed)
            result = NodeResult(ev.name, (_eval_stage(ev), failed), ev.drv_path, ev.out_path)
        emit.done(result)
        return result

    async def build_then(ev: NodeEval) -> NodeResult:
        eval_stage = _eval_stage(ev)
        emit.end(ev.name, eval_stage, (ev.drv_path, ev.out_path))
        if build_settings is None or ev.name in build_elsewhere or not ev.ok:
            result = NodeResult(ev.name, (eval_stage,), ev.drv_path, ev.out_path)
        elif (
            build_settings.gc_root_dir is None
            and ev.out_path is not None
            and await validity.valid(ev.out_path)
        ):
            built = StageResult(
                Stage.BUILD,
                Status.OK,
                0.0,
                ev.out_path,
                started_at=time.time(),
                facts=(("already_built", 1),),
            )
            emit.end(ev.name, built)
            result = NodeResult(ev.name, (eval_stage, built), ev.drv_path, ev.out_path)
        else:
            async with limit:
                emit.start(ev.name, Stage.BUILD, "building")
                result = await build_node(ev, hive.flags, build_settings)
            emit.end(ev.name, result.stages[-1])
        if then is not None and result.ok:
            result = await then(result)
        return result

    def on_result(ev: NodeEval) -> None:
        tasks.append(asyncio.create_task(build_one(ev)))

    def on_start(started: Sequence[str]) -> None:
        for name in started:  # its evaluator has begun on it
            emit.start(name, Stage.EVAL, "evaluating")

    try:
        run = await _evaluate_rest(hive, names, eval_settings, evaluated, on_result, on_start)
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    order = {n: i for i, n in enumerate(names)}
    return BuildRun(tuple(sorted(results, key=lambda r: order[r.name])), run)


async def _evaluate_rest(
    hive: Hive,
    names: Sequence[str],
    settings: EvalSettings,
    evaluated: EvalRun | None,
    on_result: Callable[[NodeEval], None],
    on_start: Callable[[Sequence[str]], None],
) -> EvalRun:
    """Evaluate `names`, except those `evaluated` holds (head, evaluated by a change plan
    with the same hive and flags: `apply --changed-since`, `waggle ci` on a push). Their
    results go to `on_result` at once, eval stage with its own time; the run returned is
    the new evaluation, or `evaluated` when nothing was left to evaluate."""
    known = evaluated.results if evaluated is not None else {}
    rest = [n for n in names if n not in known]
    on_start([n for n in names if n in known])
    for name in names:
        if name in known:
            on_result(known[name])
    if evaluated is not None and not rest:
        return evaluated
    return await evaluate(hive, rest, settings, on_result, on_start)
