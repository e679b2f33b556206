"""What each use case is asked to do: frozen requests, built by the CLI, `ci` and `watch`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runner.build import BuildSettings
from runner.deploy.pipeline import DeploySettings, HostFactory
from runner.errors import UsageError
from runner.evaluate import EvalSettings
from runner.gitops.plan import DEFAULT_IGNORE
from runner.goals import Goal
from runner.hosts.ssh import SshSettings
from runner.nix import NixFlags
from runner.shard import ShardSpec, parse_shard


def parse_node_limit(text: str) -> int | None:
    """`--eval-node-limit` / waggle.yaml's eval_node_limit: "auto" (None), N, or 0 (all)."""
    text = str(text).strip()
    if text == "auto":
        return None
    try:
        limit = int(text)
    except ValueError:
        raise UsageError(f"--eval-node-limit {text!r}: must be auto, a number, or 0") from None
    if limit < 0:
        raise UsageError(f"--eval-node-limit {text!r}: must not be negative")
    return limit


def shard_of(text: str | None) -> ShardSpec | None:
    """`--shard K/N` (None: not given)."""
    return None if text is None else parse_shard(text)


@dataclass(frozen=True)
class HiveRef:
    """Which hive: `-f` (None: search upward from `cwd`) and the Nix flags to open it with."""

    config: str | None = None
    cwd: Path = field(default_factory=Path.cwd)
    flags: NixFlags = field(default_factory=NixFlags)


@dataclass(frozen=True)
class View:
    """How progress is shown on stderr (the live view on a terminal, else plain lines)."""

    plain: bool = False
    color: str = "auto"
    timestamps: bool = False


@dataclass(frozen=True)
class Reports:
    """Report files to write after a run (None: not asked for)."""

    junit: Path | None = None
    markdown: Path | None = None
    json: Path | None = None


@dataclass(frozen=True)
class Changes:
    """Deploy only what a git change affects (`--changed-since`)."""

    since: str
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    cache_dir: Path | None = None
    drift: bool = True  # also deploy hosts whose running system is not head's


@dataclass(frozen=True)
class ApplyRequest:
    """build, apply GOAL, upload-keys: evaluate, build and (for deploying goals) deploy."""

    hive: HiveRef = field(default_factory=HiveRef)
    on: str | None = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    build: BuildSettings = field(default_factory=BuildSettings)
    keep_result: bool = False  # GC roots in <hive dir>/.gcroots
    deploy: DeploySettings = field(default_factory=DeploySettings)  # its goal is the run's
    changes: Changes | None = None
    reports: Reports = field(default_factory=Reports)
    view: View = field(default_factory=View)
    command: str = "apply"  # for reports: "apply", "build", "upload-keys", "watch", ...
    host_factory: HostFactory | None = None  # None: SSH to each node's targetHost
    shard: ShardSpec | None = None  # --shard K/N: this share of the --on selection only

    @property
    def goal(self) -> Goal:
        return self.deploy.goal


@dataclass(frozen=True)
class PlanRequest:
    """What a change from `base` to `head` (None: HEAD) does to the hive's nodes."""

    base: str | None  # None: unknown (every node is affected, and the plan says why)
    head: str | None = None
    hive: HiveRef = field(default_factory=HiveRef)
    on: str | None = None
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    cache_dir: Path | None = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    build: bool = True  # build the changed nodes (for package diffs and closure sizes)
    build_jobs: int = 2
    build_timeout: float = 3 * 3600.0
    reports: Reports = field(default_factory=Reports)
    host_access: bool = False  # also evaluate how each node's host is reached (ci's trust)
    shard: ShardSpec | None = None  # --shard K/N: build and report this share of the nodes


@dataclass(frozen=True)
class CiRequest:
    """`waggle ci`: flags that win over waggle.yaml, and the run settings from flags."""

    apply: ApplyRequest  # the flags' settings; ci derives its own requests from it
    ci_config: Path | None = None
    on: str | None = None
    reports: Reports = field(default_factory=Reports)
    comment: bool | None = None
    cache_dir: Path | None = None
    ignore: tuple[str, ...] | None = None
    parallel_given: bool = False  # --parallel was on the command line (waggle.yaml loses)
    max_failures_given: bool = False  # --max-failures was (rollout.max_failures loses)
    confirm_timeout_given: bool = False  # --confirm-timeout was (rollout.confirm_timeout loses)


@dataclass(frozen=True)
class MergeRequest:
    """`waggle report merge`: the JSON reports of shard runs into one run's reports."""

    files: tuple[Path, ...]
    reports: Reports = field(default_factory=Reports)


@dataclass(frozen=True)
class WatchRequest:
    """`waggle watch`: follow a ref of a clone and apply each new head's hive, with the
    `rollout:` of that commit's waggle.yaml where no flag was given."""

    repo: Path
    apply: ApplyRequest  # settings for every deploy; its hive is replaced per commit
    remote: str = "origin"
    ref: str = "main"
    interval: float = 60.0
    fetch_timeout: float = 120.0
    reports_dir: Path | None = None
    metrics_file: Path | None = None
    allow_non_descendant: bool = False
    once: bool = False
    max_failures_given: bool = False  # --max-failures was given (the commit's rollout: loses)
    confirm_timeout_given: bool = False  # --confirm-timeout was (as in CiRequest)


@dataclass(frozen=True)
class ExecRequest:
    """`waggle exec`: one command on the selected nodes' hosts."""

    command: tuple[str, ...]
    hive: HiveRef = field(default_factory=HiveRef)
    on: str | None = None
    ssh: SshSettings = field(default_factory=SshSettings)
    parallel: int = 0
    timeout: float = 600.0


@dataclass(frozen=True)
class ApplyLocalRequest:
    """`waggle apply-local`: a node on the machine Waggle runs on."""

    goal: Goal = Goal.SWITCH
    node: str | None = None  # None: this machine's hostname
    hive: HiveRef = field(default_factory=HiveRef)
    sudo: bool = False
    keys: bool = True
    activation_timeout: float = 600.0
    eval: EvalSettings = field(default_factory=EvalSettings)
    build: BuildSettings = field(default_factory=BuildSettings)
    keep_result: bool = False
    view: View = field(default_factory=View)
