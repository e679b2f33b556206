"""`waggle report merge`: shard run reports into one run's reports (runner/report/merge.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

import pytest

from runner.errors import UsageError
from runner.report.jsonreport import dumps, report_json, summary_from_json
from runner.report.junit import junit_xml
from runner.report.markdown import markdown
from runner.report.merge import merge_runs
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status
from runner.shard import ShardSpec, assign, shard_nodes
from tests.conftest import write_hive
from tests.helpers import assert_clean_error, waggle
from tests.test_report import T0, fleet, node_failed_push

# -- reading a report back ------------------------------------------------------------------


def long_log_node(name: str) -> NodeResult:
    detail = "\n".join(f"line {i} \x1b[31mred\x1b[0m" for i in range(120)) + "\n" + "x" * 3000
    return node_failed_push(name, detail)


def test_json_read_back_gives_the_same_reports():
    summary = fleet(nodes=(*fleet().nodes, long_log_node("long")))
    back = summary_from_json(json.loads(dumps(summary)))
    assert report_json(back) == report_json(summary)
    assert markdown(back) == markdown(summary)
    assert junit_xml(back) == junit_xml(summary)
    again = summary_from_json(json.loads(dumps(back)))
    assert again == back


def test_json_read_back_keeps_the_shard_and_not_reached():
    node = NodeResult("w", (StageResult(Stage.EVAL, Status.SKIPPED, 0.0, "not reached: x"),))
    summary = replace(
        fleet(nodes=(replace(node, not_reached=True),), not_selected=()),
        shard=ShardSpec(2, 3),
        sharded_from=("v", "w", "x"),
    )
    data = report_json(summary)
    assert data["run"]["shard"] == {
        "index": 2,
        "total": 3,
        "rule": "waggle.shard/1",
        "selected": ["v", "w", "x"],
    }
    assert data["nodes"][0]["not_reached"] is True
    back = summary_from_json(json.loads(dumps(summary)))
    assert back.shard == ShardSpec(2, 3) and back.sharded_from == ("v", "w", "x")
    assert back.nodes[0].not_reached and not back.ok


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda d: d.update(schema="waggle.report/9"), "schema"),
        (lambda d: d["run"].pop("goal"), "run.goal is missing"),
        (lambda d: d["nodes"][0].update(name=3), "nodes[0].name has the wrong type"),
        (lambda d: d["nodes"][0]["stages"][0].update(stage="dance"), "unknown value 'dance'"),
        (lambda d: d["run"].update(started_at="yesterday"), "run.started_at"),
    ],
)
def test_json_read_back_names_the_bad_field(change, needle):
    from runner.report.jsonreport import ReportFormatError

    data: Any = json.loads(dumps(fleet()))
    change(data)
    with pytest.raises(ReportFormatError) as caught:
        summary_from_json(data)
    assert needle in str(caught.value)


# -- merging summaries ----------------------------------------------------------------------

NAMES = tuple(f"node-{i:02d}" for i in range(1, 11))


def built(name: str) -> NodeResult:
    return NodeResult(
        name,
        (
            StageResult(Stage.EVAL, Status.OK, 0.5, started_at=T0 + 1),
            StageResult(Stage.BUILD, Status.OK, 2.0, "built", started_at=T0 + 2),
        ),
        drv_path=f"/nix/store/{name}.drv",
        out_path=f"/nix/store/{name}-system",
    )


def shard_run(k: int, total: int = 3, names: tuple[str, ...] = NAMES, **changes: Any):
    mine = shard_nodes(names, ShardSpec(k, total))
    run = RunSummary(
        command="build",
        goal="build",
        hive="/repo/hive.nix",
        commit="0123456789abcdef0123456789abcdef01234567",
        started_at=T0 + k,
        seconds=10.0 + k,
        stages=(Stage.EVAL, Stage.BUILD),
        nodes=tuple(built(n) for n in mine),
        not_selected=("other",),
        shard=ShardSpec(k, total),
        sharded_from=names,
    )
    return replace(run, **changes)


def test_merge_of_all_shards_is_the_unsharded_run():
    runs = [(f"s{k}.json", shard_run(k)) for k in (3, 1, 2)]  # any order
    merged = merge_runs(runs)
    assert [n.name for n in merged.nodes] == list(NAMES)
    assert merged.shard is None and merged.sharded_from == ()
    assert merged.not_selected == ("other",)
    assert merged.started_at == T0 + 1
    assert merged.seconds == (T0 + 3 + 13.0) - (T0 + 1)
    assert merged.ok


def test_merge_keeps_each_shards_stage_order():
    health = (Stage.EVAL, Stage.BUILD, Stage.PUSH, Stage.ACTIVATE, Stage.HEALTH, Stage.CONFIRM)
    plain = (Stage.EVAL, Stage.BUILD, Stage.PUSH, Stage.ACTIVATE, Stage.CONFIRM)
    runs = [
        ("a", shard_run(1, stages=plain)),
        ("b", shard_run(2, stages=health)),
        ("c", shard_run(3, stages=plain)),
    ]
    assert merge_runs(runs).stages == health


def test_a_missing_shard_leaves_its_nodes_not_reached():
    merged = merge_runs([("s1.json", shard_run(1)), ("s3.json", shard_run(3))])
    placed = assign(NAMES, 3)
    missing = [n for n in merged.nodes if n.not_reached]
    assert [n.name for n in missing] == [n for n in NAMES if placed[n] == 2]
    assert missing[0].stages[0].message == "not reached: no report from shard 2/3"
    assert not merged.ok
    assert report_json(merged)["run"]["counts"]["skipped"] == len(missing)


@pytest.mark.parametrize(
    "second,needle",
    [
        (shard_run(2, commit="f" * 40), "s2.json: commit ffff"),
        (shard_run(2, goal="switch"), "s2.json: goal switch differs"),
        (shard_run(2, command="apply build"), "s2.json: command apply build differs"),
        (shard_run(2, total=4), "s2.json: shard count 4 differs"),
        (shard_run(1), "s2.json: shard 1/3 is also s1.json"),
        (shard_run(2, sharded_from=(*NAMES, "node-11")), "another selection"),
        (shard_run(2, shard=None), "s2.json: not the report of a --shard"),
    ],
)
def test_merge_refuses_mixed_runs(second, needle):
    with pytest.raises(UsageError) as caught:
        merge_runs([("s1.json", shard_run(1)), ("s2.json", second)])
    assert needle in caught.value.message and "\n" not in caught.value.message


def test_merge_refuses_overlapping_nodes():
    stolen = shard_nodes(NAMES, ShardSpec(1, 3))[0]
    second = shard_run(2)
    second = replace(second, nodes=(*second.nodes, built(stolen)))
    with pytest.raises(UsageError, match=f"s2.json: node {stolen} is also in s1.json"):
        merge_runs([("s1.json", shard_run(1)), ("s2.json", second)])


# -- real runs: three shards of a 10-node hive against one unsharded build ----------------

HIVE = (
    "{\n  meta.nixpkgs = import @NIXPKGS@ { };\n"
    + "".join(f'  {n} = {{ environment.etc.v.text = "report merge {n}"; }};\n' for n in NAMES)
    + "}\n"
)
TIMING = {"started_at", "seconds"}


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_merge_of_three_real_shard_builds_equals_one_unsharded_build(tmp_path):
    write_hive(tmp_path, HIVE)
    assert waggle("build", cwd=tmp_path).returncode == 0  # built once: facts alike below
    for k in (1, 2, 3):
        done = waggle("build", "--shard", f"{k}/3", "--report-json", f"s{k}.json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        shard = json.loads((tmp_path / f"s{k}.json").read_text())["run"]["shard"]
        assert shard == {"index": k, "total": 3, "rule": "waggle.shard/1", "selected": list(NAMES)}
    done = waggle("build", "--report-json", "all.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = ("--report-json", "merged.json", "--junit", "merged.xml", "--report-md", "merged.md")
    done = waggle("report", "merge", "s1.json", "s2.json", "s3.json", *out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(line.split("\t")[0] for line in done.stdout.splitlines()) == list(NAMES)
    merged = json.loads((tmp_path / "merged.json").read_text())
    unsharded = json.loads((tmp_path / "all.json").read_text())
    # Each run has an id of its own; a merged report has none (its shards' reports do).
    ids = [json.loads((tmp_path / f"s{k}.json").read_text())["run"]["id"] for k in (1, 2, 3)]
    assert merged["run"]["id"] is None and len(set(ids)) == 3 and all(ids), ids
    assert unsharded["run"].pop("id") and merged["run"].pop("id") is None
    assert without_timings(merged) == without_timings(unsharded)
    suite = ET.parse(tmp_path / "merged.xml").getroot().find("testsuite")
    assert suite is not None and len(suite.findall("testcase")) == 2 * len(NAMES)
    assert "10 ok, 0 failed (of 10 nodes)" in (tmp_path / "merged.md").read_text()


def test_report_merge_errors_are_one_line(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(dumps(shard_run(1)))
    b = tmp_path / "b.json"
    b.write_text(dumps(shard_run(2, commit="e" * 40)))
    assert_clean_error(waggle("report", "merge", "a.json", "b.json", cwd=tmp_path), 2, "b.json")
    assert_clean_error(
        waggle("report", "merge", "a.json", "a.json", cwd=tmp_path), 2, "a.json: shard 1/3"
    )
    (tmp_path / "bad.json").write_text("{")
    assert_clean_error(waggle("report", "merge", "bad.json", cwd=tmp_path), 2, "bad.json: not JSON")
    assert_clean_error(waggle("report", "merge", "nope.json", cwd=tmp_path), 2, "nope.json")
    (tmp_path / "plan.json").write_text('{"schema": "waggle.plan/1"}')
    assert_clean_error(waggle("report", "merge", "plan.json", cwd=tmp_path), 2, "plan.json")
    done = waggle("report", "merge", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_report_merge_with_a_missing_shard_fails(tmp_path):
    for k in (1, 3):
        (tmp_path / f"s{k}.json").write_text(dumps(shard_run(k)))
    summary = tmp_path / "summary.md"
    done = subprocess.run(
        [sys.executable, "-m", "runner", "report", "merge", "s1.json", "s3.json",
         "--report-json", "m.json"],
        cwd=tmp_path, env={**os.environ, "GITHUB_STEP_SUMMARY": str(summary)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    nodes = json.loads((tmp_path / "m.json").read_text())["nodes"]
    missing = set(shard_nodes(NAMES, ShardSpec(2, 3)))
    assert {n["name"] for n in nodes if n["not_reached"]} == missing
    text = summary.read_text()  # one step summary for the whole run
    assert text.count("## Waggle: build") == 1
    assert "no report from shard 2/3" in text or "not reached" in text
