"""Printing a command's typed results on stdout and stderr (for `runner.cli`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from runner import errors
from runner.deploy.exec import ExecOutcome
from runner.gitops.plan import Plan
from runner.goals import Goal
from runner.report import jsonreport, junit, markdown, text
from runner.report.plan import plan_json, plan_junit
from runner.results import RunSummary


def lines(items: Sequence[str], *, err: bool = False) -> None:
    for line in items:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def print_summary(
    summary: RunSummary, to_stdout: str | None = None, debug: bool = False, err: bool = False
) -> None:
    """A run's result on stdout (one line per node, or the report asked for with '-'; the
    node lines on stderr with `err`); with --debug, internal errors' tracebacks on stderr."""
    if to_stdout is not None:
        render = {"junit": junit.junit_xml, "markdown": markdown.markdown,
                  "json": jsonreport.dumps}[to_stdout]  # fmt: skip
        print(render(summary))
    elif summary.goal == str(Goal.BUILD):
        lines(text.built_lines(summary.nodes), err=err)
        lines([f"waggle: {line}" for line in text.build_failure_lines(summary.nodes)], err=True)
    else:
        lines(text.deployed_lines(summary.nodes), err=err)
    if debug:
        lines([f"waggle: {line}" for line in text.internal_error_lines(summary.nodes)], err=True)


def print_plan(result: Plan, rendered: str, to_stdout: str | None) -> None:
    if to_stdout == "json":
        print(json.dumps(plan_json(result), indent=2))
    elif to_stdout == "junit":
        print(plan_junit(result))
    else:
        print(rendered)


def print_exec(outcomes: Sequence[ExecOutcome]) -> None:
    for o in outcomes:
        print(f"=== {o.node}: {o.status} ===", flush=True)
        if o.stdout:
            print(o.stdout.rstrip("\n"), flush=True)
        if o.stderr:
            print(o.stderr.rstrip("\n"), file=sys.stderr, flush=True)


def print_error(e: errors.WaggleError) -> None:
    print(f"waggle: error: {e.message}", file=sys.stderr)
    if e.detail and e.detail.strip() and e.detail.strip() not in e.message:
        for line in e.detail.strip().splitlines()[-30:]:
            print(f"  | {line}", file=sys.stderr)
