"""`waggle report merge`: the reports of `--shard K/N` runs as the report of one run.

A pure function of the shards' RunSummaries (read back with `jsonreport.summary_from_json`).
The shards must be runs of the same command, goal and commit, cut from the same selection
(`run.shard.selected`, the same N, the same `not_selected`), each shard at most once and no
node in two of them; otherwise `merge_runs` refuses with a one-line error naming the file.

The merged run: the nodes of every shard in selection order, the stages of all of them
(each shard's own order kept), started when the first shard started and as long as from
then until the last one ended. With every shard present it is the summary one unsharded
run would have given (apart from timings): no `shard`, the same `not_selected`. A shard
without a report leaves its nodes "not reached: no report from shard K/N" (skipped; the
merged run is then not ok).
"""

from __future__ import annotations

from collections.abc import Sequence

from runner.errors import UsageError
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status
from runner.shard import ShardSpec, assign


class MergeError(UsageError):
    """Shard reports that cannot be one run; the message names the file."""


def merge_runs(runs: Sequence[tuple[str, RunSummary]]) -> RunSummary:
    """Merge `runs`, each (file name for errors, the shard run's summary)."""
    if not runs:
        raise MergeError("report merge: no reports given")
    for label, run in runs:
        if run.shard is None:
            raise MergeError(f"{label}: not the report of a --shard K/N run (run.shard is null)")
    first_label, first = runs[0]
    for label, run in runs[1:]:
        _same_run(label, run, first_label, first)
    nodes = _nodes(runs)
    starts = [run.started_at for _, run in runs]
    ends = [run.started_at + run.seconds for _, run in runs]
    return RunSummary(
        command=first.command,
        goal=first.goal,
        hive=first.hive,
        commit=first.commit,
        started_at=min(starts),
        seconds=max(ends) - min(starts),
        stages=_stages([run.stages for _, run in runs]),
        nodes=nodes,
        not_selected=first.not_selected,
    )


def _same_run(label: str, run: RunSummary, first_label: str, first: RunSummary) -> None:
    assert run.shard is not None and first.shard is not None
    checks = (
        ("commit", run.commit or "(none)", first.commit or "(none)"),
        ("goal", run.goal, first.goal),
        ("command", run.command, first.command),
        ("shard count", str(run.shard.total), str(first.shard.total)),
    )
    for what, mine, theirs in checks:
        if mine != theirs:
            raise MergeError(
                f"{label}: {what} {mine} differs from {first_label}'s {theirs}: "
                "only shards of one run can be merged"
            )
    if run.sharded_from != first.sharded_from or run.not_selected != first.not_selected:
        raise MergeError(
            f"{label}: its shards were cut from another selection than {first_label}'s "
            "(different --on or hive): only shards of one run can be merged"
        )


def _nodes(runs: Sequence[tuple[str, RunSummary]]) -> tuple[NodeResult, ...]:
    """Every shard's nodes in selection order; an overlap or a stranger is an error."""
    first = runs[0][1]
    assert first.shard is not None
    selected, total = first.sharded_from, first.shard.total
    seen_shard: dict[int, str] = {}
    found: dict[str, tuple[str, NodeResult]] = {}
    for label, run in runs:
        assert run.shard is not None
        if run.shard.index in seen_shard:
            raise MergeError(f"{label}: shard {run.shard} is also {seen_shard[run.shard.index]}")
        seen_shard[run.shard.index] = label
        for node in run.nodes:
            if node.name in found:
                raise MergeError(f"{label}: node {node.name} is also in {found[node.name][0]}")
            if node.name not in selected:
                raise MergeError(f"{label}: node {node.name} is not in the shards' selection")
            found[node.name] = (label, node)
    placed = assign(selected, total) if len(found) < len(selected) else {}
    return tuple(
        found[name][1] if name in found else _missing(name, ShardSpec(placed[name], total))
        for name in selected
    )


def _missing(name: str, shard: ShardSpec) -> NodeResult:
    why = f"not reached: no report from shard {shard}"
    return NodeResult(name, (StageResult(Stage.EVAL, Status.SKIPPED, 0.0, why),), not_reached=True)


def _stages(lists: Sequence[tuple[Stage, ...]]) -> tuple[Stage, ...]:
    """All stages of all lists, each list's order kept (a stage only one shard ran, such as
    health when only its nodes have checks, goes after the stage it followed there)."""
    out: list[Stage] = []
    for stages in lists:
        for i, stage in enumerate(stages):
            if stage not in out:  # stages[i - 1] is in `out` by now
                out.insert(out.index(stages[i - 1]) + 1 if i else 0, stage)
    return tuple(out)
