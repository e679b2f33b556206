"""`--report-json PATH`: the run for machines, schema `waggle.report/1`.

The document is one object. Times are ISO 8601 in UTC with milliseconds
("2025-01-01T12:00:00.000Z"), durations are seconds (float, rounded to milliseconds). Every
string went through `clean_text` (no ANSI escapes, no control characters other than tab and
newline, no undecodable bytes). A new field may appear within `waggle.report/1`; removing or
changing the meaning of one bumps the version.

| Field | Type | Meaning |
| --- | --- | --- |
| `schema` | string | `"waggle.report/1"` |
| `run.command` | string | the waggle command, e.g. `"apply switch"`, `"build"` |
| `run.goal` | string | `"build"`, `"push"`, `"switch"`, `"boot"`, `"test"`, ... |
| `run.hive` | string | the hive's path or flake reference |
| `run.commit` | string or null | the hive's git commit, when known |
| `run.started_at` | string | when the run started |
| `run.seconds` | number | how long the run took |
| `run.stages` | array of string | the stages of the run, in order (`eval`, `build`, `push`, `keys`, `activate`, `confirm`, `post-keys`) |
| `run.ok` | boolean | no selected node failed, and none was left unreached by `--waves`' failure budget |
| `run.counts` | object | `nodes` (selected), `ok`, `failed`, `unchanged`, `skipped`, `not_selected`: integers |
| `nodes` | array of object | the selected nodes, in selection order |
| `nodes[].name` | string | the node's name |
| `nodes[].status` | string | `ok`, `failed`, `unchanged` (activation skipped: the host already runs this system) or `skipped` (only skipped stages) |
| `nodes[].failed_stage` | string or null | the first stage that failed |
| `nodes[].drv_path` | string or null | the system's derivation, once evaluated |
| `nodes[].out_path` | string or null | the system's store path, once evaluated |
| `nodes[].reason` | string | why the node was deployed with `--changed-since`/`waggle ci`: `changed`, `added`, `drift: ...`; empty otherwise |
| `nodes[].stages` | array of object | the stages the node went through, in the order they ran; stages it never reached are absent |
| `nodes[].stages[].stage` | string | the stage |
| `nodes[].stages[].status` | string | `ok`, `failed` or `skipped` |
| `nodes[].stages[].seconds` | number | how long it took |
| `nodes[].stages[].message` | string | a one-line outcome, or the skip reason (`"unchanged"`, `"no targetHost"`) |
| `nodes[].stages[].started_at` | string or null | when it started, if known |
| `nodes[].stages[].facts` | object | measured facts: string to number or string (below) |
| `nodes[].stages[].log_tail` | string or null | the last 50 lines of the stage's log or error detail |
| `not_selected` | array of string | the hive's nodes left out by `--on` |

Facts of an ok `push` stage: `paths_total` (paths in the system's closure), `paths_sent`,
`bytes_sent` (of the `nix-store --export` stream), `closure_bytes` (NAR size of the closure),
`substitute_seconds` (the host's own substitution of missing paths, 0 when it was skipped) and
`paths_substituted` (missing paths the host fetched from its own caches). A `build` stage on
the target has the same facts for the pushed `.drv` closure, without `closure_bytes`; a local
`build` that found the system already built has `already_built` = 1. Failed stages have none.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TypedDict

from runner.report import (
    NodeStatus,
    clean_text,
    iso_utc,
    log_tail,
    node_status,
    status_counts,
)
from runner.results import NodeResult, RunSummary, StageResult

SCHEMA = "waggle.report/1"

Fact = int | float | str


class CountsJson(TypedDict):
    nodes: int
    ok: int
    failed: int
    unchanged: int
    skipped: int
    not_selected: int


class RunJson(TypedDict):
    command: str
    goal: str
    hive: str
    commit: str | None
    started_at: str
    seconds: float
    stages: list[str]
    ok: bool
    counts: CountsJson


class StageJson(TypedDict):
    stage: str
    status: str
    seconds: float
    message: str
    started_at: str | None
    facts: dict[str, Fact]
    log_tail: str | None


class NodeJson(TypedDict):
    name: str
    status: NodeStatus
    failed_stage: str | None
    drv_path: str | None
    out_path: str | None
    reason: str
    wave: int | None
    rolled_back: bool
    stages: list[StageJson]


class ReportJson(TypedDict):
    schema: str
    run: RunJson
    nodes: list[NodeJson]
    not_selected: list[str]


def report_json(summary: RunSummary) -> ReportJson:
    """The report as JSON-ready data (dicts, lists, str, finite numbers, bool, None)."""
    counts = status_counts(summary.nodes)
    return {
        "schema": SCHEMA,
        "run": {
            "command": clean_text(summary.command),
            "goal": clean_text(summary.goal),
            "hive": clean_text(summary.hive),
            "commit": _optional(summary.commit),
            "started_at": iso_utc(summary.started_at),
            "seconds": _seconds(summary.seconds),
            "stages": [str(s) for s in summary.stages],
            "ok": summary.ok,
            "counts": {
                "nodes": len(summary.nodes),
                "ok": counts["ok"],
                "failed": counts["failed"],
                "unchanged": counts["unchanged"],
                "skipped": counts["skipped"],
                "not_selected": len(summary.not_selected),
            },
        },
        "nodes": [_node(n) for n in summary.nodes],
        "not_selected": [clean_text(n) for n in summary.not_selected],
    }


def _node(node: NodeResult) -> NodeJson:
    failure = node.failure
    return {
        "name": clean_text(node.name),
        "status": node_status(node),
        "failed_stage": str(failure.stage) if failure is not None else None,
        "drv_path": _optional(node.drv_path),
        "out_path": _optional(node.out_path),
        "reason": clean_text(node.reason),
        "wave": node.wave,
        "rolled_back": node.rolled_back,
        "stages": [_stage(s) for s in node.stages],
    }


def _stage(result: StageResult) -> StageJson:
    return {
        "stage": str(result.stage),
        "status": str(result.status),
        "seconds": _seconds(result.seconds),
        "message": clean_text(result.message),
        "started_at": iso_utc(result.started_at) if result.started_at else None,
        "facts": {clean_text(k): _fact(v) for k, v in result.facts},
        "log_tail": log_tail(result.detail) or None,
    }


def _optional(text: str | None) -> str | None:
    return None if text is None else clean_text(text)


def _seconds(value: float) -> float:
    return round(value, 3) if math.isfinite(value) else 0.0


def _fact(value: Fact) -> Fact:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value


def dumps(summary: RunSummary) -> str:
    """The JSON document (UTF-8 text, indented, ends with a newline)."""
    return json.dumps(report_json(summary), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(summary: RunSummary, path: Path) -> None:
    path.write_text(dumps(summary), encoding="utf-8")
