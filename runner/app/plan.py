"""`waggle plan`: which nodes a git change affects, with package diffs; and its reports."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from runner.app.requests import PlanRequest, Reports
from runner.app.run import ReportError
from runner.gitops.builders import Side
from runner.gitops.plan import Plan, PlanBuildSettings, build_and_diff, compute_plan, hive_path_of
from runner.hive.discovery import locate
from runner.hive.selection import parse_on
from runner.report import markdown
from runner.report.plan import plan_json, plan_junit, plan_markdown


async def plan(request: PlanRequest, *, builders_from: Side = "head") -> Plan:
    """Evaluate base and head, compare, build what changed (unless asked not to).

    Remote builders: --builders, else meta.machinesFile of the `builders_from` commit
    (`waggle ci` passes "base" for a pull request: see runner.gitops.builders)."""
    source = locate(request.hive.config, request.hive.cwd)
    computed = await compute_plan(
        hive_path_of(source),
        request.base,
        request.head,
        selector=parse_on(request.on) if request.on is not None else None,
        ignore=request.ignore,
        cache_dir=request.cache_dir,
        flags=request.hive.flags,
        eval_settings=request.eval,
        host_access=request.host_access,
        builders_from=builders_from,
        shard=request.shard,
    )
    settings = PlanBuildSettings(
        jobs=max(1, request.build_jobs), timeout=request.build_timeout, build=request.build
    )
    return await build_and_diff(computed, request.hive.flags, settings)


def write_plan_reports(plan: Plan, reports: Reports) -> str:
    """Write the plan's report files and the GitHub step summary; return the markdown."""
    text = plan_markdown(plan)
    renderers: tuple[tuple[Path | None, Callable[[], str]], ...] = (
        (reports.markdown, lambda: text),
        (reports.junit, lambda: plan_junit(plan)),
        (reports.json, lambda: json.dumps(plan_json(plan), indent=2)),
    )
    try:
        for path, render in renderers:
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render())
        step_summary = markdown.step_summary_path(os.environ)
        if step_summary is not None:
            markdown.append_step_summary(text, step_summary)
    except OSError as e:
        raise ReportError(f"cannot write a report: {e.filename}: {e.strerror}") from e
    return text
