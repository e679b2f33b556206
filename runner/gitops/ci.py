"""The CI service Waggle runs in: which one, what event, and what to compare.

`detect(env)` reads GitHub Actions, GitLab CI or Drone variables (for GitHub also the event
JSON at `GITHUB_EVENT_PATH`) into a `CiContext`; `mode(ctx, config)` says what `waggle ci`
does with it:

- a pull/merge request: `plan` (evaluate, build changed nodes, optionally dry-activate;
  never switch);
- a push to a deploy branch (`deploy_branches`, default the repository's default branch):
  `deploy` (affected and drifted nodes);
- anything else (tags, schedules, manual runs, other branches, no CI): `build`.

`base` and `head` are the commits to diff. `base` is None when the CI does not know it (a
push that created the branch has an all-zero "before"; GitLab gives no "before" for manual
or scheduled pipelines); `base_reason` then says why, and the caller treats every node as
affected. On a GitHub pull request `head` is `GITHUB_SHA`, the test merge commit that is
checked out; `pr_head` is the PR branch's own commit.

`write_outputs` publishes step outputs (`$GITHUB_OUTPUT`, or a GitLab dotenv file), and
`annotations` renders GitHub workflow commands for failed nodes.
"""

# No `from __future__ import annotations`: this module defines a function of that name.
import fnmatch
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from runner.errors import UsageError
from runner.github import ANNOTATION_LIMIT, AnnotationKind, annotation
from runner.gitops.config import CiConfig
from runner.results import RunSummary
from runner.shard import ShardSpec, parse_shard

Provider = Literal["github", "gitlab", "drone", "none"]
EventKind = Literal["pull_request", "push", "other"]
Mode = Literal["plan", "deploy", "build"]
Forge = Literal["github", "gitlab"]
_ZERO_SHA = re.compile(r"^0+$")


@dataclass(frozen=True)
class CiContext:
    provider: Provider
    event: EventKind
    event_name: str = ""  # the provider's own name: "pull_request", "merge_request_event", ...
    base: str | None = None  # commit to diff against; None: unknown (see base_reason)
    base_reason: str = ""  # why base is None; "" when it is known
    head: str | None = None  # the checked-out commit to evaluate and build
    pr_head: str | None = None  # pull request: the source branch's commit
    branch: str | None = None  # push: the pushed branch; PR: the source branch
    target_branch: str | None = None  # PR: the branch it merges into
    default_branch: str | None = None
    number: int | None = None  # PR number / MR iid
    repository: str | None = None  # "owner/name" (GitLab: the project path)
    project_id: str | None = None  # GitLab: the project the MR belongs to (for the API)
    api_url: str | None = None  # forge REST API root, e.g. https://api.github.com
    server_url: str | None = None  # forge web root, e.g. https://github.com
    forge: Forge | None = None  # whose API `api_url` is (Drone: GitHub only, else None)
    fork: bool = False  # PR from another repository: deploy credentials are never used
    job_url: str | None = None

    @property
    def is_pull_request(self) -> bool:
        return self.event == "pull_request"


def detect(env: Mapping[str, str]) -> CiContext:
    """The CI context described by the environment `env` (e.g. `os.environ`)."""
    if env.get("GITHUB_ACTIONS") == "true":
        return _github(env)
    if env.get("GITLAB_CI") == "true":
        return _gitlab(env)
    if env.get("DRONE") == "true":
        return _drone(env)
    return CiContext("none", "other", base_reason="not running in a known CI service")


def _get(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _sha(value: object) -> str | None:
    """A commit id, or None for missing, empty or all-zero ids."""
    if not isinstance(value, str) or not value.strip() or _ZERO_SHA.match(value.strip()):
        return None
    return value.strip()


def _base(value: object, what: str) -> tuple[str | None, str]:
    sha = _sha(value)
    if sha is not None:
        return sha, ""
    if isinstance(value, str) and value.strip():
        return None, f"{what} is all zeros (new branch, or no previous commit known)"
    return None, f"{what} is not set"


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# -- GitHub Actions ---------------------------------------------------------------------


def _event_payload(env: Mapping[str, str]) -> dict[str, Any]:
    path = env.get("GITHUB_EVENT_PATH", "")
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"GITHUB_EVENT_PATH {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"GITHUB_EVENT_PATH {path}: cannot read the event JSON: {e}") from None
    return _dict(data)


def _github(env: Mapping[str, str]) -> CiContext:
    name = env.get("GITHUB_EVENT_NAME", "")
    payload = _event_payload(env)
    repository = _get(env, "GITHUB_REPOSITORY")
    server = _get(env, "GITHUB_SERVER_URL") or "https://github.com"
    run_id = _get(env, "GITHUB_RUN_ID")
    common: dict[str, Any] = {
        "event_name": name,
        "head": _get(env, "GITHUB_SHA"),
        "default_branch": _dict(payload.get("repository")).get("default_branch") or None,
        "repository": repository,
        "api_url": _get(env, "GITHUB_API_URL") or "https://api.github.com",
        "server_url": server,
        "forge": "github",
        "job_url": f"{server}/{repository}/actions/runs/{run_id}"
        if repository and run_id
        else None,
    }
    if name in ("pull_request", "pull_request_target"):
        pr = _dict(payload.get("pull_request"))
        base_info, head_info = _dict(pr.get("base")), _dict(pr.get("head"))
        base, reason = _base(base_info.get("sha"), "the event's pull_request.base.sha")
        return CiContext(
            "github",
            "pull_request",
            base=base,
            base_reason=reason,
            pr_head=_sha(head_info.get("sha")),
            branch=_get(env, "GITHUB_HEAD_REF") or head_info.get("ref") or None,
            target_branch=_get(env, "GITHUB_BASE_REF") or base_info.get("ref") or None,
            number=_int(pr.get("number")) or _int(payload.get("number")),
            fork=_github_fork(pr, repository),
            **common,
        )
    if name == "push":
        ref = _get(env, "GITHUB_REF") or str(payload.get("ref") or "")
        base, reason = _base(payload.get("before"), "the push event's 'before'")
        if payload.get("created") is True and base is None:
            reason = "the push created the branch ('before' is all zeros)"
        if payload.get("deleted") is True:
            base, reason = None, "the push deleted the branch"
        branch = _get(env, "GITHUB_REF_NAME") if ref.startswith("refs/heads/") or not ref else None
        return CiContext(
            "github",
            "push" if branch else "other",  # a pushed tag is not a branch push
            base=base,
            base_reason=reason,
            branch=branch,
            **{**common, "head": _get(env, "GITHUB_SHA") or _sha(payload.get("after"))},
        )
    return CiContext(
        "github",
        "other",
        base_reason=f"event {name or '(unknown)'} has no base commit",
        branch=_get(env, "GITHUB_REF_NAME")
        if (env.get("GITHUB_REF_TYPE") or "branch") == "branch"
        else None,
        **common,
    )


def _github_fork(pr: Mapping[str, Any], repository: str | None) -> bool:
    """Whether the PR comes from another repository (then it gets no secrets anyway).
    A deleted head repository counts as a fork."""
    head_repo = pr.get("head", {}).get("repo") if isinstance(pr.get("head"), dict) else None
    if not isinstance(head_repo, dict):
        return True
    head_name = head_repo.get("full_name")
    base_repo = _dict(_dict(pr.get("base")).get("repo"))
    base_name = base_repo.get("full_name") or repository
    if isinstance(head_name, str) and head_name and base_name:
        return head_name.lower() != str(base_name).lower()
    return bool(head_repo.get("fork", True))


# -- GitLab CI ----------------------------------------------------------------------------


def _gitlab(env: Mapping[str, str]) -> CiContext:
    source = env.get("CI_PIPELINE_SOURCE", "")
    common: dict[str, Any] = {
        "event_name": source,
        "head": _get(env, "CI_COMMIT_SHA"),
        "default_branch": _get(env, "CI_DEFAULT_BRANCH"),
        "repository": _get(env, "CI_PROJECT_PATH"),
        "api_url": _get(env, "CI_API_V4_URL"),
        "server_url": _get(env, "CI_SERVER_URL"),
        "forge": "gitlab",
        "job_url": _get(env, "CI_JOB_URL"),
    }
    if source == "merge_request_event" or _get(env, "CI_MERGE_REQUEST_IID"):
        # Merged-results pipelines check out the merge of source and target: diff it
        # against the target branch's commit. Otherwise CI_COMMIT_SHA is the source head:
        # diff it against the merge base.
        target_sha = _sha(env.get("CI_MERGE_REQUEST_TARGET_BRANCH_SHA"))
        base: str | None
        if target_sha is not None:
            base, reason = target_sha, ""
        else:
            base, reason = _base(
                env.get("CI_MERGE_REQUEST_DIFF_BASE_SHA"), "CI_MERGE_REQUEST_DIFF_BASE_SHA"
            )
        mr_project = _get(env, "CI_MERGE_REQUEST_PROJECT_ID", "CI_PROJECT_ID")
        source_project = _get(env, "CI_MERGE_REQUEST_SOURCE_PROJECT_ID")
        return CiContext(
            "gitlab",
            "pull_request",
            base=base,
            base_reason=reason,
            pr_head=_sha(env.get("CI_MERGE_REQUEST_SOURCE_BRANCH_SHA")),
            branch=_get(env, "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME"),
            target_branch=_get(env, "CI_MERGE_REQUEST_TARGET_BRANCH_NAME"),
            number=_int(env.get("CI_MERGE_REQUEST_IID")),
            project_id=mr_project,
            fork=source_project is not None and source_project != mr_project,
            **common,
        )
    branch = _get(env, "CI_COMMIT_BRANCH")
    if source == "push" and branch:
        base, reason = _base(env.get("CI_COMMIT_BEFORE_SHA"), "CI_COMMIT_BEFORE_SHA")
        return CiContext(
            "gitlab",
            "push",
            base=base,
            base_reason=reason,
            branch=branch,
            project_id=_get(env, "CI_PROJECT_ID"),
            **common,
        )
    return CiContext(
        "gitlab",
        "other",
        base_reason=f"pipeline source {source or '(unknown)'} has no base commit",
        branch=branch,
        project_id=_get(env, "CI_PROJECT_ID"),
        **common,
    )


# -- Drone --------------------------------------------------------------------------------


def _drone(env: Mapping[str, str]) -> CiContext:
    name = env.get("DRONE_BUILD_EVENT", "")
    link = _get(env, "DRONE_REPO_LINK") or ""
    parts = urlsplit(link)
    server = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None
    github = parts.netloc.lower() == "github.com"
    repository = _get(env, "DRONE_REPO")
    common: dict[str, Any] = {
        "event_name": name,
        "head": _get(env, "DRONE_COMMIT_SHA", "DRONE_COMMIT_AFTER"),
        "default_branch": _get(env, "DRONE_REPO_BRANCH"),
        "repository": repository,
        "api_url": "https://api.github.com" if github else None,
        "server_url": server,
        "forge": "github" if github else None,
        "job_url": _get(env, "DRONE_BUILD_LINK"),
    }
    if name == "pull_request":
        # Current Drone sets DRONE_COMMIT_BEFORE to the PR's base commit; older versions
        # left it empty. Drone names no fork, so a PR counts as one unless the source
        # repository is known to be this repository.
        base, reason = _base(env.get("DRONE_COMMIT_BEFORE"), "DRONE_COMMIT_BEFORE")
        source_repo = _get(env, "DRONE_SOURCE_REPO")
        return CiContext(
            "drone",
            "pull_request",
            base=base,
            base_reason=reason,
            pr_head=common["head"],
            branch=_get(env, "DRONE_SOURCE_BRANCH"),
            target_branch=_get(env, "DRONE_TARGET_BRANCH", "DRONE_BRANCH"),
            number=_int(env.get("DRONE_PULL_REQUEST")),
            fork=not (source_repo and repository and source_repo.lower() == repository.lower()),
            **common,
        )
    if name == "push":
        base, reason = _base(env.get("DRONE_COMMIT_BEFORE"), "DRONE_COMMIT_BEFORE")
        return CiContext(
            "drone",
            "push",
            base=base,
            base_reason=reason,
            branch=_get(env, "DRONE_BRANCH", "DRONE_COMMIT_BRANCH"),
            **common,
        )
    return CiContext(
        "drone",
        "other",
        base_reason=f"event {name or '(unknown)'} has no base commit",
        branch=_get(env, "DRONE_BRANCH", "DRONE_COMMIT_BRANCH") if name != "tag" else None,
        **common,
    )


# -- shards -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CiShard:
    spec: ShardSpec
    source: str  # the variables it came from, for the mode line


def shard_from_env(env: Mapping[str, str]) -> CiShard | None:
    """The share of the nodes this job takes (`--shard` wins over it): `WAGGLE_SHARD`
    ("K/N", set per job from GitHub's `strategy.matrix` or per Drone step), else, on
    GitLab, `parallel:`'s CI_NODE_INDEX (1-based) of CI_NODE_TOTAL. None: not sharded."""
    text = env.get("WAGGLE_SHARD", "").strip()
    if text:
        return CiShard(parse_shard(text, "WAGGLE_SHARD"), "WAGGLE_SHARD")
    index = env.get("CI_NODE_INDEX", "").strip()
    if env.get("GITLAB_CI") == "true" and index:
        what = "CI_NODE_INDEX/CI_NODE_TOTAL"
        total = env.get("CI_NODE_TOTAL", "").strip()
        return CiShard(parse_shard(f"{index}/{total}", what), what)
    return None


# -- what to do -------------------------------------------------------------------------


def deploy_branches(ctx: CiContext, config: CiConfig) -> tuple[str, ...]:
    """The branch names or globs whose pushes deploy: the setting, else the default branch."""
    if config.deploy_branches is not None:
        return config.deploy_branches
    return (ctx.default_branch,) if ctx.default_branch else ()


def mode(ctx: CiContext, config: CiConfig) -> Mode:
    """plan for pull/merge requests, deploy for pushes to a deploy branch, else build."""
    if ctx.event == "pull_request":
        return "plan"
    deploying = ctx.event == "push" and ctx.branch is not None and not ctx.fork
    if deploying and any(
        fnmatch.fnmatchcase(ctx.branch or "", p) for p in deploy_branches(ctx, config)
    ):
        return "deploy"
    return "build"


def mode_reason(ctx: CiContext, config: CiConfig) -> str:
    """One line for the log and the report: why `mode` chose what it chose."""
    chosen = mode(ctx, config)
    where = "" if ctx.provider == "none" else f"{ctx.provider} "
    if chosen == "plan":
        return f"{where}pull request #{ctx.number}: plan only, nothing is activated"
    branches = ", ".join(deploy_branches(ctx, config)) or "(none: default branch unknown)"
    if chosen == "deploy":
        return f"{where}push to {ctx.branch} (deploy branches: {branches}): deploy"
    if ctx.event == "push":
        return f"{where}push to {ctx.branch}, not a deploy branch ({branches}): build only"
    if ctx.provider == "none":
        return "no CI service detected: build only"
    return f"{where}event {ctx.event_name or '(unknown)'}: build only"


# -- outputs ----------------------------------------------------------------------------

_OUTPUT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def node_outputs(
    mode_: Mode, affected: Sequence[str], deployed: Sequence[str], failed: Sequence[str]
) -> dict[str, str]:
    """The step outputs of `waggle ci`: node lists comma-separated (the `--on` syntax)."""
    return {
        "mode": mode_,
        "affected-nodes": ",".join(affected),
        "deployed": ",".join(deployed),
        "failed": ",".join(failed),
    }


def format_github_output(name: str, value: str) -> str:
    """One `$GITHUB_OUTPUT` entry: `name=value`, or the heredoc form for multi-line
    values (with a random delimiter that is not in the value)."""
    if not _OUTPUT_NAME.match(name):
        raise ValueError(f"output name {name!r}: letters, digits, '_' and '-' only")
    if "\n" not in value and "\r" not in value:
        return f"{name}={value}\n"
    while True:
        delimiter = f"ghadelimiter_{uuid.uuid4()}"
        if delimiter not in value:
            return f"{name}<<{delimiter}\n{value}\n{delimiter}\n"


def _dotenv_name(name: str) -> str:
    return "WAGGLE_" + re.sub(r"[^A-Za-z0-9_]", "_", name).upper()


def write_outputs(
    ctx: CiContext,
    outputs: Mapping[str, str],
    env: Mapping[str, str],
    *,
    dotenv: Path | None = None,
) -> Path | None:
    """Publish `outputs`: GitHub appends them to `$GITHUB_OUTPUT`; GitLab writes a dotenv
    file (`dotenv`, from `outputs_dotenv`) with names like `WAGGLE_AFFECTED_NODES` and
    values on one line. Returns the file written, or None if the CI has no outputs."""
    if ctx.provider == "github":
        target = env.get("GITHUB_OUTPUT", "")
        if not target:
            return None
        path = Path(target)
        text = "".join(format_github_output(k, v) for k, v in outputs.items())
        with path.open("a", encoding="utf-8", newline="") as f:
            f.write(text)
        return path
    if ctx.provider == "gitlab" and dotenv is not None:
        lines = []
        for name, value in outputs.items():
            if not _OUTPUT_NAME.match(name):
                raise ValueError(f"output name {name!r}: letters, digits, '_' and '-' only")
            flat = " ".join(value.split()) if "\n" in value or "\r" in value else value
            lines.append(f"{_dotenv_name(name)}={flat}\n")
        dotenv.parent.mkdir(parents=True, exist_ok=True)
        dotenv.write_text("".join(lines), encoding="utf-8", newline="")
        return dotenv
    return None


# -- annotations ------------------------------------------------------------------------


def annotations(
    failed: Sequence[tuple[str, str]],
    provider: Provider,
    limit: int = ANNOTATION_LIMIT,
    *,
    kind: AnnotationKind = "error",
) -> list[str]:
    """GitHub workflow commands (`::error title=...::message`) for failed nodes, at most
    `limit`: past it, the last one says how many more failed (the step summary lists all).
    Other CI services have no annotations: []."""
    if provider != "github" or not failed or limit <= 0:
        return []
    shown = list(failed) if len(failed) <= limit else list(failed[: limit - 1])
    lines = [annotation(kind, f"waggle: {node} failed", message) for node, message in shown]
    more = len(failed) - len(shown)
    if more:
        names = ", ".join(node for node, _ in failed[len(shown) :])
        lines.append(
            annotation(kind, f"waggle: {more} more nodes failed", names + " (see the step summary)")
        )
    return lines


def failed_nodes(summary: RunSummary) -> list[tuple[str, str]]:
    """(node, "stage failed: message") for each failed node of a run, for `annotations`."""
    out = []
    for node in summary.failed:
        failure = node.failure
        if failure is None:
            out.append((node.name, "failed"))
        else:
            text = f"{failure.stage} failed: {failure.message}" if failure.message else ""
            out.append((node.name, text or f"{failure.stage} failed"))
    return out
