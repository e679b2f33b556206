"""`waggle plan`: which nodes a git change affects, and how.

1. Resolve base and head (fetching the base into a shallow clone when missing). An
   unknown base (all zeros, or not fetchable) makes every selected node affected, with
   the reason in the plan.
2. List the changed paths (renames detected). When every change is to an ignored path,
   nothing is evaluated.
3. Evaluate the selected nodes at head and at base, each from its commit's tree written
   to a temporary directory (flakes as `path:` references), so both sides see exactly the
   committed files. Base results are cached on disk by tree id and Nix version.
   (`apply --changed-since` and `waggle ci` on a push evaluate head with the run's own
   hive instead, and build and deploy from that evaluation.) Remote builders: see
   runner.gitops.builders.
4. Compare drvPaths: changed, added, removed, unchanged.
5. `build_and_diff`: build the changed and added nodes (not buildOnTarget ones: they are
   built on their hosts at deploy time), and for changed nodes diff the packages of the
   base and head derivation closures (the base is never built) and report the closure
   size delta where both sizes are known.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pygit2

from runner import nix
from runner.build import BuildSettings, build_node
from runner.errors import HiveError, NixError, UsageError
from runner.evaluate import EvalRun, EvalSettings, NodeEval, evaluate
from runner.gitops import cache
from runner.gitops.builders import Side, machines_file_of
from runner.gitops.cache import HostAccess, SideEval, SideNode
from runner.gitops.changes import (
    GitError,
    PathChange,
    change_is_ignored,
    changed_paths,
    checkout_tree,
    ensure_commit,
    is_zero,
    open_repo,
    resolve,
)
from runner.hive.discovery import HiveKind, HiveSource, locate
from runner.hive.hive import Hive
from runner.hive.model import NodeConfig
from runner.hive.selection import Selector
from runner.nix import NixFlags
from runner.results import NodeResult
from runner.shard import RULE as SHARD_RULE
from runner.shard import ShardSpec, shard_nodes

DEFAULT_IGNORE: tuple[str, ...] = ("**/*.md", "docs/**", ".github/**")

Kind = Literal["changed", "added", "removed", "unchanged"]
AFFECTED_KINDS: tuple[Kind, ...] = ("changed", "added", "removed")


# -- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageChange:
    name: str
    old: str | None  # None: added
    new: str | None  # None: removed

    def describe(self) -> str:
        if self.old is None:
            return f"{self.name}: added {self.new}"
        if self.new is None:
            return f"{self.name}: removed {self.old}"
        return f"{self.name}: {self.old} -> {self.new}"


@dataclass(frozen=True)
class PackageDiff:
    """Packages (versioned derivations) of the base and head derivation closures."""

    changed: tuple[PackageChange, ...] = ()
    added: tuple[PackageChange, ...] = ()
    removed: tuple[PackageChange, ...] = ()
    drvs_base: int = 0  # derivations in the base closure
    drvs_head: int = 0
    drvs_only_base: int = 0  # derivations not shared
    drvs_only_head: int = 0

    @property
    def entries(self) -> tuple[PackageChange, ...]:
        return (*self.changed, *self.added, *self.removed)


@dataclass(frozen=True)
class ClosureDelta:
    """Runtime closure sizes (NAR bytes) and path counts; None where not known here.

    The head size is measured after its build. The base size is known only when the
    base system's output is valid in the local store (Waggle never builds the base).
    """

    head_size: int | None
    base_size: int | None
    head_paths: int | None
    base_paths: int | None

    @property
    def size_delta(self) -> int | None:
        if self.head_size is None or self.base_size is None:
            return None
        return self.head_size - self.base_size

    @property
    def paths_delta(self) -> int | None:
        if self.head_paths is None or self.base_paths is None:
            return None
        return self.head_paths - self.base_paths


@dataclass(frozen=True)
class DryActivation:
    """Whether `waggle ci` dry-activates a node of a pull request, and why (not)."""

    planned: bool
    reason: str


@dataclass(frozen=True)
class DryActivationPolicy:
    """Whether a pull request's plan dry-activates at all, and why (not)."""

    enabled: bool
    reason: str


@dataclass(frozen=True)
class NodeChange:
    name: str
    kind: Kind
    reason: str
    base_drv: str | None = None
    head_drv: str | None = None
    head_out: str | None = None
    base_out: str | None = None
    error: str | None = None  # evaluation failure at head (one line)
    detail: str = ""
    build: NodeResult | None = None  # after build_and_diff, for built nodes
    packages: PackageDiff | None = None
    closure: ClosureDelta | None = None
    notes: tuple[str, ...] = ()
    # with compute_plan(host_access=True): how each side reaches the node's host
    base_access: HostAccess | None = None
    head_access: HostAccess | None = None
    base_access_error: str | None = None
    head_access_error: str | None = None
    dry_activate: DryActivation | None = None  # set by trust.decide_dry_activation
    build_on_target: bool = False  # deployment.buildOnTarget at head: not built by a plan

    @property
    def affected(self) -> bool:
        return self.kind in AFFECTED_KINDS

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.build is not None and not self.build.ok)

    @property
    def dry_activate_planned(self) -> bool:
        return self.dry_activate is not None and self.dry_activate.planned


@dataclass(frozen=True)
class Plan:
    hive: str  # the hive's path relative to the repository root
    base_rev: str | None  # as asked
    head_rev: str
    base: str | None  # the base commit id, None when unknown
    head: str  # the head commit id
    changed_paths: tuple[PathChange, ...] = ()
    ignored_paths: tuple[PathChange, ...] = ()  # the subset of changed_paths ignored
    nodes: tuple[NodeChange, ...] = ()
    all_affected_reason: str | None = None  # why every node counts as affected
    skipped_reason: str | None = None  # why nothing was evaluated
    notes: tuple[str, ...] = ()  # fetches, cache hits, base hive errors
    evaluations: int = 0  # sides evaluated with nix (0, 1 or 2); cache hits are not counted
    base_cached: bool = False
    seconds: float = 0.0
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    dry_activation: DryActivationPolicy | None = None  # pull requests in `waggle ci` only
    machines_file: str | None = None  # meta.machinesFile the plan evaluated and builds with
    # the head evaluation itself (with head_hive: the run's own), for a build step after it
    head_evaluation: EvalRun | None = field(default=None, compare=False, repr=False)

    @property
    def affected(self) -> tuple[NodeChange, ...]:
        return tuple(n for n in self.nodes if n.affected)

    @property
    def failed(self) -> tuple[NodeChange, ...]:
        return tuple(n for n in self.nodes if n.failed)

    @property
    def ok(self) -> bool:
        return not self.failed

    def node(self, name: str) -> NodeChange:
        return next(n for n in self.nodes if n.name == name)


# -- the hive at a commit -------------------------------------------------------------


def hive_path_of(source: HiveSource) -> Path:
    """The file (hive.nix) or directory (flake) of a located hive, for `compute_plan`."""
    if source.kind is HiveKind.LEGACY:
        return Path(source.ref)
    if source.directory is None:
        raise UsageError(
            f"plan: the hive {source.ref} is a flake reference, not a directory in a git "
            "repository; run it from a checkout or pass -f with a path"
        )
    return source.directory


def hive_repository(hive_path: Path) -> pygit2.Repository:
    """The repository whose commits hold the hive at `hive_path`. UsageError naming the
    hive and the repository (the one around it, else the working directory's) when the
    hive is not inside one, or resolves (through a link) to a file outside it."""
    given = hive_path.absolute()
    start = given if given.is_dir() else given.parent
    try:
        repo: pygit2.Repository | None = open_repo(start)
    except GitError:
        repo = None
    if repo is None:
        try:
            around: str | None = open_repo(Path.cwd()).workdir
        except GitError:
            around = None
        if around:
            raise UsageError(
                f"plan: the hive {hive_path} is outside the repository {around.rstrip('/')} "
                "(the working directory's); pass -f with a hive inside the repository to plan"
            )
        raise UsageError(f"plan: the hive {hive_path} is not inside a git repository")
    workdir = repo.workdir
    if workdir is None:
        raise UsageError(f"plan: the repository of {hive_path} is bare")
    real, root = hive_path.resolve(), Path(workdir).resolve()
    if not real.is_relative_to(root):
        raise UsageError(
            f"plan: the hive {hive_path} is {real}, outside the repository {root}: "
            "the commits do not hold it"
        )
    return repo


def _relative(repo: pygit2.Repository, hive_path: Path) -> str:
    workdir = repo.workdir
    if workdir is None:
        raise UsageError(f"plan: the repository of {hive_path} is bare")
    try:
        rel = hive_path.resolve().relative_to(Path(workdir).resolve())
    except ValueError as e:
        raise UsageError(f"plan: {hive_path} is not inside the repository {workdir}") from e
    return rel.as_posix() if str(rel) != "." else ""


def _source_in(tree_dir: Path, rel: str) -> HiveSource | None:
    """The hive at `rel` inside a written-out tree, or None when it is not there."""
    target = tree_dir / rel if rel else tree_dir
    if not target.exists():
        return None
    source = locate(str(target), tree_dir)
    if source.kind is HiveKind.FLAKE:
        return replace(source, ref=f"path:{source.directory}")
    return source


def _tree_has(commit: pygit2.Commit, rel: str) -> bool:
    if not rel:
        return True
    try:
        commit.tree[rel]
    except KeyError:
        return False
    return True


async def _host_access(
    hive: Hive, names: Sequence[str]
) -> dict[str, tuple[HostAccess | None, str | None]]:
    """Each node's HostAccess, or None and the error when its deployment settings do not
    evaluate (one broken node costs only itself)."""
    each = await hive.deployment_each(names)
    return {
        n: (None, c.message) if isinstance(c, HiveError) else (HostAccess.of(c), None)
        for n, c in each.items()
    }


@dataclass(frozen=True)
class _Inputs:
    """What both sides of a plan are evaluated with."""

    repo: pygit2.Repository
    rel: str  # the hive's path inside the repository, "" for its root
    flags: NixFlags
    selector: Selector | None
    settings: EvalSettings
    cache_dir: Path | None
    host_access: bool
    head_hive: Hive | None = None  # evaluate head with this hive, not a checkout
    builders_from: Side = "head"  # whose meta.machinesFile (without --builders)
    shard: ShardSpec | None = None  # --shard: only this share of the nodes is evaluated
    head_chosen: frozenset[str] | None = None  # with a shard, once head is evaluated: what
    head_mine: frozenset[str] = frozenset()  # the selection chose at head, and the shard's


def _sharded(chosen: list[str], inputs: _Inputs) -> list[str]:
    """With --shard, the share of `chosen` this plan evaluates. At head: the shard rule over
    head's selection (as `apply --shard` selects). At base: the same nodes, and of the
    nodes only base has (removed ones) those the rule puts in this shard over base's
    selection; so every node is in exactly one shard's plan."""
    if inputs.shard is None:
        return chosen
    if inputs.head_chosen is None:
        return shard_nodes(chosen, inputs.shard)
    only_base = set(shard_nodes(chosen, inputs.shard)) - inputs.head_chosen
    return [n for n in chosen if n in inputs.head_mine or n in only_base]


async def _selected(hive: Hive, inputs: _Inputs) -> list[str]:
    """The nodes of `hive` the selection (--on) chooses."""
    names = await hive.node_names()
    selector = inputs.selector
    tags: dict[str, tuple[str, ...]] = {}
    if selector is not None and selector.needs_tags:
        tags = {n: c.tags for n, c in (await hive.deployment(names)).items()}
    return list(names) if selector is None else selector.matching(names, tags)


async def _evaluate_side(
    hive: Hive, inputs: _Inputs, selected: list[str] | None = None
) -> tuple[SideEval, EvalRun | None]:
    """The side's selected nodes (`selected`, if already known), cut by the shard."""
    chosen = _sharded(selected if selected is not None else await _selected(hive, inputs), inputs)
    if not chosen:
        return SideEval((), {}), None
    run = await evaluate(hive, chosen, inputs.settings)
    access = await _host_access(hive, chosen) if inputs.host_access else {}
    side = SideEval(
        tuple(sorted(chosen)),
        {
            n: SideNode(r.drv_path, r.out_path, r.error, r.detail, *access.get(n, (None, None)))
            for n, r in run.results.items()
        },
    )
    return side, run


async def _built_on_target(hive: Hive, names: Sequence[str]) -> frozenset[str]:
    """The nodes among `names` with deployment.buildOnTarget (a node whose settings do not
    evaluate counts as not: its build then fails or succeeds on its own)."""
    each = await hive.deployment_each(names)
    return frozenset(n for n, c in each.items() if isinstance(c, NodeConfig) and c.build_on_target)


# -- compute_plan -------------------------------------------------------------------------


async def compute_plan(
    hive_path: Path,
    base: str | None,
    head: str | None = None,
    *,
    selector: Selector | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    cache_dir: Path | None = None,
    flags: NixFlags | None = None,
    eval_settings: EvalSettings | None = None,
    remote: str = "origin",
    callbacks: pygit2.RemoteCallbacks | None = None,
    host_access: bool = False,
    head_hive: Hive | None = None,
    builders_from: Side = "head",
    shard: ShardSpec | None = None,
) -> Plan:
    """Work out what the change base..head does to the selected nodes (no builds).

    `hive_path` is the hive file or flake directory inside the repository's working
    tree (`hive_path_of(locate(...))`); the repository is found upwards from it.
    `head` defaults to HEAD. Raises UsageError for an unknown head, HiveError when the
    hive does not evaluate at head; a base that does not evaluate makes every node
    affected instead. With `host_access`, each node's HostAccess (how its host is
    reached) is read on both sides too (`NodeChange.base_access`, `head_access`).

    `head_hive` (`apply --changed-since`, `waggle ci` on a push): head is evaluated with
    this hive, the run's own at HEAD with the run's flags, instead of a checkout of the
    head commit; the plan keeps that evaluation (`Plan.head_evaluation`) so the run builds
    and deploys from it without evaluating again. Otherwise remote builders come from
    `flags.builders` or the `builders_from` side's meta.machinesFile (runner.gitops.builders)
    and `NodeChange.build_on_target` is read for the nodes a plan would build. With
    `shard`, only that share of the nodes is evaluated on either side (`_sharded`).
    """
    started = time.monotonic()
    repo = await asyncio.to_thread(hive_repository, hive_path)
    rel = _relative(repo, hive_path)
    head_rev = head or "HEAD"
    head_commit = await _head_commit(repo, head_rev, remote, callbacks)
    base_commit, notes, unknown = await _base_commit(repo, base, remote, callbacks)
    plan = Plan(
        hive=rel or ".",
        base_rev=base,
        head_rev=head_rev,
        base=None,
        head=str(head_commit.id),
        ignore=tuple(ignore),
        all_affected_reason=unknown,
    )
    if base_commit is not None:
        plan = await _with_changed_paths(plan, repo, base_commit, head_commit)
        if plan.skipped_reason is not None:
            return replace(plan, notes=tuple(notes), seconds=time.monotonic() - started)
    inputs = _Inputs(
        repo,
        rel,
        flags or NixFlags(),
        selector,
        eval_settings or EvalSettings(),
        cache_dir,
        host_access,
        head_hive,
        builders_from,
        shard,
    )
    sides = await _evaluate_sides(inputs, head_commit, base_commit)
    if selector is not None and not sides.head.names and not (sides.base and sides.base.names):
        raise UsageError(f"--on {selector.text!r} matches no node at head or at base")
    nodes = _compare(sides.head, sides.base)
    return replace(
        plan,
        nodes=tuple(replace(n, build_on_target=n.name in sides.on_target) for n in nodes),
        notes=(*notes, *sides.notes),
        machines_file=sides.machines_file,
        head_evaluation=sides.head_run,
        evaluations=sides.evaluations,
        base_cached=sides.base_cached,
        all_affected_reason=sides.all_affected_reason or plan.all_affected_reason,
        seconds=time.monotonic() - started,
    )


async def _head_commit(
    repo: pygit2.Repository, head_rev: str, remote: str, callbacks: pygit2.RemoteCallbacks | None
) -> pygit2.Commit:
    """The head commit, fetched when the clone lacks it; UsageError when there is none."""
    head_commit = await asyncio.to_thread(resolve, repo, head_rev)
    if head_commit is None:
        fetched_head = await asyncio.to_thread(
            ensure_commit, repo, head_rev, remote=remote, callbacks=callbacks
        )
        head_commit = fetched_head.commit
        if head_commit is None:
            raise UsageError(f"plan: --head {head_rev!r} names no commit in the repository")
    return head_commit


async def _base_commit(
    repo: pygit2.Repository,
    base: str | None,
    remote: str,
    callbacks: pygit2.RemoteCallbacks | None,
) -> tuple[pygit2.Commit | None, list[str], str | None]:
    """(the base commit, fetched when missing; the fetch's notes; why every node counts as
    affected when there is no base commit)."""
    if is_zero(base):
        reason = (
            "base commit unknown (empty or all zeros, as CI reports for a new branch): "
            "every node is treated as affected"
        )
        return None, [], reason
    assert base is not None
    fetched = await asyncio.to_thread(ensure_commit, repo, base, remote=remote, callbacks=callbacks)
    if fetched.commit is None:
        reason = (
            f"base commit {base} is not in the repository and could not be fetched: "
            "every node is treated as affected"
        )
        return None, list(fetched.notes), reason
    return fetched.commit, list(fetched.notes), None


async def _with_changed_paths(
    plan: Plan, repo: pygit2.Repository, base: pygit2.Commit, head: pygit2.Commit
) -> Plan:
    """The plan with the base, the changed paths and, when no path that counts changed, why
    nothing is evaluated (`skipped_reason`)."""
    plan = replace(plan, base=str(base.id))
    paths = await asyncio.to_thread(changed_paths, repo, base, head)
    ignored = tuple(c for c in paths if change_is_ignored(c, plan.ignore))
    plan = replace(plan, changed_paths=tuple(paths), ignored_paths=ignored)
    if paths and len(ignored) < len(paths):
        return plan
    why = (
        "base and head have the same files"
        if not paths
        else "only ignored paths changed (" + ", ".join(plan.ignore) + ")"
    )
    return replace(plan, skipped_reason=f"{why}: no node is affected, nothing was evaluated")


@dataclass(frozen=True)
class _Sides:
    head: SideEval
    base: SideEval | None  # None: no base commit, or the hive does not evaluate there
    base_cached: bool
    evaluations: int  # sides evaluated with nix
    notes: tuple[str, ...]
    all_affected_reason: str | None
    head_run: EvalRun | None = None
    machines_file: str | None = None
    on_target: frozenset[str] = frozenset()


async def _evaluate_sides(
    inputs: _Inputs, head_commit: pygit2.Commit, base_commit: pygit2.Commit | None
) -> _Sides:
    """Both sides, each from its commit's tree written to a temporary directory (head from
    `inputs.head_hive` when given)."""
    with tempfile.TemporaryDirectory(prefix="waggle-plan-") as tmp:
        head_hive = inputs.head_hive or await _head_hive(inputs, head_commit, Path(tmp, "head"))
        inputs, builders_note = await _with_builders(inputs, head_hive, base_commit, Path(tmp))
        if inputs.head_hive is None:
            head_hive = head_hive.with_flags(inputs.flags)
        selected = await _selected(head_hive, inputs)
        head_side, head_run = await _evaluate_side(head_hive, inputs, selected)
        notes = [builders_note] if builders_note else []
        if inputs.shard is not None:
            chosen = frozenset(selected)
            inputs = replace(inputs, head_chosen=chosen, head_mine=frozenset(head_side.names))
            notes.append(
                f"shard {inputs.shard} ({SHARD_RULE}): {len(head_side.names)} of {len(chosen)}"
                " nodes; other shards plan the rest"
            )
        base_side, cached = None, False
        if base_commit is not None:
            base_side, cached, base_notes = await _base_side(inputs, base_commit, Path(tmp, "base"))
            notes += base_notes
        on_target = frozenset[str]()
        if inputs.head_hive is None:
            on_target = await _built_on_target(head_hive, _to_build(head_side, base_side))
    sides = _Sides(
        head_side,
        base_side,
        cached,
        evaluations=1,
        notes=tuple(notes),
        all_affected_reason=None,
        head_run=head_run,
        machines_file=inputs.flags.machines_file,
        on_target=on_target,
    )
    if base_commit is None:
        return sides
    if base_side is None:
        reason = "the hive does not evaluate at base: every node is treated as affected"
        return replace(sides, all_affected_reason=reason)
    return replace(sides, evaluations=1 if cached else 2)


async def _head_hive(inputs: _Inputs, commit: pygit2.Commit, dest: Path) -> Hive:
    head_dir = await asyncio.to_thread(checkout_tree, inputs.repo, commit, dest)
    head_source = _source_in(head_dir, inputs.rel)
    if head_source is None:
        raise HiveError(f"plan: there is no hive at {inputs.rel or '.'} in the head commit")
    return await Hive(head_source, inputs.flags).prepared()


async def _with_builders(
    inputs: _Inputs, head_hive: Hive, base_commit: pygit2.Commit | None, tmp: Path
) -> tuple[_Inputs, str | None]:
    """`inputs` with the remote builders both sides evaluate with and the plan builds with
    (runner.gitops.builders), and the note saying which."""
    if inputs.head_hive is not None:  # the run's own hive: its flags hold the run's builders
        return inputs, None
    if inputs.flags.builders is not None:
        return inputs, "remote builders: --builders"
    if inputs.builders_from == "head":
        found = await machines_file_of(head_hive, tmp, "head")
    else:
        found = await machines_file_of(await _base_hive(inputs, base_commit, tmp), tmp, "base")
    return replace(inputs, flags=replace(inputs.flags, machines_file=found.machines_file)), (
        found.note
    )


async def _base_hive(inputs: _Inputs, commit: pygit2.Commit | None, tmp: Path) -> Hive | None:
    """The hive of the base commit (written to `tmp/base`, where `_base_side` finds it)."""
    if commit is None or not _tree_has(commit, inputs.rel):
        return None
    base_dir = await asyncio.to_thread(checkout_tree, inputs.repo, commit, tmp / "base")
    source = _source_in(base_dir, inputs.rel)
    if source is None:
        return None
    try:
        return await Hive(source, inputs.flags).prepared()
    except HiveError:
        return None


def _to_build(head: SideEval, base: SideEval | None) -> list[str]:
    """The nodes a plan builds: evaluated at head, with a drvPath the base lacks."""
    out = []
    for name in head.names:
        h = head.nodes.get(name)
        if h is None or h.error is not None or h.drv_path is None:
            continue
        b = base.nodes.get(name) if base is not None and name in base.names else None
        if b is None or b.drv_path != h.drv_path:
            out.append(name)
    return out


async def _base_side(
    inputs: _Inputs, commit: pygit2.Commit, dest: Path
) -> tuple[SideEval | None, bool, list[str]]:
    """(side or None when the hive fails at base, cache hit, notes)."""
    rel, flags, selector = inputs.rel, inputs.flags, inputs.selector
    notes: list[str] = []
    if not _tree_has(commit, rel):
        notes.append(f"there is no hive at {rel or '.'} in the base commit: every node is new")
        return SideEval((), {}), False, notes
    path: Path | None = None
    if inputs.cache_dir is not None:
        key = cache.cache_key(
            rel,
            selector.text if selector else None,
            *((f"shard {inputs.shard}", *sorted(inputs.head_mine)) if inputs.shard else ()),
            flags.impure,
            flags.options,
            flags.machines_file,
            os.environ.get("NIX_PATH", ""),
            *(("host-access",) if inputs.host_access else ()),
        )
        path = cache.cache_file(inputs.cache_dir, str(commit.tree.id), await nix.version(), key)
        hit = await asyncio.to_thread(cache.load, path)
        if hit is not None:
            notes.append(f"base evaluation read from the cache ({path.name})")
            return hit, True, notes
    base_dir = (
        dest if dest.exists() else await asyncio.to_thread(checkout_tree, inputs.repo, commit, dest)
    )
    source = _source_in(base_dir, rel)
    if source is None:
        notes.append(f"there is no hive at {rel or '.'} in the base commit: every node is new")
        return SideEval((), {}), False, notes
    try:
        side, _ = await _evaluate_side(await Hive(source, inputs.flags).prepared(), inputs)
    except HiveError as e:
        notes.append(f"base: {e.message}")
        return None, False, notes
    if path is not None and all(n.error is None for n in side.nodes.values()):
        await asyncio.to_thread(cache.store, path, side)
    return side, False, notes


def _compare(head: SideEval, base: SideEval | None) -> tuple[NodeChange, ...]:
    out: list[NodeChange] = []
    base_names = set(base.names) if base is not None else set()
    for name in sorted({*head.names, *base_names}):
        h = head.nodes.get(name) if name in head.names else None
        b = base.nodes.get(name) if base is not None and name in base_names else None
        if h is None:
            assert b is not None
            out.append(
                NodeChange(
                    name,
                    "removed",
                    "node removed",
                    base_drv=b.drv_path,
                    base_out=b.out_path,
                    base_access=b.access,
                    base_access_error=b.access_error,
                )
            )
            continue
        kind: Kind
        if base is None:
            kind, reason = "changed", "base unknown: treated as changed"
        elif b is None:
            kind, reason = "added", "new node"
        elif h.error is not None:
            kind, reason = "changed", f"does not evaluate at head: {h.error}"
        elif b.error is not None:
            kind, reason = "changed", f"did not evaluate at base ({b.error}); evaluates at head"
        elif h.drv_path != b.drv_path:
            kind, reason = "changed", "system derivation changed"
        else:
            kind, reason = "unchanged", "same system derivation"
        out.append(
            NodeChange(
                name,
                kind,
                reason,
                base_drv=b.drv_path if b else None,
                head_drv=h.drv_path,
                head_out=h.out_path,
                base_out=b.out_path if b else None,
                error=h.error,
                detail=h.detail,
                base_access=b.access if b else None,
                head_access=h.access,
                base_access_error=b.access_error if b else None,
                head_access_error=h.access_error,
            )
        )
    return tuple(out)


# -- package diff and closure size ----------------------------------------------------------

_STORE_NAME = re.compile(r"^[0-9a-z]{32}-(?P<name>.+)$")


def parse_drv_name(name: str) -> tuple[str, str]:
    """(pname, version) the way Nix's `builtins.parseDrvName` splits a name.

    The version starts after the first `-` that is followed by a character that is
    not a letter: `hello-2.12` -> (hello, 2.12), `inotify-tools-4.23.9.0` ->
    (inotify-tools, 4.23.9.0), `etc-hosts` -> (etc-hosts, "").
    """
    for i, ch in enumerate(name):
        if ch == "-" and i + 1 < len(name) and not name[i + 1].isalpha():
            return name[:i], name[i + 1 :]
    return name, ""


def store_path_name(path: str) -> str | None:
    """The name part of a store path (without hash and `.drv`), or None."""
    match = _STORE_NAME.match(Path(path).name)
    if match is None:
        return None
    return match.group("name").removesuffix(".drv")


def packages_of(drv_closure: Sequence[str]) -> dict[str, set[str]]:
    """pname -> versions of the versioned derivations in a derivation closure.

    Derivations without a version (`etc-hosts`, `unit-sshd.service`, builders'
    helper files) are left out: they are not packages a reader would look for.
    """
    out: dict[str, set[str]] = {}
    for path in drv_closure:
        if not path.endswith(".drv"):
            continue
        name = store_path_name(path)
        if name is None:
            continue
        pname, version = parse_drv_name(name)
        if version:
            out.setdefault(pname, set()).add(version)
    return out


def diff_packages(base_closure: Sequence[str], head_closure: Sequence[str]) -> PackageDiff:
    base, head = packages_of(base_closure), packages_of(head_closure)
    changed: list[PackageChange] = []
    added: list[PackageChange] = []
    removed: list[PackageChange] = []
    for pname in sorted({*base, *head}):
        old, new = base.get(pname), head.get(pname)
        if old is None and new is not None:
            added.append(PackageChange(pname, None, ", ".join(sorted(new))))
        elif new is None and old is not None:
            removed.append(PackageChange(pname, ", ".join(sorted(old)), None))
        elif old is not None and new is not None and old != new:
            changed.append(PackageChange(pname, ", ".join(sorted(old)), ", ".join(sorted(new))))
    b = {p for p in base_closure if p.endswith(".drv")}
    h = {p for p in head_closure if p.endswith(".drv")}
    return PackageDiff(
        tuple(changed), tuple(added), tuple(removed), len(b), len(h), len(b - h), len(h - b)
    )


async def package_diff(base_drv: str, head_drv: str) -> PackageDiff:
    """The package diff of two system derivations, from their derivation closures.

    Needs both `.drv` files in the local store (evaluation writes them), not the
    outputs: the base never has to be built.
    """
    base_closure, head_closure = await asyncio.gather(nix.closure(base_drv), nix.closure(head_drv))
    return diff_packages(base_closure, head_closure)


async def _closure_stats(out_path: str | None) -> tuple[int | None, int | None]:
    """(NAR size, path count) of a runtime closure when the path is valid here."""
    if out_path is None or not await nix.valid([out_path]):
        return None, None
    try:
        paths = await nix.closure(out_path)
        return await nix.closure_size(paths), len(paths)
    except NixError:
        return None, None


async def closure_delta(base_out: str | None, head_out: str | None) -> ClosureDelta:
    (hs, hp), (bs, bp) = await asyncio.gather(_closure_stats(head_out), _closure_stats(base_out))
    return ClosureDelta(hs, bs, hp, bp)


# -- builds -----------------------------------------------------------------------------------


ON_TARGET_NOTE = (
    "not built: deployment.buildOnTarget builds it on its host at deploy time "
    "(a plan never builds on or pushes to hosts)"
)


@dataclass(frozen=True)
class PlanBuildSettings:
    jobs: int = 2  # concurrent builds
    timeout: float = 3 * 3600.0
    build: bool = True  # False: --no-build (package diffs still computed)
    diff: bool = True  # package diffs and closure sizes


async def _build(change: NodeChange, flags: NixFlags, settings: PlanBuildSettings) -> NodeResult:
    assert change.head_drv is not None
    evaluated = NodeEval(change.name, change.head_drv, change.head_out, None, "", 0.0)
    return await build_node(evaluated, flags, BuildSettings(timeout=settings.timeout))


async def build_and_diff(
    plan: Plan, flags: NixFlags | None = None, settings: PlanBuildSettings | None = None
) -> Plan:
    """Build the changed and added nodes (unless `settings.build` is False) and add
    package diffs and closure sizes to the changed ones.

    Builds use the plan's remote builders (`flags.builders`, else `plan.machines_file`).
    A buildOnTarget node is not built: it is built on its host at deploy time, and a plan
    never builds on or pushes to a host (nor can it always build such a node here); its
    package diff is still computed from the derivations.
    """
    flags = flags or NixFlags()
    if plan.machines_file is not None:
        flags = replace(flags, machines_file=plan.machines_file)
    settings = settings or PlanBuildSettings()
    limit = asyncio.Semaphore(max(1, settings.jobs))

    async def one(change: NodeChange) -> NodeChange:
        if change.kind not in ("changed", "added") or change.error or change.head_drv is None:
            return change
        notes = list(change.notes)
        build = None
        if change.build_on_target:
            notes.append(ON_TARGET_NOTE)
        elif settings.build:
            async with limit:
                build = await _build(change, flags, settings)
        packages = None
        closure = None
        if settings.diff and change.base_drv is not None:
            if await nix.valid([change.base_drv]):
                try:
                    packages = await package_diff(change.base_drv, change.head_drv)
                except NixError as e:
                    notes.append(f"no package diff: {e.summary}")
            else:
                notes.append(
                    "no package diff: the base derivation is not in this store "
                    "(the base evaluation came from a cache written elsewhere)"
                )
        if settings.diff and build is not None and build.ok:
            closure = await closure_delta(change.base_out, change.head_out)
        return replace(change, build=build, packages=packages, closure=closure, notes=tuple(notes))

    nodes = await asyncio.gather(*(one(n) for n in plan.nodes))
    return replace(plan, nodes=tuple(nodes))
