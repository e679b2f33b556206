"""`waggle ci`: plan on pull requests, deploy on pushes to a deploy branch, build otherwise.

The CI context (`gitops.ci.detect`) and waggle.yaml (from the base commit on a pull
request, see `gitops.trust`) decide the mode; flags win over the file. Each mode is an
ordinary use case run with a request built here: `plan.plan` (+ a dry activation with
the base's host settings), or `run.apply` with `--changed-since` (deploy) or the build
goal.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace

from runner.app.plan import plan, write_plan_reports
from runner.app.requests import (
    ApplyRequest,
    Changes,
    CiRequest,
    PlanRequest,
    Reports,
    parse_node_limit,
)
from runner.app.run import apply, log_evaluation, open_hive, progress
from runner.deploy.cache import CONFIG_KEYS, cache_settings
from runner.deploy.pipeline import DeploySettings, deploy, goal_stages
from runner.errors import WaggleError
from runner.gitinfo import head_commit
from runner.gitops import ci, comments, trust
from runner.gitops.config import CiConfig, load_config, merge
from runner.gitops.plan import DEFAULT_IGNORE, NodeChange, Plan
from runner.goals import Goal
from runner.results import NodeResult, RunSummary, Status
from runner.shard import ShardSpec

log = logging.getLogger("waggle")


@dataclass(frozen=True)
class CiOutcome:
    mode: ci.Mode
    ok: bool
    plan: Plan | None = None
    runs: tuple[RunSummary, ...] = ()  # the deploy or build run; the PR's dry activation
    annotations: tuple[str, ...] = ()  # lines for the CI log (GitHub workflow commands)
    failed: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True)
class CiPrinter:
    """Where `run_ci` says what it does while it runs (the CLI prints)."""

    mode: Callable[[str], None]
    plan: Callable[[Plan, str], None]  # the plan and its markdown
    run: Callable[[RunSummary], None]  # the deploy or build run
    dry_run: Callable[[RunSummary], None] | None = None  # a PR's dry activation (else `run`)


def settings_for(
    request: CiRequest, context: ci.CiContext
) -> tuple[CiConfig, trust.PrSettings | None]:
    """waggle.yaml (the base commit's on a pull request) with the flags merged in."""
    pr_settings = (
        trust.pr_config(request.ci_config, search_from=request.apply.hive.cwd, base=context.base)
        if context.is_pull_request
        else None
    )
    config = merge(
        pr_settings.config
        if pr_settings is not None
        else load_config(request.ci_config, search_from=request.apply.hive.cwd),
        {
            "on": request.on,
            "junit": request.reports.junit,
            "report_md": request.reports.markdown,
            "comment": request.comment,
            "cache_dir": request.cache_dir,
            "ignore": request.ignore,
        },
    )
    return config, pr_settings


def apply_request(request: CiRequest, config: CiConfig) -> ApplyRequest:
    """The flags' run settings with what waggle.yaml fills in where no flag was given."""
    base = request.apply
    hive = base.hive
    if config.hive and hive.config is None:
        hive = replace(hive, config=config.hive)
    deploy_settings = _rollout(request, config)
    if config.parallel is not None and not request.parallel_given:
        deploy_settings = replace(deploy_settings, parallel=config.parallel)
    eval_settings = base.eval
    if config.eval_node_limit is not None and eval_settings.node_limit is None:
        eval_settings = replace(eval_settings, node_limit=parse_node_limit(config.eval_node_limit))
    return replace(
        base,
        hive=hive,
        on=config.on,
        eval=eval_settings,
        deploy=deploy_settings,
        reports=Reports(junit=config.junit, markdown=config.report_md, json=request.reports.json),
        command="ci",
    )


def shard_for(request: CiRequest, env: Mapping[str, str]) -> tuple[ShardSpec | None, str]:
    """The job's shard: --shard, else the CI's variables (`ci.shard_from_env`); and the
    mode line's words on where it came from."""
    found = ci.shard_from_env(env)
    given = request.apply.shard
    if given is not None:
        over = f", over {found.source}'s {found.spec}" if found and found.spec != given else ""
        return given, f"; shard {given} (from --shard{over})"
    return (found.spec, f"; shard {found.spec} (from {found.source})") if found else (None, "")


def _rollout(request: CiRequest, config: CiConfig) -> DeploySettings:
    """The flags' deploy settings with waggle.yaml's `rollout:` and `cache:` where no flag
    was given."""
    deploy = config.rollout.over(
        request.apply.deploy,
        max_failures_given=request.max_failures_given,
        confirm_timeout_given=request.confirm_timeout_given,
    )
    cache = config.cache
    if cache.url is not None and deploy.cache is None:  # --cache wins over the file
        key = str(cache.key) if cache.key is not None else None
        settings = cache_settings(cache.url, cache.substituter, key, cache.public_key, CONFIG_KEYS)
        deploy = replace(deploy, cache=settings)
    return deploy


async def run_ci(
    request: CiRequest, printer: CiPrinter, environ: MutableMapping[str, str] | None = None
) -> CiOutcome:
    """Run the CI step; `environ` (default os.environ) holds the CI's variables, and the
    known credentials are removed from it before a pull request's code is evaluated."""
    env = os.environ if environ is None else environ
    context = ci.detect(env)
    config, pr_settings = settings_for(request, context)
    chosen = ci.mode(context, config)
    shard, why = shard_for(request, env)
    printer.mode(f"waggle ci: {ci.mode_reason(context, config)}{why}")
    run_request = replace(apply_request(request, config), shard=shard)
    if chosen == "plan":
        outcome = await _plan(run_request, config, context, pr_settings, printer, env)
    else:
        outcome = await _deploy_or_build(run_request, config, context, chosen, printer)
    annotations = tuple(ci.annotations(list(outcome.failed), context.provider))
    ci.write_outputs(context, _outputs(outcome), env, dotenv=config.outputs_dotenv)
    return replace(outcome, annotations=annotations)


def _outputs(outcome: CiOutcome) -> dict[str, str]:
    failed = [n for n, _ in outcome.failed]
    if outcome.plan is not None:
        affected = [n.name for n in outcome.plan.affected if n.kind != "removed"]
        return ci.node_outputs(outcome.mode, affected, [], failed)
    summary = outcome.runs[0]
    moved = [r.name for r in summary.nodes if r.ok and not _untouched(r)]
    return ci.node_outputs(outcome.mode, moved, moved if outcome.mode == "deploy" else [], failed)


def _untouched(result: NodeResult) -> bool:
    return any(st.status is Status.SKIPPED for st in result.stages)


async def _deploy_or_build(
    request: ApplyRequest,
    config: CiConfig,
    context: ci.CiContext,
    chosen: ci.Mode,
    printer: CiPrinter,
) -> CiOutcome:
    if chosen == "deploy":
        changes = Changes(
            since=context.base or "0" * 40,
            ignore=config.ignore or DEFAULT_IGNORE,
            cache_dir=config.cache_dir,
            drift=config.deploy_drifted,
        )
        goal = Goal.SWITCH
    else:
        changes, goal = None, Goal.BUILD
    # Only a deploy uploads to --cache/cache:: another branch's builds are never signed with
    # the fleet's key (hosts trust what it signs).
    cache = request.deploy.cache if chosen == "deploy" else None
    summary = await apply(
        replace(request, deploy=replace(request.deploy, goal=goal, cache=cache), changes=changes)
    )
    printer.run(summary)
    failed = tuple(ci.failed_nodes(summary))
    return CiOutcome(chosen, summary.ok, runs=(summary,), failed=failed)


async def _plan(
    request: ApplyRequest,
    config: CiConfig,
    context: ci.CiContext,
    pr_settings: trust.PrSettings | None,
    printer: CiPrinter,
    env: MutableMapping[str, str],
) -> CiOutcome:
    settings = pr_settings or trust.PrSettings(config)
    policy = trust.dry_activation_policy(context, replace(settings, config=config))
    # The comment's token is taken now; the PR's code is evaluated without any token.
    token = comments.token_from_env(context, env, config.token_env)
    trust.withhold_secrets(env, config.token_env)
    planned_run = await plan(
        PlanRequest(
            base=context.base,
            hive=request.hive,
            on=request.on,
            ignore=config.ignore or DEFAULT_IGNORE,
            cache_dir=config.cache_dir,
            eval=request.eval,
            build_jobs=request.build.jobs,
            build_timeout=request.build.timeout,
            host_access=policy.enabled,
            shard=request.shard,
        ),
        builders_from="base",  # a pull request's own meta.machinesFile is not used
    )
    result = trust.decide_dry_activation(planned_run, policy)
    result = replace(result, notes=(*result.notes, *settings.notes))
    text = write_plan_reports(result, request.reports)
    printer.plan(result, text)
    if config.comment and request.shard is not None:  # each shard would replace the others'
        log.warning("plan comment not posted: shard %s plans only part of the nodes", request.shard)
    elif config.comment:
        _comment(context, text, token, config)
    failed = [(n.name, n.error or "build failed") for n in result.failed]
    ok = result.ok
    runs: tuple[RunSummary, ...] = ()
    planned = [n for n in result.nodes if n.dry_activate_planned]
    if planned:
        # Show on the hosts what activation would change; nothing is switched.
        dry = await dry_activate_pr(request, planned, result)
        (printer.dry_run or printer.run)(dry)
        failed += ci.failed_nodes(dry)
        ok, runs = dry.ok, (dry,)
    return CiOutcome("plan", ok, plan=result, runs=runs, failed=tuple(failed))


def _comment(
    context: ci.CiContext, text: str, token: comments.ForgeToken | None, config: CiConfig
) -> None:
    if token is None:
        log.warning("no API token in the environment: the plan is not posted")
        return
    try:
        outcome = comments.upsert_comment(
            context,
            text,
            token=token.value,
            token_header=token.header,
            allow_fork=config.comment_forks,
        )
        log.warning("plan comment %s", outcome)
    except WaggleError as e:  # the plan itself stands
        log.warning("plan comment failed: %s", e.message)


async def dry_activate_pr(
    request: ApplyRequest, planned: Sequence[NodeChange], of_plan: Plan | None = None
) -> RunSummary:
    """Dry-activate a pull request's planned nodes: the PR's systems (as the plan
    evaluated and built them: not evaluated again), each host reached only with the base's
    connection settings, no keys, no build on a target, no remote builders from the PR's
    meta (the plan's are the base commit's); nothing switched."""
    started_at, start = time.time(), time.monotonic()
    hive = await open_hive(request.hive)
    machines_file = of_plan.machines_file if of_plan is not None else None
    hive = hive.with_flags(replace(hive.flags, machines_file=machines_file))
    evaluated = of_plan.head_evaluation if of_plan is not None else None
    names = [n.name for n in planned]
    configs = {n.name: trust.dry_activation_config(n) for n in planned}
    settings: DeploySettings = replace(
        request.deploy,
        goal=Goal.DRY_ACTIVATE,
        waves=(),  # nothing is switched: no canary to wait for
        keys=False,
        build_on_target=False,
        reboot=False,
        cache=None,  # a PR's closures are never signed with the fleet's key nor uploaded
        base_dir=hive.source.directory,
    )
    with progress(request.view, names, plain=True) as out:
        run = await deploy(
            hive,
            configs,
            names,
            request.eval,
            request.build,
            settings,
            events=out,
            evaluated=evaluated,
        )
        if run.build is not None:
            log_evaluation(run.build.evaluation)
    return RunSummary(
        command="ci dry-activate",
        goal=str(Goal.DRY_ACTIVATE),
        hive=hive.source.describe(),
        commit=head_commit(hive.source.directory),
        started_at=started_at,
        seconds=time.monotonic() - start,
        stages=goal_stages(Goal.DRY_ACTIVATE, keys=False),
        nodes=tuple(run.nodes),
    )
