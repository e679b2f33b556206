"""Result objects of a run. Reports and the progress view only read these."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from runner.shard import ShardSpec


class Stage(StrEnum):
    EVAL = "eval"
    BUILD = "build"
    PUSH = "push"
    KEYS = "keys"  # pre-activation keys (all keys for upload-keys)
    ACTIVATE = "activate"
    REBOOT = "reboot"  # reboot and check the running system
    CONFIRM = "confirm"  # the host confirmed over a new connection (magic rollback)
    POST_KEYS = "post-keys"  # post-activation keys
    HEALTH = "health"  # health checks after activation, before the confirmation
    ROLLBACK = "rollback"  # the host went back to the system it ran before


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StageResult:
    stage: Stage
    status: Status
    seconds: float
    message: str = ""
    detail: str = ""  # e.g. Nix's full error or a log tail
    started_at: float = 0.0  # wall-clock (epoch) seconds when the stage began
    # Measured facts for reports, e.g. (("paths_sent", 12), ("bytes_sent", 3048576)).
    facts: tuple[tuple[str, int | float | str], ...] = ()

    def fact(self, name: str) -> int | float | str | None:
        return dict(self.facts).get(name)


@dataclass(frozen=True)
class NodeResult:
    name: str
    stages: tuple[StageResult, ...]
    drv_path: str | None = None
    out_path: str | None = None
    reason: str = ""  # why the node is in the run: "changed", "added", "drift: ..."
    wave: int | None = None  # the rollout wave (1, 2, ...) with --waves; None without
    # Its wave never started (an earlier one spent the failure budget): the node is
    # skipped ("not reached: ..."), yet the run is not ok.
    not_reached: bool = False

    @property
    def rolled_back(self) -> bool:
        """The host went back to the system it ran before this run (it is failed, too)."""
        return any(s.stage is Stage.ROLLBACK and s.status is Status.OK for s in self.stages)

    @property
    def ok(self) -> bool:
        return all(s.status is not Status.FAILED for s in self.stages)

    @property
    def failure(self) -> StageResult | None:
        return next((s for s in self.stages if s.status is Status.FAILED), None)


@dataclass(frozen=True)
class RunSummary:
    """Everything a report shows about one run. Reports are pure functions of this."""

    command: str  # e.g. "apply switch", "build"
    goal: str  # "build", "push", "switch", ...
    hive: str  # the hive's path or flake reference
    commit: str | None  # the git commit of the hive, when known
    started_at: float  # epoch seconds
    seconds: float
    stages: tuple[Stage, ...]  # the stages this goal runs, in order
    nodes: tuple[NodeResult, ...]  # the selected nodes, in selection order
    not_selected: tuple[str, ...] = ()  # nodes of the hive left out by --on
    # --shard K/N: the run's share, and every node --on selected (all shards'), in order;
    # `nodes` are this shard's, the other shards' nodes are in no list above.
    shard: ShardSpec | None = None
    sharded_from: tuple[str, ...] = ()
    # The run's id, the one host locks name ("host locked by run <id> ..."); empty in a
    # merged report (each shard's report has its own).
    run_id: str = ""

    @property
    def failed(self) -> tuple[NodeResult, ...]:
        return tuple(n for n in self.nodes if not n.ok)

    @property
    def not_reached(self) -> tuple[NodeResult, ...]:
        """Nodes of waves that never started: skipped, not failed, but the run failed."""
        return tuple(n for n in self.nodes if n.not_reached)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_reached
