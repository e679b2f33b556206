"""`--report-json PATH`: the run for machines, schema `waggle.report/1`.

The document is one object. Times are ISO 8601 in UTC with milliseconds
("2025-01-01T12:00:00.000Z"), durations are seconds (float, rounded to milliseconds). Every
string went through `clean_text` (no ANSI escapes, no control characters other than tab and
newline, no undecodable bytes). A new field may appear within `waggle.report/1`; removing or
changing the meaning of one bumps the version.

The fields and the facts of each stage are documented once, in README.md ("Progress and
reports", the `--report-json` table); tests/test_report.py checks that every field this
module writes is in that table and every field of the table is written.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypedDict, TypeVar

from runner.report import (
    NodeStatus,
    clean_text,
    iso_utc,
    log_tail,
    node_status,
    status_counts,
)
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status
from runner.shard import RULE, ShardSpec

SCHEMA = "waggle.report/1"
_E = TypeVar("_E", bound=Enum)

Fact = int | float | str


class CountsJson(TypedDict):
    nodes: int
    ok: int
    failed: int
    unchanged: int
    skipped: int
    not_selected: int


class ShardJson(TypedDict):
    index: int
    total: int
    rule: str
    selected: list[str]


class RunJson(TypedDict):
    id: str | None
    command: str
    goal: str
    hive: str
    commit: str | None
    started_at: str
    seconds: float
    stages: list[str]
    ok: bool
    counts: CountsJson
    shard: ShardJson | None
    cache_bytes_uploaded: int | None


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
    not_reached: bool
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
            "id": summary.run_id or None,
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
            "shard": _shard(summary),
            "cache_bytes_uploaded": cache_bytes_uploaded(summary),
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
        "not_reached": node.not_reached,
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


def cache_bytes_uploaded(summary: RunSummary) -> int | None:
    """Bytes the run uploaded to its --cache (the push stages' `cache_upload_bytes`);
    None when no node went through a cache."""
    sizes = [
        int(v)
        for n in summary.nodes
        for s in n.stages
        for k, v in s.facts
        if k == "cache_upload_bytes" and isinstance(v, int | float)
    ]
    return sum(sizes) if sizes else None


def _shard(summary: RunSummary) -> ShardJson | None:
    if summary.shard is None:
        return None
    return {
        "index": summary.shard.index,
        "total": summary.shard.total,
        "rule": RULE,
        "selected": [clean_text(n) for n in summary.sharded_from],
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


# -- reading a report back (for `waggle report merge`) ------------------------------------


class ReportFormatError(ValueError):
    """A JSON document that is not a `waggle.report/1` run report; the message names the field."""


def _field(data: object, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise ReportFormatError(f"{where}{key} is missing")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise ReportFormatError(f"{where}{key} has the wrong type")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _epoch(text: str | None, where: str) -> float:
    if text is None:
        return 0.0
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ReportFormatError(f"{where}: not an ISO 8601 time in UTC: {text!r}")
    return when.timestamp()


def _enum(kind: type[_E], value: str, where: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise ReportFormatError(f"{where}: unknown value {value!r}") from None


def _detail(tail: str | None) -> str:
    """A stage detail whose `log_tail` is `tail` again ("[… N earlier lines]" kept as N
    empty lines in front, so the count survives another round)."""
    if not tail:
        return ""
    head, _, rest = tail.partition("\n")
    omitted = re.fullmatch(r"\[… (\d+) earlier lines\]", head)
    return "\n" * int(omitted.group(1)) + rest if omitted else tail


def _stage_from(data: object, where: str) -> StageResult:
    facts = _field(data, "facts", dict, where)
    return StageResult(
        stage=_enum(Stage, _field(data, "stage", str, where), f"{where}stage"),
        status=_enum(Status, _field(data, "status", str, where), f"{where}status"),
        seconds=float(_field(data, "seconds", (int, float), where)),
        message=_field(data, "message", str, where),
        detail=_detail(_field(data, "log_tail", (str, type(None)), where)),
        started_at=_epoch(_field(data, "started_at", (str, type(None)), where), where),
        facts=tuple((str(k), v) for k, v in facts.items() if isinstance(v, int | float | str)),
    )


def _node_from(data: object, where: str) -> NodeResult:
    stages = _field(data, "stages", list, where)
    wave = data.get("wave") if isinstance(data, dict) else None
    return NodeResult(
        name=_field(data, "name", str, where),
        stages=tuple(_stage_from(s, f"{where}stages[{i}].") for i, s in enumerate(stages)),
        drv_path=_field(data, "drv_path", (str, type(None)), where),
        out_path=_field(data, "out_path", (str, type(None)), where),
        reason=_field(data, "reason", str, where),
        wave=wave if isinstance(wave, int) and not isinstance(wave, bool) else None,
        not_reached=bool(data.get("not_reached", False)) if isinstance(data, dict) else False,
    )


def summary_from_json(data: object) -> RunSummary:
    """The RunSummary a `waggle.report/1` document was written from, as far as the report
    holds it: a stage's detail is its log tail. `report_json` of it gives the document back."""
    schema = _field(data, "schema", str, "")
    if schema != SCHEMA:
        raise ReportFormatError(f"schema {schema!r} is not {SCHEMA!r}")
    run = _field(data, "run", dict, "")
    nodes = _field(data, "nodes", list, "")
    shard = _field(run, "shard", (dict, type(None)), "run.") if "shard" in run else None
    spec = None
    if shard is not None:
        rule = _field(shard, "rule", str, "run.shard.")
        if rule != RULE:
            raise ReportFormatError(f"run.shard.rule {rule!r} is not {RULE!r}")
        spec = ShardSpec(
            _field(shard, "index", int, "run.shard."), _field(shard, "total", int, "run.shard.")
        )
    return RunSummary(
        command=_field(run, "command", str, "run."),
        goal=_field(run, "goal", str, "run."),
        hive=_field(run, "hive", str, "run."),
        commit=_field(run, "commit", (str, type(None)), "run."),
        started_at=_epoch(_field(run, "started_at", str, "run."), "run.started_at"),
        seconds=float(_field(run, "seconds", (int, float), "run.")),
        stages=tuple(_enum(Stage, s, "run.stages") for s in _field(run, "stages", list, "run.")),
        nodes=tuple(_node_from(n, f"nodes[{i}].") for i, n in enumerate(nodes)),
        not_selected=tuple(str(n) for n in _field(data, "not_selected", list, "")),
        shard=spec,
        sharded_from=tuple(str(n) for n in _field(shard, "selected", list, "run.shard."))
        if shard is not None
        else (),
        # reports from before run.id have none
        run_id=(_field(run, "id", (str, type(None)), "run.") if "id" in run else None) or "",
    )
