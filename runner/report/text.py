"""Plain-text results for a terminal or a script: pure functions returning lines.

`waggle build` prints `node<TAB>system path` per built node, `apply` one line per node
(`node<TAB>ok|failed|unchanged|...<TAB>message`), `nodes` a table, `nix-info` facts.
"""

from __future__ import annotations

from collections.abc import Sequence

from runner.evaluate import MemoryBudget
from runner.hive.model import NodeConfig
from runner.results import NodeResult, Stage, Status


def built_lines(results: Sequence[NodeResult]) -> list[str]:
    """stdout of `waggle build`: one line per node that built."""
    return [f"{r.name}\t{r.out_path}" for r in results if r.ok]


def build_failure_lines(results: Sequence[NodeResult]) -> list[str]:
    """stderr of `waggle build`: each failure with the last lines of its detail, a count."""
    lines = []
    failed = [r for r in results if not r.ok]
    for r in failed:
        f = r.failure
        assert f is not None
        lines.append(f"node {r.name}: {f.stage} failed: {f.message}")
        if f.detail and f.detail != f.message:
            lines += [f"  {r.name} | {line}" for line in f.detail.splitlines()[-20:]]
    more = f", {len(failed)} failed" if failed else ""
    lines.append(f"{len(results) - len(failed)} of {len(results)} nodes built{more}")
    return lines


def deployed_lines(results: Sequence[NodeResult]) -> list[str]:
    """stdout of `waggle apply`: node, outcome, last message."""
    lines = []
    for r in results:
        f = r.failure
        if f is not None:
            lines.append(f"{r.name}\tfailed\t{f.stage}: {f.message}")
            continue
        skipped = next((st for st in r.stages if st.status is Status.SKIPPED), None)
        if skipped is not None:
            lines.append(f"{r.name}\t{skipped.message or 'skipped'}\t{r.out_path or ''}")
            continue
        main = next(
            (
                st
                for st in reversed(r.stages)
                if st.stage in (Stage.ACTIVATE, Stage.REBOOT, Stage.CONFIRM)
            ),
            r.stages[-1] if r.stages else None,
        )
        lines.append(f"{r.name}\tok\t{main.message if main else ''}")
    return lines


def internal_error_lines(results: Sequence[NodeResult]) -> list[str]:
    """The traceback of every internal error (a bug) of a run, for --debug."""
    lines = []
    for node in results:
        for st in node.stages:
            if st.message.startswith("internal error:") and st.detail:
                lines += [f"node {node.name}, stage {st.stage}:", *st.detail.splitlines()]
    return lines


def _options_summary(c: NodeConfig) -> str:
    parts = []
    if c.target_port is not None:
        parts.append(f"port={c.target_port}")
    if c.build_on_target:
        parts.append("buildOnTarget")
    if c.allow_local_deployment:
        parts.append("allowLocalDeployment")
    if not c.replace_unknown_profiles:
        parts.append("replaceUnknownProfiles=false")
    if c.ssh_options:
        parts.append(f"sshOptions={len(c.ssh_options)}")
    return ", ".join(parts) or "-"


def nodes_table(configs: Sequence[NodeConfig]) -> list[str]:
    """`waggle nodes`: node, target, tags, number of keys, notable options."""
    rows = [("NODE", "TARGET", "TAGS", "KEYS", "OPTIONS")]
    for c in configs:
        user = f"{c.target_user}@" if c.target_user else ""
        target = "-" if c.target_host is None else f"{user}{c.target_host}"
        rows.append(
            (c.name, target, ",".join(c.tags) or "-", str(len(c.keys)), _options_summary(c))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def nix_info_lines(version: str, flakes: bool, cores: int, budget: MemoryBudget) -> list[str]:
    """`waggle nix-info`: the Nix version, flakes, cores and the evaluation memory budget."""
    gib = 2**30
    room = "none" if budget.cgroup_room is None else f"{budget.cgroup_room / gib:.1f} GiB"
    return [
        f"Nix version:        {version}",
        f"Flakes supported:   {'yes' if flakes else 'no'}",
        f"CPU cores:          {cores}",
        f"Memory available:   {budget.available / gib:.1f} GiB",
        f"cgroup memory room: {room}",
        f"Evaluation budget:  {budget.budget / gib:.1f} GiB (reserve {budget.reserve / gib:.1f} GiB)",
    ]
