"""Building evaluated nodes, overlapping with the evaluation of later chunks."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner import nix
from runner.errors import NixError
from runner.evaluate import EvalRun, EvalSettings, NodeEval, evaluate
from runner.events import Emitter, Sink, discard
from runner.hive.hive import Hive
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


async def build_node(ev: NodeEval, hive: Hive, settings: BuildSettings) -> NodeResult:
    eval_stage = _eval_stage(ev)
    if not ev.ok or ev.drv_path is None:
        return NodeResult(ev.name, (eval_stage,))
    root = None
    if settings.gc_root_dir is not None:
        settings.gc_root_dir.mkdir(parents=True, exist_ok=True)
        root = str(gc_root_path(settings.gc_root_dir, ev.name))
    start, started_at = time.monotonic(), time.time()
    try:
        realised = await nix.realise(
            [ev.drv_path], hive.flags, gc_root=root, timeout=settings.timeout
        )
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
) -> BuildRun:
    """Evaluate `names` in chunks; build each node as soon as its chunk is done.

    Nodes in `build_elsewhere` (buildOnTarget) are evaluated only. `then`
    continues each node that got this far without failing (push, activate).
    """
    limit = asyncio.Semaphore(max(1, build_settings.jobs if build_settings else 1))
    tasks: list[asyncio.Task[NodeResult]] = []
    emit = Emitter(events or discard)
    for name in names:
        emit.queued(name)

    async def build_one(ev: NodeEval) -> NodeResult:
        eval_stage = _eval_stage(ev)
        emit.end(ev.name, eval_stage)
        if build_settings is None or ev.name in build_elsewhere or not ev.ok:
            result = NodeResult(ev.name, (eval_stage,), ev.drv_path, ev.out_path)
        else:
            async with limit:
                emit.start(ev.name, Stage.BUILD, "building")
                result = await build_node(ev, hive, build_settings)
            emit.end(ev.name, result.stages[-1])
        if then is not None and result.ok:
            result = await then(result)
        emit.done(result)
        return result

    def on_result(ev: NodeEval) -> None:
        tasks.append(asyncio.create_task(build_one(ev)))

    def on_start(chunk: Sequence[str]) -> None:
        for name in chunk:
            emit.start(name, Stage.EVAL, f"evaluating ({len(chunk)} in this evaluator)")

    try:
        run = await evaluate(hive, names, eval_settings, on_result, on_start)
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    order = {n: i for i, n in enumerate(names)}
    return BuildRun(tuple(sorted(results, key=lambda r: order[r.name])), run)
