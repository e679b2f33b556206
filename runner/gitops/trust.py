"""What a pull request can reach through `waggle ci`.

The plan job of a pull request evaluates and builds code the PR controls: its hive, its
modules and its `waggle.yaml`. That is the point of a plan, and Nix builds run sandboxed.
Anything that widens what the job does beyond that, on the runner or on the hosts, is taken
from the base commit (already on the target branch), never from the PR:

- `waggle.yaml` (`pr_config`): read from the base commit's tree, the whole file, so a PR
  cannot switch on `dry_activate_on_pr` or `comment_forks`, pick `token_env`, point
  `hive`, `on`, `cache_dir` or the report paths elsewhere, or change `deploy_branches`.
  The PR's own copy is still checked (an error in it is an error, exit 2) and the plan
  says when the PR changes it: the change takes effect once merged.
- dry activation at all (`dry_activation_policy`): only when the base's settings turn it
  on, never for a PR from a fork (or a CI that cannot tell), and only for a PR into a
  deploy branch.
- per node (`decide_dry_activation`): the host is reached with the base evaluation's
  `targetHost`, `targetPort`, `targetUser`, `sshOptions` and `privilegeEscalationCommand`
  (`HostAccess`); a node whose HostAccess the PR changes, a new node, and a node whose
  settings do not evaluate on both sides are not dry-activated, and the plan says why.
- the dry activation itself (`dry_activation_config`): no keys are uploaded (no
  keyCommand runs on the runner), nothing is built on a target host, no profile is set.
- the job's credentials (`withhold_secrets`): forge tokens are read once, then removed from
  the environment the PR's hive is evaluated in (`builtins.getEnv` sees none of them).

Command-line flags and the CI's own variables come from the pipeline definition and the
runner, which Waggle trusts: a pipeline that a PR can edit and that holds the deploy key
is beyond what any tool in it can protect (see ci-templates/README.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path

import pygit2
from pygit2.enums import FileMode

from runner.gitops.changes import ensure_commit, is_zero, open_repo
from runner.gitops.ci import CiContext, deploy_branches
from runner.gitops.config import CONFIG_NAME, CiConfig, ConfigError, load_config, parse_config
from runner.gitops.plan import DryActivation, DryActivationPolicy, NodeChange, Plan
from runner.hive.model import NodeConfig

# Credentials the CI hands a job and Waggle knows by name: forge API tokens (the comment's),
# GitHub's OIDC and runtime tokens, the watcher's git token. A legacy hive is evaluated
# impurely, so `builtins.getEnv` would hand them to the pull request's code (and a `throw`
# would print them into the plan and the PR comment).
SECRET_ENV: tuple[str, ...] = (
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "WAGGLE_GITLAB_TOKEN",
    "GITLAB_TOKEN",
    "CI_JOB_TOKEN",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    "ACTIONS_RUNTIME_TOKEN",
    "WAGGLE_GIT_TOKEN",
)


def withhold_secrets(env: MutableMapping[str, str], token_env: str | None = None) -> list[str]:
    """Remove the known credential variables (and `token_env`) from `env`, normally
    `os.environ` before a pull request's code is evaluated; returns the names removed."""
    names = [*SECRET_ENV, *((token_env,) if token_env else ())]
    return [name for name in names if env.pop(name, None) is not None]


@dataclass(frozen=True)
class PrSettings:
    """The settings of a pull request's run, and what the plan should say about them."""

    config: CiConfig
    notes: tuple[str, ...] = ()
    from_base: bool = False  # read from the base commit (False: defaults or a file outside)


def _candidates(root: Path, path: Path | None, search_from: Path) -> list[str] | None:
    """The repository-relative paths where waggle.yaml may be, first match wins; None when
    `path` is a file outside the repository (the runner's, not the PR's)."""
    if path is not None:
        full = path if path.is_absolute() else search_from / path
        full = full.resolve()
        if not full.is_relative_to(root):
            return None
        return [full.relative_to(root).as_posix()]
    start = search_from.resolve()
    if not start.is_relative_to(root):
        return [CONFIG_NAME]
    out = []
    for directory in (start, *start.parents):
        rel = directory.relative_to(root).as_posix()
        out.append(CONFIG_NAME if rel == "." else f"{rel}/{CONFIG_NAME}")
        if directory == root:
            break
    return out


def _entry(commit: pygit2.Commit | None, rels: list[str]) -> tuple[str, pygit2.Object] | None:
    if commit is None:
        return None
    for rel in rels:
        try:
            return rel, commit.tree[rel]
        except KeyError:
            continue
    return None


def _read(root: Path, found: tuple[str, pygit2.Object], where: str) -> CiConfig:
    rel, obj = found
    if not isinstance(obj, pygit2.Blob) or obj.filemode not in (
        FileMode.BLOB,
        FileMode.BLOB_EXECUTABLE,
    ):
        kind = "a symbolic link" if obj.filemode == FileMode.LINK else "not a file"
        raise ConfigError(f"{rel} {where} is {kind}: waggle.yaml must be a regular file")
    try:
        text = obj.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{rel} {where}: cannot read: {e}") from None
    return parse_config(text, source=root / rel, where=f"{rel} {where}")


def pr_config(
    path: Path | None,
    *,
    search_from: Path,
    base: str | None,
    remote: str = "origin",
) -> PrSettings:
    """The waggle.yaml settings of a pull request's run: the base commit's (see the module
    doc). `path` is `--ci-config` (a file outside the repository is the runner's and used
    as it is); `base` the PR's base commit (fetched when a shallow clone lacks it)."""
    repo = open_repo(search_from)
    if repo.workdir is None:
        raise ConfigError(f"{search_from}: the repository is bare; waggle ci needs a checkout")
    root = Path(repo.workdir).resolve()
    rels = _candidates(root, path, search_from)
    if rels is None:
        assert path is not None
        return PrSettings(load_config(path, search_from=search_from))
    head = None if repo.head_is_unborn else repo.head.peel(pygit2.Commit)
    head_found = _entry(head, rels)
    if head_found is not None:
        _read(root, head_found, "in this pull request")  # errors show before the merge
    base_commit = None if is_zero(base) else ensure_commit(repo, base or "", remote=remote).commit
    if base_commit is None:
        return PrSettings(
            CiConfig(),
            (
                (
                    f"{CONFIG_NAME} is not read: the base commit is unknown, so the defaults "
                    "apply (no dry activation, no comment)"
                ),
            ),
        )
    short = str(base_commit.id)[:12]
    base_found = _entry(base_commit, rels)
    config = _read(root, base_found, f"in the base commit {short}") if base_found else CiConfig()
    notes: list[str] = []
    base_id = base_found[1].id if base_found else None
    head_id = head_found[1].id if head_found else None
    if base_id != head_id:
        changed = (head_found or base_found or (rels[0], None))[0]
        notes.append(
            f"this pull request changes {changed}: its settings take effect once merged; "
            f"this run uses the base commit's ({short})"
        )
    return PrSettings(config, tuple(notes), from_base=True)


def dry_activation_policy(ctx: CiContext, settings: PrSettings) -> DryActivationPolicy:
    """Whether this pull request's plan may dry-activate at all (`settings` from
    `pr_config`, command-line flags merged in)."""
    config = settings.config
    where = "the base commit's settings" if settings.from_base else "this run's settings"
    if not config.dry_activate_on_pr:
        return DryActivationPolicy(
            False, f"No dry activation: dry_activate_on_pr is off in {where}"
        )
    if ctx.fork:
        return DryActivationPolicy(
            False,
            "No dry activation: the pull request comes from a fork (or the CI cannot tell), "
            "and forks never reach the hosts",
        )
    branches = deploy_branches(ctx, config)
    target = ctx.target_branch
    if target is None or not any(fnmatch.fnmatchcase(target, p) for p in branches):
        shown = ", ".join(branches) or "none known"
        return DryActivationPolicy(
            False,
            f"No dry activation: the pull request targets {target or 'an unknown branch'}, "
            f"not a deploy branch ({shown})",
        )
    return DryActivationPolicy(
        True,
        f"Dry activation is on in {where}: each changed node is dry-activated with the base "
        "commit's connection settings and without keys; nothing is switched",
    )


def _node_decision(n: NodeChange) -> DryActivation:
    if n.kind == "added":
        return DryActivation(
            False, "not dry-activated: a new node has no connection settings at base"
        )
    if n.base_access is None:
        why = n.base_access_error or "unknown"
        return DryActivation(False, f"not dry-activated: its connection settings at base: {why}")
    if n.head_access is None:
        why = n.head_access_error or "unknown"
        return DryActivation(False, f"not dry-activated: its connection settings: {why}")
    changed = n.base_access.differences(n.head_access)
    if changed:
        names = ", ".join(f"deployment.{o}" for o in changed)
        return DryActivation(
            False,
            f"not dry-activated: this pull request changes {names} (how the host is reached "
            "comes only from the base)",
        )
    if n.base_access.target_host is None:
        return DryActivation(False, "not dry-activated: no deployment.targetHost")
    return DryActivation(True, "dry-activate, reached with the base commit's connection settings")


def decide_dry_activation(plan: Plan, policy: DryActivationPolicy) -> Plan:
    """The plan with its dry-activation policy and, when enabled, each changed or added
    node's decision (the plan must come from `compute_plan(host_access=True)`)."""
    if policy.enabled and not plan.ok:
        policy = DryActivationPolicy(False, "No dry activation: the plan has failed nodes")
    if policy.enabled and not any(n.kind in ("changed", "added") for n in plan.nodes):
        policy = DryActivationPolicy(False, "No dry activation: no node changes")
    if not policy.enabled:
        return replace(plan, dry_activation=policy)
    nodes = tuple(
        replace(n, dry_activate=_node_decision(n)) if n.kind in ("changed", "added") else n
        for n in plan.nodes
    )
    return replace(plan, nodes=nodes, dry_activation=policy)


def dry_activation_config(n: NodeChange) -> NodeConfig:
    """The deployment settings a planned node is dry-activated with: the base's HostAccess,
    no keys, no build on the target, nothing from the PR."""
    access = n.base_access
    if access is None or not n.dry_activate_planned:
        raise ValueError(f"node {n.name} is not planned for dry activation")
    return NodeConfig(
        name=n.name,
        target_host=access.target_host,
        target_port=access.target_port,
        target_user=access.target_user,
        allow_local_deployment=False,
        build_on_target=False,
        tags=(),
        keys=(),
        replace_unknown_profiles=True,  # dry-activate never touches a profile
        privilege_escalation_command=access.privilege_escalation_command,
        ssh_options=access.ssh_options,
    )
