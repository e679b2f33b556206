"""`waggle plan`'s reports (runner.report.plan): pure functions of a Plan.

Most tests render constructed plans; the last two render plans of a real git history
evaluated by real Nix (its error text, its indentation), with the fleet of test_gitops_plan.
"""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET

from runner.gitops.changes import PathChange
from runner.gitops.plan import (
    ClosureDelta,
    NodeChange,
    PackageChange,
    PackageDiff,
    Plan,
    PlanBuildSettings,
    build_and_diff,
)
from runner.report.plan import plan_json, plan_junit, plan_markdown
from runner.results import NodeResult, Stage, StageResult, Status
from tests.markdown_fences import fenced_blocks
from tests.test_gitops_plan import commit, fleet, git, plan  # noqa: F401 - fleet is a fixture

BASE, HEAD = "a" * 40, "b" * 40


def built(name: str, ok: bool = True) -> NodeResult:
    evaluated = StageResult(Stage.EVAL, Status.OK, 0.0)
    if ok:
        stage = StageResult(Stage.BUILD, Status.OK, 2.5, f"/nix/store/{'1' * 32}-{name}")
    else:
        stage = StageResult(Stage.BUILD, Status.FAILED, 1.0, "builder failed", "log line\n")
    return NodeResult(name, (evaluated, stage))


def sample() -> Plan:
    """A plan with one node of each kind: changed and built, failed, removed, added, unchanged."""
    hello = PackageChange("hello", "2.12", "2.13")
    return Plan(
        hive=".",
        base_rev="main",
        head_rev="HEAD",
        base=BASE,
        head=HEAD,
        changed_paths=(
            PathChange("modified", "hosts/alpha.nix", "hosts/alpha.nix"),
            PathChange("modified", "README.md", "README.md"),
        ),
        ignored_paths=(PathChange("modified", "README.md", "README.md"),),
        nodes=(
            NodeChange(
                "alpha",
                "changed",
                "system derivation changed",
                build=built("alpha"),
                packages=PackageDiff(changed=(hello,), drvs_only_base=3, drvs_only_head=4),
                closure=ClosureDelta(3 << 20, 2 << 20, 40, 38),
            ),
            NodeChange("beta", "changed", "does not evaluate at head: boom", error="boom"),
            NodeChange("gamma", "removed", "node removed"),
            NodeChange("delta", "added", "new node", build=built("delta", ok=False)),
            NodeChange("omega", "unchanged", "same system derivation"),
        ),
        notes=("base evaluation read from the cache (x.json)",),
        evaluations=1,
        base_cached=True,
        seconds=1.23456,
    )


def test_markdown_table_packages_closure_paths_and_notes():
    md = plan_markdown(sample())
    assert md.startswith(f"## waggle plan: `{BASE[:12]}` → `{HEAD[:12]}`\n")
    assert "**4 of 5 nodes affected** (2 changed, 1 added, 1 removed, 1 unchanged)." in md
    assert "**2 node(s) failed:** `beta`, `delta`" in md
    assert "| alpha | changed | system derivation changed | ok |" in md
    assert "| beta | changed | does not evaluate at head: boom | failed to evaluate |" in md
    assert "| gamma | removed | node removed | not built |" in md
    assert "| delta | added | new node | failed: builder failed |" in md
    assert "| omega | unchanged | same system derivation |  |" in md
    # Affected nodes come first, by name.
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows == ["| alpha", "| beta", "| delta", "| gamma", "| omega"]
    assert "- `hello: 2.12 -> 2.13`\n- derivations: 4 new, 3 gone" in md
    assert "- closure 3.0 MiB in 40 paths (+1.0 MiB, +2 paths against the base)" in md
    assert "<details><summary>2 changed paths</summary>" in md
    assert "- `modified README.md` (ignored)" in md
    assert "_base evaluation read from the cache (x.json)_" in md
    assert md.endswith("\n") and not md.endswith("\n\n")


def test_markdown_of_a_skipped_plan_and_of_an_unknown_base():
    skipped = Plan(
        hive=".",
        base_rev="main",
        head_rev="HEAD",
        base=BASE,
        head=HEAD,
        skipped_reason="only ignored paths changed (**/*.md): no node is affected, "
        "nothing was evaluated",
    )
    md = plan_markdown(skipped)
    assert "No node changes: only ignored paths changed" in md
    assert "nothing was evaluated" in md and "| node |" not in md
    reason = "base commit unknown (empty or all zeros): every node is treated as affected"
    unknown = Plan(
        hive=".",
        base_rev="0" * 40,
        head_rev="HEAD",
        base=None,
        head=HEAD,
        all_affected_reason=reason,
        nodes=(NodeChange("alpha", "changed", "base unknown: treated as changed"),),
    )
    md = plan_markdown(unknown)
    assert md.startswith(f"## waggle plan: an unknown base → `{HEAD[:12]}`")
    assert f"> **Note:** {reason}." in md


def test_json_holds_every_fact():
    data = plan_json(sample())
    json.dumps(data)
    assert data["affected"] == ["alpha", "beta", "gamma", "delta"]
    assert data["failed"] == ["beta", "delta"]
    assert [n["name"] for n in data["nodes"]] == ["alpha", "beta", "delta", "gamma", "omega"]
    alpha = data["nodes"][0]
    assert alpha["built"] is True and alpha["build_error"] is None
    assert alpha["packages"]["changed"] == [{"name": "hello", "old": "2.12", "new": "2.13"}]
    assert alpha["closure"]["size_delta"] == 1 << 20 and alpha["closure"]["paths_delta"] == 2
    delta = data["nodes"][2]
    assert delta["built"] is False and delta["build_error"] == "builder failed"
    assert data["changed_paths"][1] == {
        "status": "modified",
        "old_path": "README.md",
        "new_path": "README.md",
        "ignored": True,
    }
    assert data["seconds"] == 1.235 and data["base_cached"] is True
    assert data["dry_activation"] is None


def test_junit_one_case_per_affected_node():
    root = ET.fromstring(plan_junit(sample()))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "waggle plan ."
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == ["alpha", "beta", "gamma", "delta"]  # unchanged nodes are no cases
    assert all(c.get("classname") == "waggle.plan" for c in cases.values())
    assert cases["alpha"].find("failure") is None
    out = cases["alpha"].find("system-out")
    assert out is not None and "hello: 2.12 -> 2.13" in (out.text or "")
    eval_failure = cases["beta"].find("failure")
    assert eval_failure is not None and eval_failure.get("type") == "waggle.eval"
    build_failure = cases["delta"].find("failure")
    assert build_failure is not None and build_failure.get("type") == "waggle.build"
    skipped = cases["gamma"].find("skipped")
    assert skipped is not None and skipped.get("message") == "node removed"
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties == {"hive": ".", "head": HEAD, "base": BASE}


# -- plans of a real history -------------------------------------------------------------


def test_head_eval_failure_is_a_junit_failure(fleet, tmp_path):  # noqa: F811 - the fixture
    repo, c = fleet
    work = tmp_path / "w"
    git(tmp_path, "clone", "-q", str(repo), str(work))
    bad = commit(
        work, "break beta", {"hosts/beta.nix": "{ pkgs, ... }: { imports = [ ./nope.nix ]; }\n"}
    )
    p = plan(work, c["bump"], bad)
    beta = p.node("beta")
    assert beta.kind == "changed" and beta.error and beta.failed
    p = asyncio.run(build_and_diff(p, settings=PlanBuildSettings(build=False)))
    assert p.node("beta").build is None and [n.name for n in p.failed] == ["beta"]
    xml = plan_junit(p)
    assert "<failure" in xml and "waggle.eval" in xml
    assert plan_json(p)["failed"] == ["beta"]


def test_a_throw_with_backticks_stays_inside_its_code_block(fleet, tmp_path):  # noqa: F811
    repo, c = fleet
    work = tmp_path / "w"
    git(tmp_path, "clone", "-q", str(repo), str(work))
    # Nix indents the lines of a throw's message, but prints a trace's lines as they are.
    message = "bad ``` value\\n```\\n## injected heading\\n[link](https://example.invalid)\\n````"
    beta = f'{{ ... }}: builtins.trace "{message}" (throw "{message}")\n'
    bad = commit(work, "throw", {"hosts/beta.nix": beta})
    p = plan(work, c["bump"], bad)
    assert p.node("beta").error
    text = plan_markdown(p)
    blocks, outside = fenced_blocks(text)
    inside = [b for b in blocks if "injected heading" in b]
    assert len(inside) == 1, text
    assert "bad ``` value" in inside[0] and "[link](https://example.invalid)" in inside[0]
    assert not any("injected heading" in line for line in outside), text
    # The report goes on after the block: the changed paths are outside any code block.
    assert any("changed paths" in line for line in outside), text
