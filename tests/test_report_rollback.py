"""How the reports show magic rollbacks (JUnit, markdown, JSON), as pure functions."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from runner.report.jsonreport import dumps
from runner.report.junit import junit_xml
from runner.report.markdown import markdown
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status

T0 = 1_735_732_800.0
STAGES = (Stage.EVAL, Stage.BUILD, Stage.PUSH, Stage.ACTIVATE, Stage.HEALTH, Stage.CONFIRM)
PREVIOUS = "/nix/store/aaa-nixos-system-web-old"


def st(stage: Stage, status: Status = Status.OK, message: str = "", detail: str = ""):
    return StageResult(stage, status, 1.5, message, detail, started_at=T0 + 1)


BEFORE = (st(Stage.EVAL), st(Stage.BUILD), st(Stage.PUSH), st(Stage.ACTIVATE, message="ok"))


def confirmed(name: str) -> NodeResult:
    return NodeResult(name, (*BEFORE, st(Stage.CONFIRM, message="Confirmed")))


def health_rolled_back(name: str) -> NodeResult:
    return NodeResult(
        name,
        (
            *BEFORE,
            st(
                Stage.HEALTH,
                Status.FAILED,
                "rolled back: health check 'nginx up' failed: exit status 3",
                "inactive (dead)\n",
            ),
            st(
                Stage.ROLLBACK,
                message=f"rolled back to {PREVIOUS} in 1.2 s",
                detail=f"waggle: rolling back to {PREVIOUS}\nstarting nginx\n",
            ),
        ),
    )


def rollback_failed(name: str) -> NodeResult:
    return NodeResult(
        name,
        (
            *BEFORE,
            st(
                Stage.CONFIRM,
                Status.FAILED,
                "not confirmed within 30 s; rollback failed: switch-to-configuration of"
                f" {PREVIOUS} failed with exit status 2",
            ),
            st(Stage.ROLLBACK, Status.FAILED, "rollback failed: exit status 2", "boom\n"),
        ),
    )


def push_failed(name: str) -> NodeResult:
    return NodeResult(
        name, (st(Stage.EVAL), st(Stage.BUILD), st(Stage.PUSH, Status.FAILED, "no route"))
    )


def summary(*nodes: NodeResult) -> RunSummary:
    return RunSummary("apply switch", "switch", "./hive.nix", None, T0, 40.0, STAGES, nodes)


RUN = summary(
    confirmed("web1"), push_failed("db1"), health_rolled_back("web2"), rollback_failed("web3")
)


def test_markdown_lists_rolled_back_nodes_first_with_the_check_output_and_the_rollback():
    text = markdown(RUN)
    lines = text.splitlines()
    assert lines[0].startswith(
        "## Waggle: apply switch — 1 ok, 3 failed, 1 of them rolled back (of"
    )
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0].strip("|* ") for r in rows] == ["web2", "db1", "web3", "web1"]
    assert "❌ failed, rolled back" in rows[0]
    assert "rolled back" not in rows[1] and "rolled back" not in rows[2].split(" | ")[1]
    section = text[text.index("### ❌ web2") :]
    section = section[: section.index("### ", 4)]
    assert section.startswith("### ❌ web2: rolled back (health failed)")
    assert "**health:** rolled back: health check 'nginx up' failed" in section
    assert "inactive (dead)" in section  # the check's output
    assert f"**rollback:** rolled back to {PREVIOUS} in 1.2 s" in section
    assert "starting nginx" in section  # what the host printed while going back
    assert "### ❌ web3: confirm, rollback failed" in text


def test_junit_says_rolled_back_in_the_failure_and_skips_rollback_where_none_happened():
    root = ET.fromstring(junit_xml(RUN))
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    failure = cases[("waggle.health", "web2")].find("failure")
    assert failure is not None
    assert failure.get("message", "").startswith("rolled back: health check 'nginx up'")
    assert f"rollback: rolled back to {PREVIOUS} in 1.2 s" in (failure.text or "")
    assert "inactive (dead)" in (failure.text or "")
    rollback = cases[("waggle.rollback", "web2")]
    assert rollback.find("failure") is None and rollback.find("skipped") is None
    assert "starting nginx" in (rollback.findtext("system-out") or "")
    skipped = cases[("waggle.rollback", "web1")].find("skipped")
    assert skipped is not None and skipped.get("message") == "no rollback"
    assert cases[("waggle.rollback", "web3")].find("failure") is not None
    assert cases[("waggle.confirm", "web3")].find("failure") is not None
    failures = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert len(failures) == 4  # db1 push, web2 health, web3 confirm and rollback


def test_json_marks_only_the_host_that_went_back():
    data = json.loads(dumps(RUN))
    nodes = {n["name"]: n for n in data["nodes"]}
    assert nodes["web2"]["rolled_back"] is True and nodes["web2"]["status"] == "failed"
    assert nodes["web2"]["failed_stage"] == "health"
    assert nodes["web3"]["rolled_back"] is False and nodes["web3"]["status"] == "failed"
    assert nodes["web1"]["rolled_back"] is False and nodes["web1"]["status"] == "ok"
    assert data["run"]["ok"] is False
