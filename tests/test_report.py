"""Run reports (JUnit XML, markdown, JSON) as pure functions of fixed RunSummary values."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.report import clean_text, log_tail, node_status, stage_result, unique_names
from runner.report.jsonreport import SCHEMA, dumps, report_json, summary_from_json, write_json
from runner.report.junit import junit_xml, write_junit
from runner.report.markdown import (
    append_step_summary,
    markdown,
    step_summary_budget,
    step_summary_path,
    write_markdown,
    write_step_summary,
)
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status
from tests import helpers

STAGES = (Stage.EVAL, Stage.BUILD, Stage.PUSH, Stage.KEYS, Stage.ACTIVATE)
T0 = 1_735_732_800.0  # 2025-01-01T12:00:00Z
MIB = 1024 * 1024

# Bytes a log may hold: invalid UTF-8, NUL, ESC (ANSI colours, a title), BEL, CR progress.
BAD_BYTES = (
    b"copying \xff\xfe caf\xe9 done\x00\n"
    b"\x1b[31merror:\x1b[0m bell\x07 here \x1b]0;title\x07end\n"
    b"progress 10%\rprogress 100%\r\n"
    b"last line \xef\xbf\xbe ok\n"
)
BAD_TEXT = BAD_BYTES.decode("utf-8", errors="surrogateescape")


def ok(stage: Stage, seconds: float = 1.0, message: str = "", **facts: float | str):
    return StageResult(
        stage, Status.OK, seconds, message, started_at=T0 + 1, facts=tuple(facts.items())
    )


def push_ok(sent: int = 12, total: int = 340, sent_bytes: int = 3 * MIB, closure: int = 0):
    return ok(
        Stage.PUSH,
        2.5,
        f"{sent} of {total} paths",
        paths_total=total,
        paths_sent=sent,
        bytes_sent=sent_bytes,
        closure_bytes=closure,
    )


def node_ok(name: str) -> NodeResult:
    stages = (
        ok(Stage.EVAL, 1.25),
        ok(Stage.BUILD, 30.0, "/nix/store/aaa-nixos-system"),
        push_ok(closure=2 * 1024 * MIB),
        ok(Stage.KEYS, 0.5, "2 keys"),
        ok(Stage.ACTIVATE, 4.0, "switched"),
    )
    return NodeResult(name, stages, f"/nix/store/{name}.drv", f"/nix/store/{name}-system")


def node_unchanged(name: str) -> NodeResult:
    stages = (
        ok(Stage.EVAL, 1.0),
        ok(Stage.BUILD, 0.1),
        push_ok(sent=0, sent_bytes=0),
        ok(Stage.KEYS, 0.2),
        StageResult(Stage.ACTIVATE, Status.SKIPPED, 0.0, "unchanged", started_at=T0 + 2),
    )
    return NodeResult(name, stages, f"/nix/store/{name}.drv", f"/nix/store/{name}-system")


def node_failed_push(name: str, detail: str = BAD_TEXT) -> NodeResult:
    stages = (
        ok(Stage.EVAL, 1.0),
        ok(Stage.BUILD, 12.0),
        StageResult(
            Stage.PUSH, Status.FAILED, 7.5, "copying to web2 failed (exit 1)", detail, T0 + 3
        ),
    )
    return NodeResult(name, stages, f"/nix/store/{name}.drv", f"/nix/store/{name}-system")


def fleet(**changes: Any) -> RunSummary:
    """3 ok, 1 failed (second in selection order), 2 unchanged, 2 not selected."""
    nodes = (
        node_ok("web1"),
        node_failed_push("web2"),
        node_unchanged("web3"),
        node_ok("db1"),
        node_unchanged("db2"),
        node_ok("mail"),
    )
    base = RunSummary(
        command="apply switch",
        goal="switch",
        hive="./hive.nix",
        commit="0123456789abcdef0123456789abcdef01234567",
        started_at=T0,
        seconds=42.2,
        stages=STAGES,
        nodes=nodes,
        not_selected=("backup", "edge"),
    )
    return replace(base, **changes)


def cases(xml: str) -> list[ET.Element]:
    return ET.fromstring(xml).findall("./testsuite/testcase")


def by_pair(xml: str) -> dict[tuple[str, str], ET.Element]:
    return {(c.attrib["classname"], c.attrib["name"]): c for c in cases(xml)}


# --- node status -------------------------------------------------------------------------


def test_node_status():
    assert node_status(node_ok("a")) == "ok"
    assert node_status(node_failed_push("a")) == "failed"
    assert node_status(node_unchanged("a")) == "unchanged"
    skipped = NodeResult("a", (StageResult(Stage.KEYS, Status.SKIPPED, 0.0, "no keys"),))
    assert node_status(skipped) == "skipped"
    assert node_status(NodeResult("a", ())) == "skipped"
    activate_other_skip = NodeResult(
        "a", (ok(Stage.BUILD), StageResult(Stage.ACTIVATE, Status.SKIPPED, 0, "no targetHost"))
    )
    assert node_status(activate_other_skip) == "ok"


def test_stage_run_twice_is_merged():
    node = NodeResult(
        "a",
        (
            ok(Stage.KEYS, 0.5, "pre", uploaded=1),
            ok(Stage.ACTIVATE),
            StageResult(Stage.KEYS, Status.FAILED, 0.25, "chown failed", "detail"),
        ),
    )
    keys = stage_result(node, Stage.KEYS)
    assert keys is not None
    assert (keys.status, keys.seconds, keys.message, keys.detail) == (
        Status.FAILED,
        0.75,
        "chown failed",
        "detail",
    )
    assert keys.fact("uploaded") == 1
    assert stage_result(node, Stage.PUSH) is None


def test_clean_text_and_log_tail():
    cleaned = clean_text(BAD_TEXT)
    assert cleaned.splitlines() == [
        "copying  caf done",
        "error: bell here end",
        "progress 100%",
        "last line  ok",
    ]
    log = "\n".join(f"line {i}" for i in range(1, 101)) + "\n\n"
    tail = log_tail(log, lines=3)
    assert tail.splitlines() == ["[… 97 earlier lines]", "line 98", "line 99", "line 100"]
    assert log_tail("x" * 5000, line_chars=10) == "x" * 10 + " [… line cut]"
    assert log_tail("", lines=5) == log_tail("abc", lines=0) == ""


def test_unique_names():
    assert unique_names(["a", "b", "a", "a (2)", "a"]) == ["a", "b", "a (2)", "a (2) (2)", "a (3)"]


# --- JUnit -------------------------------------------------------------------------------


def test_junit_suite_counts_and_properties():
    xml = junit_xml(fleet())
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    # 6 nodes x 5 stages + 2 not selected
    assert suite.attrib["tests"] == "32"
    assert suite.attrib["failures"] == "1"
    assert suite.attrib["errors"] == "0"
    # 2 unchanged activations, web2's keys and activate never reached, 2 not selected
    assert suite.attrib["skipped"] == "6"
    assert suite.attrib["name"] == "waggle apply switch ./hive.nix"
    assert suite.attrib["timestamp"] == "2025-01-01T12:00:00"
    props = {p.attrib["name"]: p.attrib["value"] for p in suite.iter("property")}
    assert props == {
        "command": "apply switch",
        "goal": "switch",
        "hive": "./hive.nix",
        "commit": "0123456789abcdef0123456789abcdef01234567",
    }


def test_junit_cases():
    xml = junit_xml(fleet())
    pairs = by_pair(xml)
    nodes = ["web1", "web2", "web3", "db1", "db2", "mail"]
    expected = {(f"waggle.{s}", n) for s in STAGES for n in nodes}
    expected |= {("waggle.selection", "backup"), ("waggle.selection", "edge")}
    assert set(pairs) == expected
    assert len(cases(xml)) == len(expected)  # every (classname, name) pair once

    assert float(pairs["waggle.build", "web1"].attrib["time"]) == 30.0
    assert float(pairs["waggle.eval", "web1"].attrib["time"]) == 1.25
    assert float(pairs["waggle.push", "web2"].attrib["time"]) == 7.5
    assert pairs["waggle.push", "web1"].findtext("system-out", "").startswith("12 of 340 paths")
    assert "paths_sent=12" in pairs["waggle.push", "web1"].findtext("system-out", "")

    failure = pairs["waggle.push", "web2"].find("failure")
    assert failure is not None
    assert failure.attrib["message"] == "copying to web2 failed (exit 1)"
    assert failure.attrib["type"] == "waggle.push"
    assert failure.text is not None
    assert failure.text.startswith("copying to web2 failed (exit 1)\n\n")  # GitLab shows text
    assert "error: bell here end" in failure.text

    def skip_reason(classname: str, name: str) -> str:
        skipped = pairs[classname, name].find("skipped")
        assert skipped is not None, (classname, name)
        return skipped.attrib["message"]

    assert skip_reason("waggle.activate", "web3") == "unchanged"
    assert skip_reason("waggle.keys", "web2") == "earlier stage failed: push"
    assert skip_reason("waggle.activate", "web2") == "earlier stage failed: push"
    assert skip_reason("waggle.selection", "edge") == "not selected"
    assert pairs["waggle.activate", "web1"].find("skipped") is None
    assert pairs["waggle.activate", "web1"].find("failure") is None


def test_junit_not_reached_reasons():
    eval_failed = NodeResult(
        "a", (StageResult(Stage.EVAL, Status.FAILED, 0.5, "attribute missing", "trace"),)
    )
    no_keys = NodeResult(
        "b",
        (ok(Stage.EVAL), ok(Stage.BUILD), push_ok(), ok(Stage.ACTIVATE)),
    )
    pairs = by_pair(junit_xml(fleet(nodes=(eval_failed, no_keys), not_selected=())))
    reasons = {
        k: e.attrib["message"] for k, v in pairs.items() if (e := v.find("skipped")) is not None
    }
    assert reasons == {
        ("waggle.build", "a"): "earlier stage failed: eval",
        ("waggle.push", "a"): "earlier stage failed: eval",
        ("waggle.keys", "a"): "earlier stage failed: eval",
        ("waggle.activate", "a"): "earlier stage failed: eval",
        ("waggle.keys", "b"): "not run",
    }


def test_junit_bad_bytes_still_valid_xml():
    weird = "we\x00b\udcff\x1b[1m2"
    summary = fleet(
        nodes=(node_failed_push(weird), node_failed_push("web2\x07")),
        hive="./h\udce9ive\x1b[0m.nix",
        command="apply \x0bswitch",
    )
    xml = junit_xml(summary)
    root = ET.fromstring(xml)  # parses: no invalid characters, no invalid references
    assert "&#5" not in xml and "\x1b" not in xml
    names = {c.attrib["name"] for c in root.iter("testcase")}
    assert {"web2", "web2 (2)"} <= names  # both nodes clean to "web2"
    props = {p.attrib["name"]: p.attrib["value"] for p in root.iter("property")}
    assert props["hive"] == "./hive.nix"
    (failure, _) = [f.text or "" for f in root.iter("failure")]
    assert failure.splitlines()[2:] == [
        "copying  caf done",
        "error: bell here end",
        "progress 100%",
        "last line  ok",
    ]


def test_junit_unique_pairs_with_duplicates():
    node = NodeResult(
        "a",
        (ok(Stage.EVAL), ok(Stage.KEYS, 1.0, "pre"), ok(Stage.ACTIVATE), ok(Stage.KEYS, 2.0)),
    )
    summary = fleet(nodes=(node, node, NodeResult("a\x00", ())), not_selected=("x", "x"))
    found = [(c.attrib["classname"], c.attrib["name"]) for c in cases(junit_xml(summary))]
    assert len(found) == len(set(found)) == 3 * len(STAGES) + 2
    assert {n for _, n in found} == {"a", "a (2)", "a (3)", "x", "x (2)"}
    keys = by_pair(junit_xml(summary))["waggle.keys", "a"]
    assert float(keys.attrib["time"]) == 3.0  # keys before and after activation: one case


def test_junit_extra_stage_and_no_commit():
    node = NodeResult("a", (ok(Stage.ACTIVATE), ok(Stage.REBOOT, 60.0, "rebooted")))
    xml = junit_xml(fleet(nodes=(node,), stages=(Stage.ACTIVATE,), commit=None))
    assert {c for c, _ in by_pair(xml)} == {"waggle.activate", "waggle.reboot", "waggle.selection"}
    assert "commit" not in {p.attrib["name"] for p in ET.fromstring(xml).iter("property")}


def test_junit_with_junitparser():
    junitparser = pytest.importorskip("junitparser")
    doc = junitparser.JUnitXml.fromstring(junit_xml(fleet()))
    (suite,) = list(doc)
    assert (suite.tests, suite.failures, suite.skipped, suite.errors) == (32, 1, 6, 0)
    props = {p.name: p.value for p in suite.properties()}
    assert props["goal"] == "switch"
    found = {(c.classname, c.name): c for c in suite}
    assert len(found) == 32
    failed = found["waggle.push", "web2"]
    (result,) = failed.result
    assert isinstance(result, junitparser.Failure)
    assert result.message == "copying to web2 failed (exit 1)"
    assert "error: bell here end" in result.text
    assert found["waggle.build", "web1"].time == 30.0
    assert found["waggle.activate", "web1"].is_passed
    assert found["waggle.activate", "web3"].is_skipped


def test_junit_log_tail_is_50_lines():
    log = "".join(f"\x1b[32mline {i}\x1b[0m\n" for i in range(1000))
    xml = junit_xml(fleet(nodes=(node_failed_push("web2", log),)))
    failure = ET.fromstring(xml).find(".//failure")
    assert failure is not None and failure.text is not None
    lines = failure.text.splitlines()
    assert lines[2] == "[… 950 earlier lines]"
    assert lines[3] == "line 950" and lines[-1] == "line 999" and len(lines) == 53


@settings(max_examples=60, deadline=None)
@given(
    name=st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape")),
    log=st.one_of(
        st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),
        st.text(max_size=300),
    ),
)
def test_any_bytes_give_valid_reports(name, log):
    summary = fleet(nodes=(node_failed_push(name, log), node_ok(name)), not_selected=(name,))
    root = ET.fromstring(junit_xml(summary))
    pairs = [(c.attrib["classname"], c.attrib["name"]) for c in root.iter("testcase")]
    assert len(pairs) == len(set(pairs))
    text = markdown(summary)
    text.encode("utf-8")  # no lone surrogates
    assert json.loads(dumps(summary)) == report_json(summary)


def test_write_junit(tmp_path: Path):
    path = tmp_path / "junit.xml"
    write_junit(fleet(), path)
    assert ET.parse(path).getroot().tag == "testsuites"


# --- markdown ----------------------------------------------------------------------------


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_markdown_headline_and_context():
    text = markdown(fleet())
    lines = text.splitlines()
    assert lines[0] == (
        "## Waggle: apply switch — 3 ok, 1 failed, 2 unchanged (of 6 nodes) in 42 s"
    )
    assert "Hive `./hive.nix` at commit `0123456789abcdef0123456789abcdef01234567`" in text
    assert "goal `switch`, started 2025-01-01 12:00:00 UTC." in text
    assert "2 not selected: `backup`, `edge`." in text


def test_markdown_table_failed_first():
    rows = table_rows(markdown(fleet()))
    head, align, *body = rows
    assert head == [
        "Node",
        "Status",
        "eval",
        "build",
        "push",
        "keys",
        "activate",
        "Pushed",
        "Closure",
    ]
    assert len(align) == len(head)
    assert [r[0] for r in body] == ["**web2**", "web1", "web3", "db1", "db2", "mail"]
    assert all(len(r) == len(head) for r in body)
    web2, web1, web3 = body[0], body[1], body[2]
    assert web2[1] == "❌ failed"
    assert web2[4] == "❌ 7.5 s"
    assert web2[5] == web2[6] == "—"  # never reached
    assert web1[1:] == [
        "✅ ok",
        "1.2 s",
        "30 s",
        "2.5 s",
        "0.5 s",
        "4.0 s",
        "12/340 paths, 3.0 MiB",
        "2.0 GiB",
    ]
    assert web3[1] == "⚪ unchanged"
    assert web3[6] == "skipped (unchanged)"
    assert web3[7] == "0/340 paths"
    assert web3[8] == "—"  # no closure_bytes fact


def test_markdown_failure_sections():
    failed_eval = NodeResult(
        "zz", (StageResult(Stage.EVAL, Status.FAILED, 0.5, "attribute 'x' missing", "trace"),)
    )
    summary = fleet(nodes=(*fleet().nodes, failed_eval))
    text = markdown(summary)
    assert [r[0] for r in table_rows(text)[2:4]] == ["**web2**", "**zz**"]
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert headings == ["### ❌ web2: push failed", "### ❌ zz: eval failed"]
    assert "**push:** copying to web2 failed (exit 1)" in text
    assert "<details><summary>web2 push: log (4 lines)</summary>\n\n```\n" in text
    assert "```\ncopying  caf done\nerror: bell here end\nprogress 100%\nlast line  ok\n```" in (
        text
    )
    assert "\n```\n\n</details>" in text
    assert text.index("### ❌ web2") > text.index("| db2 |")  # sections after the table


def test_markdown_escaping():
    node = node_failed_push("we|b`2", detail="a ``` fence\nand ````` longer\n</details> html")
    node = NodeResult(
        node.name,
        (
            *node.stages[:2],
            StageResult(Stage.PUSH, Status.FAILED, 1.0, "bad | `x` <b>", node.stages[2].detail),
        ),
    )
    text = markdown(fleet(nodes=(node,), not_selected=(), hive="./a`b.nix"))
    rows = table_rows(text)
    assert rows[2][0] == r"**we\|b\`2**"
    assert len(rows[2]) == len(rows[0])  # the pipe did not add a cell
    assert r"**push:** bad \| \`x\` \<b\>" in text
    assert "<summary>we|b`2 push: log (3 lines)</summary>" in text
    assert "\n``````\na ``` fence\nand ````` longer\n</details> html\n``````\n" in text
    assert "Hive ``./a`b.nix``" in text
    assert "<b>" not in text


def test_markdown_size_limit_with_huge_log():
    huge = "".join(f"build output line {i:07d} " + "x" * 60 + "\n" for i in range(70_000))
    assert len(huge) > 5 * MIB
    nodes = tuple(node_failed_push(f"web{i}", huge) for i in range(40)) + tuple(
        node_ok(f"ok{i}") for i in range(20)
    )
    summary = fleet(nodes=nodes)
    full = markdown(summary)
    assert len(full.encode()) > 64 * 1024

    for limit in (MIB, 64 * 1024, 20 * 1024, 12 * 1024):
        text = markdown(summary, limit=limit)
        assert len(text.encode("utf-8")) <= limit, limit
        rows = table_rows(text)
        assert len(rows) == 2 + len(nodes), limit  # every node row
        assert text.count("```") % 2 == 0  # no code block cut open
        assert text.count("<details>") == text.count("</details>")

    def shown(text: str) -> tuple[int, int, str]:
        return text.count("<details>"), text.count("### "), text.strip().splitlines()[-1]

    assert "log (last 50 of 70000 lines)" in markdown(summary, limit=MIB)
    assert markdown(summary, limit=MIB) == full  # fits: nothing shrunk, no note
    assert shown(markdown(summary, limit=64 * 1024)) == (
        40,
        40,
        (
            "_Log tails were shortened to 15 lines to stay under 64.0 KiB; "
            "see the JUnit or JSON report._"
        ),
    )
    text = markdown(summary, limit=20 * 1024)
    assert shown(text) == (
        34,
        40,
        (
            "_Log tails were shortened to 3 lines and left out for 6 nodes to stay under "
            "20.0 KiB; see the JUnit or JSON report._"
        ),
    )
    assert "web33 push: log (last 3 of 70000 lines)" in text  # the first failed nodes keep
    assert "web34 push: log" not in text  # theirs
    assert shown(markdown(summary, limit=8 * 1024)) == (
        0,
        39,
        (
            "_Failure details of 1 node were left out to stay under 8.0 KiB; "
            "see the JUnit or JSON report._"
        ),
    )
    text = markdown(summary, limit=3000)
    assert len(text.encode()) <= 3000
    assert "### " not in text
    assert "_… and 29 more, left out to stay under 2.9 KiB._" in text


def test_markdown_limit_drops_rows_last():
    nodes = (*(node_ok(f"node{i:03d}") for i in range(200)), node_failed_push("bad"))
    text = markdown(fleet(nodes=nodes), limit=4096)
    assert len(text.encode()) <= 4096
    rows = table_rows(text)
    assert rows[2][0] == "**bad**"  # failed first survives
    assert all(len(r) == len(rows[0]) for r in rows)  # whole rows only
    more = 201 - (len(rows) - 2)
    assert f"_… and {more} more, left out to stay under 4.0 KiB._" in text


def test_markdown_limit_multibyte():
    summary = fleet(command="déploiement ✘✘✘✘", nodes=())
    full = markdown(summary)
    for limit in range(10, 60):
        text = markdown(summary, limit=limit)
        assert len(text.encode("utf-8")) <= limit
        assert full.startswith(text)  # a prefix, never half a character


def test_step_summary(tmp_path: Path):
    assert step_summary_path({}) is None
    assert step_summary_path({"GITHUB_STEP_SUMMARY": ""}) is None
    path = tmp_path / "summary.md"
    assert step_summary_path({"GITHUB_STEP_SUMMARY": str(path)}) == path

    path.write_text("# earlier step output\n")
    written = append_step_summary("hello\n", path, limit=1000)
    assert path.read_text() == "# earlier step output\n\nhello\n"
    assert written == len("\nhello\n")

    text = "\n".join(f"line {i} ✘" for i in range(100))
    append_step_summary(text, path, limit=400)
    content = path.read_bytes()
    assert len(content) <= 400
    assert content.decode().endswith("_… cut to stay under GitHub's step summary limit._\n")
    assert append_step_summary("more", path, limit=400) == 0  # full: nothing added
    assert len(path.read_bytes()) <= 400


def test_write_step_summary_shrinks_logs(tmp_path: Path):
    huge = "y" * 100 + "\n"
    nodes = tuple(node_failed_push(f"n{i}", huge * 60_000) for i in range(3))
    path = tmp_path / "summary.md"
    path.write_text("x" * 1000 + "\n")
    limit = 8 * 1024
    assert step_summary_budget(path, limit=limit) == limit - 1001 - 2
    write_step_summary(fleet(nodes=nodes), path, limit=limit)
    content = path.read_text()
    assert len(content.encode()) <= limit
    assert "cut to stay under" not in content  # shrunk by markdown(), not cut
    assert len(table_rows(content)) == 2 + 3


def test_write_markdown(tmp_path: Path):
    path = tmp_path / "report.md"
    write_markdown(fleet(), path)
    assert path.read_text(encoding="utf-8") == markdown(fleet())


# --- JSON --------------------------------------------------------------------------------


def test_json_schema():
    data = report_json(fleet())
    assert data["schema"] == SCHEMA == "waggle.report/1"
    run = data["run"]
    assert run == {
        "id": None,
        "command": "apply switch",
        "goal": "switch",
        "hive": "./hive.nix",
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "started_at": "2025-01-01T12:00:00.000Z",
        "seconds": 42.2,
        "stages": ["eval", "build", "push", "keys", "activate"],
        "ok": False,
        "counts": {
            "nodes": 6,
            "ok": 3,
            "failed": 1,
            "unchanged": 2,
            "skipped": 0,
            "not_selected": 2,
        },
        "shard": None,
        "cache_bytes_uploaded": None,
    }
    assert data["not_selected"] == ["backup", "edge"]
    nodes = {n["name"]: n for n in data["nodes"]}
    assert [n["name"] for n in data["nodes"]] == ["web1", "web2", "web3", "db1", "db2", "mail"]
    assert {k: v["status"] for k, v in nodes.items()} == {
        "web1": "ok",
        "web2": "failed",
        "web3": "unchanged",
        "db1": "ok",
        "db2": "unchanged",
        "mail": "ok",
    }
    web1, web2 = nodes["web1"], nodes["web2"]
    assert web1["failed_stage"] is None and web2["failed_stage"] == "push"
    assert web1["drv_path"] == "/nix/store/web1.drv"
    assert web1["out_path"] == "/nix/store/web1-system"
    push = web1["stages"][2]
    assert push == {
        "stage": "push",
        "status": "ok",
        "seconds": 2.5,
        "message": "12 of 340 paths",
        "started_at": "2025-01-01T12:00:01.000Z",
        "facts": {
            "paths_total": 340,
            "paths_sent": 12,
            "bytes_sent": 3 * MIB,
            "closure_bytes": 2 * 1024 * MIB,
        },
        "log_tail": None,
    }
    failed = web2["stages"][-1]
    assert failed["status"] == "failed"
    assert failed["message"] == "copying to web2 failed (exit 1)"
    assert failed["log_tail"] == (
        "copying  caf done\nerror: bell here end\nprogress 100%\nlast line  ok"
    )
    assert [s["stage"] for s in web2["stages"]] == ["eval", "build", "push"]


def test_json_round_trip(tmp_path: Path):
    summary = fleet(nodes=(*fleet().nodes, node_failed_push("bad\udcff\x00")), commit=None)
    text = dumps(summary)
    assert text.endswith("\n")
    assert json.loads(text) == report_json(summary)
    assert report_json(summary)["run"]["commit"] is None
    path = tmp_path / "report.json"
    write_json(summary, path)
    assert json.loads(path.read_text(encoding="utf-8"))["nodes"][-1]["name"] == "bad"


def _field_paths(data: Any, prefix: str = "") -> set[str]:
    """Every field path of a JSON document ("a.b", "a[].b"), not inside the open objects."""
    paths: set[str] = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    paths |= _field_paths(item, f"{path}[].")
        elif isinstance(value, dict) and key not in {"facts", "counts", "shard"}:
            paths |= _field_paths(value, f"{path}.")
    return paths


def test_every_json_field_is_documented_in_the_readme_and_every_documented_one_written():
    from runner.shard import ShardSpec

    summary = fleet()
    nodes = list(summary.nodes)
    nodes[0] = replace(nodes[0], wave=1)
    summary = replace(summary, nodes=tuple(nodes), shard=ShardSpec(1, 2))
    written = _field_paths(report_json(summary))
    documented = set(helpers.documented_report_fields())
    documented_objects = {f.rsplit(".", 1)[0] for f in documented if "." in f}
    assert written - documented - documented_objects == set()
    assert documented - written == set()


def test_the_run_id_is_in_every_report_and_read_back():
    summary = fleet(run_id="5f2c0ffee")
    data = report_json(summary)
    assert data["run"]["id"] == "5f2c0ffee"
    assert summary_from_json(json.loads(dumps(summary))).run_id == "5f2c0ffee"
    suite = ET.fromstring(junit_xml(summary)).find("testsuite")
    assert suite is not None
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["run_id"] == "5f2c0ffee"
    assert "Run `5f2c0ffee`." in markdown(summary)
    assert "run_id" not in junit_xml(fleet()) and "Run `" not in markdown(fleet())
