"""`waggle plan`'s reports: markdown (step summary, MR comment), JSON (`--json`), JUnit XML.

Pure functions of a `runner.gitops.plan.Plan`, like the run reports of a `RunSummary`
(`runner.report.markdown`, `jsonreport`, `junit`): the plan is computed in `runner.gitops.plan`,
written to files by the application layer.

- markdown: a heading `waggle plan: <base> → <head>`, the affected count, a table of every node
  (change, why, build), the dry-activation decisions of a pull request, a section per affected
  node with its package diff and closure size, the changed paths (folded), the plan's notes;
- JSON: the same facts as data, affected nodes first, by name;
- JUnit: one test case per affected node (classname `waggle.plan`).
"""

from __future__ import annotations

from typing import Any

from junit_xml import TestCase, TestSuite, to_xml_report_string  # type: ignore[import-untyped]

from runner.gitops.plan import AFFECTED_KINDS, ClosureDelta, NodeChange, PackageChange, Plan
from runner.report import clean_text, human_bytes, log_tail, one_line
from runner.report.markdown import code, code_block, escape

PLAN_CLASSNAME = "waggle.plan"


def _short(commit: str | None) -> str:
    return commit[:12] if commit else "unknown"


def _signed_bytes(n: int) -> str:
    return ("+" if n >= 0 else "-") + human_bytes(abs(n))


def _closure_text(c: ClosureDelta) -> str:
    if c.head_size is None:
        return "closure size unknown"
    head = f"{human_bytes(c.head_size)} in {c.head_paths} paths"
    if c.size_delta is None:
        return f"closure {head}; base size unknown (the base system is not built here)"
    return (
        f"closure {head} ({_signed_bytes(c.size_delta)}, {c.paths_delta:+d} paths against the base)"
    )


def plan_markdown(plan: Plan) -> str:
    """The plan as GitHub/GitLab-flavoured markdown (step summary, MR comment)."""
    head = f"`{_short(plan.head)}`"
    base = f"`{_short(plan.base)}`" if plan.base else "an unknown base"
    affected = plan.affected
    lines = [f"## waggle plan: {base} → {head}", ""]
    if plan.skipped_reason:
        lines += [f"No node changes: {escape(plan.skipped_reason)}.", ""]
    else:
        counts = {
            k: sum(1 for n in plan.nodes if n.kind == k) for k in (*AFFECTED_KINDS, "unchanged")
        }
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        lines += [
            f"**{len(affected)} of {len(plan.nodes)} nodes affected** ({summary or 'no nodes'}).",
            "",
        ]
    if plan.all_affected_reason:
        lines += [f"> **Note:** {escape(plan.all_affected_reason)}.", ""]
    if plan.failed:
        lines += [
            f"**{len(plan.failed)} node(s) failed:** "
            + ", ".join(code(n.name) for n in plan.failed),
            "",
        ]
    if plan.nodes:
        lines += ["| node | change | why | build |", "|---|---|---|---|"]
        for n in sorted(plan.nodes, key=lambda n: (not n.affected, n.name)):
            if n.build is None:
                built = _not_built(n)
            elif n.build.ok:
                built = "ok"
            else:
                built = "failed: " + escape(
                    (n.build.failure.message if n.build.failure else ""), 200
                )
            lines.append(f"| {escape(n.name)} | {n.kind} | {escape(n.reason, 300)} | {built} |")
        lines.append("")
    if plan.dry_activation is not None:
        policy = plan.dry_activation
        lines += ["### Dry activation", "", f"{escape(policy.reason, 500)}.", ""]
        decided = [n for n in plan.nodes if n.dry_activate is not None]
        for n in sorted(decided, key=lambda n: (not n.dry_activate_planned, n.name)):
            assert n.dry_activate is not None
            lines.append(f"- {code(n.name)}: {escape(n.dry_activate.reason, 500)}")
        if decided:
            lines.append("")
    for n in affected:
        if not (n.packages or n.closure or n.notes or n.error):
            continue
        lines += [f"### {escape(n.name)}", ""]
        if n.error:
            lines += [code_block(clean_text(n.detail or n.error).strip()[-3000:]), ""]
        if n.packages is not None:
            if n.packages.entries:
                lines += [f"- {code(p.describe())}" for p in n.packages.entries]
            else:
                lines.append("- no package version changes")
            lines.append(
                f"- derivations: {n.packages.drvs_only_head} new, {n.packages.drvs_only_base} gone"
            )
        if n.closure is not None:
            lines.append(f"- {_closure_text(n.closure)}")
        lines += [f"- {escape(note)}" for note in n.notes]
        lines.append("")
    if plan.changed_paths:
        shown = plan.changed_paths[:50]
        ignored = set(plan.ignored_paths)
        lines += [
            f"<details><summary>{len(plan.changed_paths)} changed paths</summary>",
            "",
        ]
        lines += [f"- {code(c.describe())}" + (" (ignored)" if c in ignored else "") for c in shown]
        if len(plan.changed_paths) > len(shown):
            lines.append(f"- … and {len(plan.changed_paths) - len(shown)} more")
        lines += ["", "</details>", ""]
    if plan.notes:
        lines += [f"_{escape(note)}_  " for note in plan.notes]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _change_json(c: PackageChange) -> dict[str, str | None]:
    return {"name": c.name, "old": c.old, "new": c.new}


def _not_built(n: NodeChange) -> str:
    """The build column of a node the plan did not build."""
    if n.error:
        return "failed to evaluate"
    if n.build_on_target:
        return "on its host at deploy time"
    return "not built" if n.affected else ""


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data (`--json`); affected nodes first, by name."""

    def node(n: NodeChange) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": n.name,
            "kind": n.kind,
            "reason": n.reason,
            "base_drv": n.base_drv,
            "head_drv": n.head_drv,
            "base_out": n.base_out,
            "head_out": n.head_out,
            "error": n.error,
            "built": None if n.build is None else n.build.ok,
            "build_on_target": n.build_on_target,  # not built by the plan: see its notes
            "build_error": (
                n.build.failure.message if n.build is not None and n.build.failure else None
            ),
            "packages": None,
            "closure": None,
            "notes": list(n.notes),
            "dry_activate": None
            if n.dry_activate is None
            else {"planned": n.dry_activate.planned, "reason": n.dry_activate.reason},
        }
        if n.packages is not None:
            out["packages"] = {
                "changed": [_change_json(c) for c in n.packages.changed],
                "added": [_change_json(c) for c in n.packages.added],
                "removed": [_change_json(c) for c in n.packages.removed],
                "drvs_only_base": n.packages.drvs_only_base,
                "drvs_only_head": n.packages.drvs_only_head,
            }
        if n.closure is not None:
            out["closure"] = {
                "head_size": n.closure.head_size,
                "base_size": n.closure.base_size,
                "size_delta": n.closure.size_delta,
                "head_paths": n.closure.head_paths,
                "base_paths": n.closure.base_paths,
                "paths_delta": n.closure.paths_delta,
            }
        return out

    return {
        "hive": plan.hive,
        "base_rev": plan.base_rev,
        "head_rev": plan.head_rev,
        "base": plan.base,
        "head": plan.head,
        "affected": [n.name for n in plan.affected],
        "failed": [n.name for n in plan.failed],
        "all_affected_reason": plan.all_affected_reason,
        "skipped_reason": plan.skipped_reason,
        "changed_paths": [
            {
                "status": c.status,
                "old_path": c.old_path,
                "new_path": c.new_path,
                "ignored": c in plan.ignored_paths,
            }
            for c in plan.changed_paths
        ],
        "ignore": list(plan.ignore),
        "nodes": [node(n) for n in sorted(plan.nodes, key=lambda n: (not n.affected, n.name))],
        "notes": list(plan.notes),
        "dry_activation": None
        if plan.dry_activation is None
        else {"enabled": plan.dry_activation.enabled, "reason": plan.dry_activation.reason},
        "evaluations": plan.evaluations,
        "base_cached": plan.base_cached,
        "seconds": round(plan.seconds, 3),
    }


def plan_junit(plan: Plan) -> str:
    """JUnit XML: one test case per affected node (classname `waggle.plan`).

    Passed when it evaluated (and built, when built); a failure carrying Nix's message
    when evaluation or the build failed; removed nodes are skipped ("node removed").
    """
    cases: list[Any] = []
    for n in plan.affected:
        seconds = n.build.stages[-1].seconds if n.build is not None else 0.0
        case = TestCase(one_line(n.name, 300), classname=PLAN_CLASSNAME, elapsed_sec=seconds)
        if n.kind == "removed":
            case.add_skipped_info(message="node removed")
        elif n.error is not None:
            case.add_failure_info(
                message=one_line(n.error, 1000),
                output=log_tail(n.detail) or n.error,
                failure_type="waggle.eval",
            )
        elif n.build is not None and n.build.failure is not None:
            failure = n.build.failure
            case.add_failure_info(
                message=one_line(failure.message, 1000) or "build failed",
                output=log_tail(failure.detail) or failure.message,
                failure_type="waggle.build",
            )
        else:
            out = [f"{n.kind}: {n.reason}"]
            if n.packages is not None:
                out += [p.describe() for p in n.packages.entries]
            case.stdout = clean_text("\n".join(out))
        cases.append(case)
    properties = {"hive": one_line(plan.hive), "head": plan.head}
    if plan.base:
        properties["base"] = plan.base
    if plan.all_affected_reason:
        properties["note"] = one_line(plan.all_affected_reason)
    suite = TestSuite(one_line(f"waggle plan {plan.hive}"), cases, properties=properties)
    return str(to_xml_report_string([suite], prettyprint=True))
