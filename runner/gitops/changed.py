"""`apply --changed-since REV` and `waggle ci` deploys: which nodes to deploy, and why.

The nodes a change affects (changed or added between base and head) are
deployed; so are nodes whose host drifted (runs something else than head's
system). Everything else is left alone and reported "unchanged" without a
build or a push.

Head is evaluated once per run: the plan evaluates head with the run's own hive (the
working tree at HEAD, the run's flags and builders), and that evaluation
(`ChangeSelection.evaluated`) goes on to the build and deploy steps
(`evaluate_and_build(evaluated=...)`), as does the evaluation made for the drift check
when the plan evaluated nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.evaluate import EvalRun, EvalSettings, evaluate
from runner.gitops.drift import find_drift
from runner.gitops.plan import Plan, compute_plan
from runner.hive.hive import Hive
from runner.hive.model import NodeConfig
from runner.hive.selection import Selector
from runner.hosts.ssh import SshSettings
from runner.nix import NixFlags
from runner.results import NodeResult, Stage, StageResult, Status
from runner.shard import ShardSpec


@dataclass(frozen=True)
class ChangeSelection:
    plan: Plan
    deploy: dict[str, str]  # node -> why: "changed", "added", "drift: ..."
    unchanged: tuple[str, ...]
    evaluated: EvalRun | None = None  # head, evaluated with the run's hive (see above)

    def unchanged_results(self, started_at: float) -> list[NodeResult]:
        return [
            NodeResult(
                n,
                (
                    StageResult(
                        Stage.ACTIVATE, Status.SKIPPED, 0.0, "unchanged", started_at=started_at
                    ),
                ),
            )
            for n in self.unchanged
        ]


async def select_changed(
    hive: Hive,
    hive_path: Path,
    base: str | None,
    names: Sequence[str],
    configs: Mapping[str, NodeConfig],
    *,
    selector: Selector | None,
    ignore: Sequence[str],
    cache_dir: Path | None,
    flags: NixFlags,
    eval_settings: EvalSettings,
    ssh: SshSettings,
    parallel: int,
    drift: bool = True,
    shard: ShardSpec | None = None,
) -> ChangeSelection:
    plan = await compute_plan(
        hive_path,
        base,
        selector=selector,
        ignore=ignore,
        cache_dir=cache_dir,
        flags=flags,
        eval_settings=eval_settings,
        head_hive=hive,  # head is the run's own hive: its evaluation feeds the run
        shard=shard,
    )
    evaluated = plan.head_evaluation
    selected = set(names)
    deploy: dict[str, str] = {n.name: str(n.kind) for n in plan.affected if n.name in selected}
    if plan.all_affected_reason:
        deploy.update({n: "every node (base unknown)" for n in names if n not in deploy})
    rest = [n for n in names if n not in deploy]
    if drift and rest:
        head_outs = {
            n.name: n.head_out for n in plan.nodes if n.name in rest and n.head_out is not None
        }
        missing = [n for n in rest if n not in head_outs]
        if missing:  # nothing was evaluated (only ignored paths changed): evaluate head
            run = await evaluate(hive, missing, eval_settings)
            evaluated = evaluated or run  # the build evaluates what neither run holds
            head_outs.update(
                {n: r.out_path for n, r in run.results.items() if r.out_path is not None}
            )
            deploy.update({n: "evaluation failed" for n, r in run.results.items() if not r.ok})
        deploy.update(await find_drift(configs, head_outs, ssh, parallel=parallel))
    unchanged = tuple(n for n in names if n not in deploy)
    return ChangeSelection(plan, deploy, unchanged, evaluated)
