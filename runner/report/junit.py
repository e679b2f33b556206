"""`--junit PATH`: the run as JUnit XML, for GitLab's test reports and GitHub test actions.

Layout (one `<testsuite>` in a `<testsuites>`):

- the suite is named "waggle <command> <hive>", has a `timestamp` (the run's start, UTC,
  ISO 8601 without zone as the JUnit schema wants) and the properties `command`, `goal`,
  `hive`, `commit` (left out when unknown), `shard` ("2/3", only with --shard) and `run_id`
  (the id host locks name; left out of a merged report);
- one test case per selected node and stage (`report_stages`): `classname="waggle.<stage>"`
  (GitLab shows it as the suite), `name=<node>`, `time=<stage seconds>`:
  - a failed stage has a `<failure type="waggle.<stage>" message="<stage message>">` whose
    text repeats the message (GitLab ignores the attribute) followed by the last 50 lines of
    the stage's log, ANSI escapes stripped;
  - a skipped stage has `<skipped message="<reason>">` ("unchanged", "no targetHost", ...);
  - a stage the node never reached has `<skipped message="earlier stage failed: <stage>">`
    (or "not run" when nothing failed before it, or the reason its wave never started,
    "not reached: wave 1 exceeded the failure budget (1 failed)");
  - a passed stage has its message and facts ("paths_sent=12") as `<system-out>`;
- one test case per node left out by `--on`: `classname="waggle.selection"`, `name=<node>`,
  skipped "not selected" (one per node rather than one per stage: these nodes ran nothing).

Every (classname, name) pair is unique (GitLab keeps only the first of duplicates): a name
that repeats after cleaning is renamed "name (2)". Every string is cleaned with `clean_text`,
so the document is valid XML 1.0 whatever bytes the logs held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from junit_xml import (  # type: ignore[import-untyped]
    TestCase,
    TestSuite,
    to_xml_report_string,
)

from runner.report import (
    clean_text,
    iso_utc,
    log_tail,
    not_reached_reason,
    one_line,
    report_stages,
    stage_result,
    unique_names,
)
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status

SELECTION_CLASSNAME = "waggle.selection"
MESSAGE_CHARS = 1000  # the failure/skipped `message` attribute is one line of at most this


def classname(stage: Stage) -> str:
    return f"waggle.{stage}"


def junit_xml(summary: RunSummary) -> str:
    """The JUnit XML document of the run (a str; write it as UTF-8)."""
    stages = report_stages(summary)
    names = unique_names(one_line(n.name, 300) for n in summary.nodes)
    cases: list[Any] = []
    for node, name in zip(summary.nodes, names, strict=True):
        for stage in stages:
            cases.append(_case(node, name, stage, stages))
    for name in unique_names(one_line(n, 300) for n in summary.not_selected):
        case = TestCase(name, classname=SELECTION_CLASSNAME, elapsed_sec=0.0)
        case.add_skipped_info(message="not selected")
        cases.append(case)
    properties = {
        "command": one_line(summary.command),
        "goal": one_line(summary.goal),
        "hive": one_line(summary.hive),
    }
    if summary.commit is not None:
        properties["commit"] = one_line(summary.commit)
    if summary.shard is not None:
        properties["shard"] = str(summary.shard)  # K/N
    if summary.run_id:
        properties["run_id"] = one_line(summary.run_id)
    suite = TestSuite(
        one_line(f"waggle {summary.command} {summary.hive}"),
        cases,
        timestamp=iso_utc(summary.started_at, timespec="seconds", zone=False),
        properties=properties,
    )
    return str(to_xml_report_string([suite], prettyprint=True))


def _case(node: NodeResult, name: str, stage: Stage, stages: tuple[Stage, ...]) -> Any:
    result = stage_result(node, stage)
    if result is None:
        case = TestCase(name, classname=classname(stage), elapsed_sec=0.0)
        reason = "no rollback" if stage is Stage.ROLLBACK else None
        case.add_skipped_info(message=reason or not_reached_reason(node, stage, stages))
        return case
    case = TestCase(
        name,
        classname=classname(stage),
        elapsed_sec=max(0.0, result.seconds),
        timestamp=iso_utc(result.started_at, timespec="seconds", zone=False)
        if result.started_at
        else None,
    )
    if result.status is Status.FAILED:
        case.add_failure_info(
            message=one_line(result.message, MESSAGE_CHARS) or f"{stage} failed",
            output=_failure_text(result, _rollback_of(node, result)),
            failure_type=classname(stage),
        )
    elif result.status is Status.SKIPPED:
        case.add_skipped_info(message=one_line(result.message, MESSAGE_CHARS) or "skipped")
    else:
        out = [clean_text(result.message[:4000])] if result.message.strip() else []
        out += [f"{k}={one_line(str(v))}" for k, v in result.facts]
        if stage is Stage.ROLLBACK and result.detail.strip():
            out.append(log_tail(result.detail))  # what the host printed while going back
        if out:
            case.stdout = "\n".join(out)
    return case


def _rollback_of(node: NodeResult, failed: StageResult) -> StageResult | None:
    """The rollback that `failed` (a health or confirm failure) caused, if there was one:
    it is recorded right after the stage that caused it."""
    if failed.stage is Stage.ROLLBACK or failed not in node.stages:
        return None
    after = node.stages[node.stages.index(failed) + 1 :]
    return after[0] if after and after[0].stage is Stage.ROLLBACK else None


def _failure_text(result: StageResult, rollback: StageResult | None = None) -> str:
    message = clean_text(result.message[:4000]).strip()
    back = f"rollback: {one_line(rollback.message, MESSAGE_CHARS)}" if rollback else ""
    tail = log_tail(result.detail)
    parts = (message, back, tail)
    return "\n\n".join(part for part in parts if part) or f"{result.stage} failed"


def write_junit(summary: RunSummary, path: Path) -> None:
    path.write_text(junit_xml(summary), encoding="utf-8")
