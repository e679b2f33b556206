"""build, apply and upload-keys: evaluate, build, deploy, write the reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from runner import interrupt
from runner.app.requests import ApplyRequest, HiveRef, Reports, View
from runner.build import BuildSettings, evaluate_and_build
from runner.deploy.cache import CacheUploader, upload_after_build
from runner.deploy.lock import RunIdentity
from runner.deploy.pipeline import deploy, goal_stages
from runner.errors import EXIT_NODES_FAILED, HiveError, UsageError, WaggleError
from runner.evaluate import COST, MEMORY, EvalRun
from runner.events import Recorder, Sink
from runner.gitinfo import head_commit
from runner.gitops.builders import missing_machines_file
from runner.gitops.changed import ChangeSelection, select_changed
from runner.gitops.plan import hive_path_of
from runner.goals import Goal
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.hive.model import NodeConfig
from runner.hive.selection import Selector, parse_on
from runner.progress import choose_output
from runner.report import jsonreport, junit, markdown
from runner.results import NodeResult, RunSummary
from runner.shard import ShardSpec, shard_nodes

log = logging.getLogger("waggle")


class ReportError(WaggleError):
    """A report file could not be written (the run itself happened)."""

    exit_code = EXIT_NODES_FAILED


@dataclass(frozen=True)
class Selection:
    names: list[str]
    configs: dict[str, NodeConfig]
    all_names: tuple[str, ...] = ()
    shard: ShardSpec | None = None  # --shard: `names` are this share of `sharded_from`
    sharded_from: tuple[str, ...] = ()  # with --shard: what --on selected, every shard's


async def open_hive(ref: HiveRef) -> Hive:
    source = locate(ref.config, ref.cwd)
    log.info("hive: %s", source.describe())
    return await Hive(source, ref.flags).prepared()


async def select(hive: Hive, on: str | None, shard: ShardSpec | None = None) -> Selection:
    """The nodes `--on` picks (all without it), with their deployment settings; with
    `shard`, only that share of them (`runner.shard`)."""
    selector: Selector | None = parse_on(on) if on is not None else None
    names = await hive.node_names()
    if not names:
        raise HiveError(f"{hive.source.describe()}: the hive has no nodes")
    configs: dict[str, NodeConfig] = {}
    if selector is not None and selector.needs_tags:
        configs = await hive.deployment(names)
    chosen = (
        names
        if selector is None
        else selector.select(names, {n: c.tags for n, c in configs.items()})
    )
    sharded_from: tuple[str, ...] = ()
    if shard is not None:
        sharded_from, chosen = tuple(chosen), shard_nodes(chosen, shard)
        log.info("shard %s: %d of %d selected node(s)", shard, len(chosen), len(sharded_from))
    if not configs:
        configs = await hive.deployment(chosen) if chosen else {}
    configs = {n: configs[n] for n in chosen}
    return Selection(chosen, configs, tuple(names), shard, sharded_from)


@contextlib.contextmanager
def progress(view: View, names: Sequence[str], *, plain: bool = False) -> Iterator[Sink]:
    """The live view on a terminal, else the plain log; log lines go through it meanwhile."""
    out = choose_output(
        sys.stderr,
        plain=plain or view.plain,
        color=view.color,
        env=os.environ,
        timestamps=view.timestamps,
        names=names,
    )
    root = logging.getLogger()
    saved = root.handlers[:]
    with out:
        handler = out.log_handler()
        handler.setFormatter(logging.Formatter("waggle: %(message)s"))
        root.handlers = [handler]
        try:
            yield out
        finally:
            root.handlers = saved


def gc_root_dir(hive: Hive, keep_result: bool) -> Path | None:
    return (hive.source.directory or Path.cwd()) / ".gcroots" if keep_result else None


def log_evaluation(run: EvalRun) -> None:
    queues = [p for p in run.processes if not p.alone]
    whys = [p.why for p in run.restarts]
    log.info(
        "evaluation: %d process(es) (%d restarted for memory, %d for cost, %d alone),"
        " nodes per process %s, peak %.0f MiB of a %.1f GiB budget",
        len(run.processes),
        whys.count(MEMORY),
        whys.count(COST),
        len(run.processes) - len(queues),
        [len(p.names) for p in queues],
        run.peak_rss_total / 2**20,
        run.budget.budget / 2**30,
    )


async def _hive_for_run(request: ApplyRequest) -> tuple[Hive, Selection]:
    hive = await open_hive(request.hive)
    meta = await hive.meta()
    if request.goal is not Goal.BUILD and request.on is None and not meta.allow_apply_all:
        raise UsageError(
            "no node filter: meta.allowApplyAll is false in this hive, so deploying needs --on"
        )
    hive = hive.with_flags(replace(hive.flags, machines_file=meta.machines_file))
    if hive.flags.builders is None and (warning := missing_machines_file(meta.machines_file)):
        log.warning("%s: no remote builders from it", warning)
    return hive, await select(hive, request.on, request.shard)


async def _changed(
    request: ApplyRequest, hive: Hive, selection: Selection, started_at: float
) -> tuple[Selection, ChangeSelection, list[NodeResult]]:
    """--changed-since: the affected and drifted nodes, and results for the rest."""
    assert request.changes is not None
    change = request.changes
    found = await select_changed(
        hive,
        hive_path_of(hive.source),
        change.since,
        selection.names,
        selection.configs,
        selector=parse_on(request.on) if request.on is not None else None,
        ignore=change.ignore,
        cache_dir=change.cache_dir,
        flags=hive.flags,
        eval_settings=request.eval,
        ssh=request.deploy.ssh,
        parallel=request.deploy.parallel,
        drift=request.goal.activates and change.drift,
        shard=selection.shard,
    )
    for node, why in found.deploy.items():
        log.info("%s: deploying (%s)", node, why)
    log.info("%d node(s) unchanged since %s", len(found.unchanged), change.since)
    chosen = [n for n in selection.names if n in found.deploy]
    narrowed = replace(selection, names=chosen, configs={n: selection.configs[n] for n in chosen})
    return narrowed, found, found.unchanged_results(started_at)


async def apply(request: ApplyRequest) -> RunSummary:
    """Evaluate, build and (for deploying goals) deploy; write the reports asked for.

    The reports are written whatever happens to the nodes; on SIGTERM/Ctrl-C too, with
    the unfinished nodes marked as interrupted (then the cancellation goes on up).
    """
    goal = request.goal
    started_at, start = time.time(), time.monotonic()
    # One id for the run: in every host lock it takes, and in its reports.
    run = request.deploy.run or RunIdentity.new()
    request = replace(request, deploy=replace(request.deploy, run=run))
    hive, selection = await _hive_for_run(request)
    left_alone: list[NodeResult] = []
    found: ChangeSelection | None = None
    if request.changes is not None and goal is not Goal.UPLOAD_KEYS:
        selection, found, left_alone = await _changed(request, hive, selection, started_at)
    checks = any(c.health_checks for c in selection.configs.values())
    stages = goal_stages(
        goal,
        reboot=request.deploy.reboot,
        keys=request.deploy.keys,
        rollback=request.deploy.rollback,
        health=request.deploy.health_checks and checks,
    )
    recorder = Recorder()
    stopped: asyncio.CancelledError | None = None
    try:
        evaluated = found.evaluated if found is not None else None
        nodes = await _evaluate_or_deploy(request, hive, selection, recorder, evaluated)
    except asyncio.CancelledError as e:  # SIGTERM / Ctrl-C: report what is known, then stop
        stopped = e
        nodes = recorder.results(selection.names, stages, interrupt.reason())
    if found is not None:
        nodes = [replace(r, reason=found.deploy.get(r.name, "")) for r in nodes]
    order = {n: i for i, n in enumerate(selection.all_names)}
    nodes = sorted([*nodes, *left_alone], key=lambda r: order.get(r.name, len(order)))
    taken = {r.name for r in nodes} | set(selection.sharded_from)  # not "not selected"
    summary = RunSummary(
        command=f"{request.command} {goal}" if request.command == "apply" else request.command,
        goal=str(goal),
        hive=hive.source.describe(),
        commit=head_commit(hive.source.directory),
        started_at=started_at,
        seconds=time.monotonic() - start,
        stages=stages,
        nodes=tuple(nodes),
        not_selected=tuple(n for n in selection.all_names if n not in taken),
        shard=selection.shard,
        sharded_from=selection.sharded_from,
        run_id=run.run_id,
    )
    write_reports(request.reports, summary)
    if stopped is not None:
        raise stopped
    return summary


def _builds_only(request: ApplyRequest, selection: Selection) -> bool:
    """Nothing goes to a host: the build goal, and no node builds on its target."""
    on_target = request.deploy.build_on_target
    return request.goal is Goal.BUILD and not (
        on_target
        or (on_target is None and any(c.build_on_target for c in selection.configs.values()))
    )


async def _evaluate_or_deploy(
    request: ApplyRequest,
    hive: Hive,
    selection: Selection,
    recorder: Recorder,
    evaluated: EvalRun | None = None,  # --changed-since: head, from the plan
) -> list[NodeResult]:
    if not selection.names:
        return []  # nothing changed: nothing to evaluate, build or deploy
    build = replace(request.build, gc_root_dir=gc_root_dir(hive, request.keep_result))
    names = selection.names
    if request.goal is Goal.UPLOAD_KEYS:
        build = BuildSettings()
    if _builds_only(request, selection):
        with progress(request.view, names) as out:
            recorder.sink = out
            cache = request.deploy.cache
            built = await evaluate_and_build(
                hive, names, request.eval, build, events=recorder, evaluated=evaluated,
                then=upload_after_build(CacheUploader(cache)) if cache else None,
            )  # fmt: skip
            log_evaluation(built.evaluation)
        return list(built.nodes)
    settings = replace(request.deploy, base_dir=hive.source.directory)
    with progress(request.view, names, plain=request.goal is Goal.DRY_ACTIVATE) as out:
        recorder.sink = out
        run = await deploy(
            hive,
            selection.configs,
            names,
            request.eval,
            build,
            settings,
            host_factory=request.host_factory,
            events=recorder,
            evaluated=evaluated,
        )
        if run.build is not None:
            log_evaluation(run.build.evaluation)
    return list(run.nodes)


def write_reports(reports: Reports, summary: RunSummary) -> None:
    """The report files asked for and the GitHub step summary; after the run, so a report
    that cannot be written is an error of its own (exit 1) and the run still happened."""
    writers = (
        (reports.junit, junit.write_junit, "JUnit"),
        (reports.markdown, markdown.write_markdown, "markdown"),
        (reports.json, jsonreport.write_json, "JSON"),
    )
    try:
        for path, write, what in writers:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write(summary, path)
                log.info("%s report: %s", what, path)
        step_summary = markdown.step_summary_path(os.environ)
        if step_summary is not None:
            markdown.write_step_summary(summary, step_summary)
    except OSError as e:
        raise ReportError(f"cannot write a report: {e.filename}: {e.strerror}") from e
