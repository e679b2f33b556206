"""CI detection, mode selection, step outputs and annotations (runner.gitops.ci)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from runner.errors import UsageError
from runner.gitops import ci
from runner.gitops.ci import (
    CiContext,
    detect,
    failed_nodes,
    format_github_output,
    mode,
    mode_reason,
    node_outputs,
    write_outputs,
)
from runner.gitops.config import CiConfig
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status
from runner.shard import ShardSpec

BASE = "a" * 40
HEAD = "b" * 40
MERGE = "c" * 40
ZERO = "0" * 40


def github_env(tmp_path: Path, event_name: str, payload: Mapping[str, object], **extra: str):
    event = tmp_path / "event.json"
    event.write_text(json.dumps(payload))
    env = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_EVENT_NAME": event_name,
        "GITHUB_EVENT_PATH": str(event),
        "GITHUB_REPOSITORY": "acme/fleet",
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_API_URL": "https://api.github.com",
        "GITHUB_RUN_ID": "42",
    }
    env.update(extra)
    return env


def pr_payload(*, head_repo: str | None = "acme/fleet", fork: bool = False):
    repo = None if head_repo is None else {"full_name": head_repo, "fork": fork}
    return {
        "number": 7,
        "pull_request": {
            "number": 7,
            "base": {"sha": BASE, "ref": "main", "repo": {"full_name": "acme/fleet"}},
            "head": {"sha": HEAD, "ref": "feature", "repo": repo},
        },
        "repository": {"default_branch": "main"},
    }


# -- detection ----------------------------------------------------------------------------


def test_github_pull_request(tmp_path):
    env = github_env(
        tmp_path,
        "pull_request",
        pr_payload(),
        GITHUB_SHA=MERGE,
        GITHUB_REF_NAME="7/merge",
        GITHUB_HEAD_REF="feature",
        GITHUB_BASE_REF="main",
    )
    ctx = detect(env)
    assert ctx == CiContext(
        provider="github",
        event="pull_request",
        event_name="pull_request",
        base=BASE,
        head=MERGE,
        pr_head=HEAD,
        branch="feature",
        target_branch="main",
        default_branch="main",
        number=7,
        repository="acme/fleet",
        api_url="https://api.github.com",
        server_url="https://github.com",
        forge="github",
        fork=False,
        job_url="https://github.com/acme/fleet/actions/runs/42",
    )
    assert mode(ctx, CiConfig()) == "plan"


@pytest.mark.parametrize(
    ("head_repo", "fork_flag", "expected"),
    [
        ("someone/fleet", True, True),  # a fork
        ("acme/fleet", True, False),  # same repository (which itself is a fork)
        (None, False, True),  # the fork was deleted
    ],
)
def test_github_pull_request_fork(tmp_path, head_repo, fork_flag, expected):
    env = github_env(tmp_path, "pull_request", pr_payload(head_repo=head_repo, fork=fork_flag))
    assert detect(env).fork is expected


def test_github_push(tmp_path):
    payload = {"before": BASE, "after": HEAD, "repository": {"default_branch": "main"}}
    env = github_env(
        tmp_path,
        "push",
        payload,
        GITHUB_SHA=HEAD,
        GITHUB_REF="refs/heads/main",
        GITHUB_REF_NAME="main",
    )
    ctx = detect(env)
    assert (ctx.provider, ctx.event, ctx.base, ctx.head, ctx.branch) == (
        "github",
        "push",
        BASE,
        HEAD,
        "main",
    )
    assert ctx.base_reason == ""
    assert ctx.default_branch == "main"
    assert mode(ctx, CiConfig()) == "deploy"


def test_github_push_new_branch_has_no_base(tmp_path):
    payload = {"before": ZERO, "after": HEAD, "created": True, "repository": {}}
    env = github_env(
        tmp_path,
        "push",
        payload,
        GITHUB_SHA=HEAD,
        GITHUB_REF="refs/heads/topic",
        GITHUB_REF_NAME="topic",
    )
    ctx = detect(env)
    assert ctx.event == "push"
    assert ctx.base is None
    assert "created the branch" in ctx.base_reason
    assert ctx.default_branch is None
    # without a known default branch nothing deploys, unless configured
    assert mode(ctx, CiConfig()) == "build"
    assert mode(ctx, CiConfig(deploy_branches=("topic",))) == "deploy"


def test_github_push_of_a_tag_is_not_a_branch_push(tmp_path):
    payload = {"before": ZERO, "after": HEAD, "repository": {"default_branch": "main"}}
    env = github_env(tmp_path, "push", payload, GITHUB_REF="refs/tags/v1", GITHUB_REF_NAME="v1")
    ctx = detect(env)
    assert ctx.event == "other"
    assert mode(ctx, CiConfig(deploy_branches=("*",))) == "build"


def test_github_other_event(tmp_path):
    env = github_env(
        tmp_path,
        "workflow_dispatch",
        {"repository": {"default_branch": "main"}},
        GITHUB_SHA=HEAD,
        GITHUB_REF_NAME="main",
    )
    ctx = detect(env)
    assert (ctx.event, ctx.base, ctx.branch) == ("other", None, "main")
    assert "workflow_dispatch" in ctx.base_reason
    assert mode(ctx, CiConfig()) == "build"


def test_github_event_file_missing(tmp_path):
    env = github_env(tmp_path, "push", {})
    env["GITHUB_EVENT_PATH"] = str(tmp_path / "nope.json")
    with pytest.raises(UsageError, match="GITHUB_EVENT_PATH"):
        detect(env)


def test_github_event_file_not_json(tmp_path):
    env = github_env(tmp_path, "push", {})
    Path(env["GITHUB_EVENT_PATH"]).write_text("{not json")
    with pytest.raises(UsageError, match="event JSON"):
        detect(env)


GITLAB = {
    "GITLAB_CI": "true",
    "CI_COMMIT_SHA": HEAD,
    "CI_DEFAULT_BRANCH": "main",
    "CI_PROJECT_ID": "12",
    "CI_PROJECT_PATH": "acme/fleet",
    "CI_API_V4_URL": "https://gitlab.example/api/v4",
    "CI_SERVER_URL": "https://gitlab.example",
    "CI_JOB_URL": "https://gitlab.example/acme/fleet/-/jobs/9",
}


def test_gitlab_merge_request():
    env = {
        **GITLAB,
        "CI_PIPELINE_SOURCE": "merge_request_event",
        "CI_MERGE_REQUEST_IID": "5",
        "CI_MERGE_REQUEST_DIFF_BASE_SHA": BASE,
        "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME": "feature",
        "CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "main",
        "CI_MERGE_REQUEST_PROJECT_ID": "12",
        "CI_MERGE_REQUEST_SOURCE_PROJECT_ID": "12",
        "CI_COMMIT_BEFORE_SHA": ZERO,
    }
    ctx = detect(env)
    assert (ctx.provider, ctx.event, ctx.base, ctx.head, ctx.number) == (
        "gitlab",
        "pull_request",
        BASE,
        HEAD,
        5,
    )
    assert (ctx.branch, ctx.target_branch, ctx.project_id, ctx.fork) == (
        "feature",
        "main",
        "12",
        False,
    )
    assert ctx.forge == "gitlab"
    assert ctx.job_url == GITLAB["CI_JOB_URL"]
    assert mode(ctx, CiConfig()) == "plan"
    # merged-results pipeline: the target branch commit is the base
    merged = detect({**env, "CI_MERGE_REQUEST_TARGET_BRANCH_SHA": MERGE})
    assert merged.base == MERGE
    # from a fork: the source project differs from the MR's project
    fork = detect({**env, "CI_MERGE_REQUEST_SOURCE_PROJECT_ID": "99"})
    assert fork.fork is True
    assert fork.project_id == "12"


def test_gitlab_push_and_zero_before():
    env = {
        **GITLAB,
        "CI_PIPELINE_SOURCE": "push",
        "CI_COMMIT_BRANCH": "main",
        "CI_COMMIT_BEFORE_SHA": BASE,
    }
    ctx = detect(env)
    assert (ctx.event, ctx.base, ctx.branch, ctx.default_branch) == ("push", BASE, "main", "main")
    assert mode(ctx, CiConfig()) == "deploy"
    first = detect({**env, "CI_COMMIT_BEFORE_SHA": ZERO})
    assert first.base is None
    assert "CI_COMMIT_BEFORE_SHA" in first.base_reason
    assert "zeros" in first.base_reason
    other = detect({**env, "CI_COMMIT_BRANCH": "feature"})
    assert mode(other, CiConfig()) == "build"
    assert "not a deploy branch" in mode_reason(other, CiConfig())


def test_gitlab_schedule_is_build():
    ctx = detect({**GITLAB, "CI_PIPELINE_SOURCE": "schedule", "CI_COMMIT_BRANCH": "main"})
    assert ctx.event == "other"
    assert mode(ctx, CiConfig()) == "build"


DRONE = {
    "DRONE": "true",
    "DRONE_REPO": "acme/fleet",
    "DRONE_REPO_BRANCH": "main",
    "DRONE_REPO_LINK": "https://github.com/acme/fleet",
    "DRONE_COMMIT_SHA": HEAD,
    "DRONE_COMMIT_AFTER": HEAD,
    "DRONE_BUILD_LINK": "https://drone.example/acme/fleet/3",
}


def test_drone_pull_request():
    env = {
        **DRONE,
        "DRONE_BUILD_EVENT": "pull_request",
        "DRONE_COMMIT_BEFORE": BASE,
        "DRONE_PULL_REQUEST": "11",
        "DRONE_BRANCH": "main",
        "DRONE_SOURCE_BRANCH": "feature",
        "DRONE_TARGET_BRANCH": "main",
    }
    ctx = detect(env)
    assert (ctx.provider, ctx.event, ctx.base, ctx.head, ctx.number) == (
        "drone",
        "pull_request",
        BASE,
        HEAD,
        11,
    )
    assert (ctx.branch, ctx.target_branch, ctx.default_branch) == ("feature", "main", "main")
    assert (ctx.forge, ctx.api_url) == ("github", "https://api.github.com")
    assert ctx.fork is True  # Drone does not say; assume a fork
    assert detect({**env, "DRONE_SOURCE_REPO": "acme/fleet"}).fork is False
    assert mode(ctx, CiConfig()) == "plan"
    old = detect({**env, "DRONE_COMMIT_BEFORE": ""})
    assert old.base is None
    assert "not set" in old.base_reason


def test_drone_push():
    env = {
        **DRONE,
        "DRONE_BUILD_EVENT": "push",
        "DRONE_COMMIT_BEFORE": BASE,
        "DRONE_BRANCH": "main",
    }
    ctx = detect(env)
    assert (ctx.event, ctx.base, ctx.branch) == ("push", BASE, "main")
    assert mode(ctx, CiConfig()) == "deploy"
    assert mode(ctx, CiConfig(deploy_branches=("production", "release/*"))) == "build"
    assert (
        mode(detect({**env, "DRONE_BRANCH": "release/2"}), CiConfig(deploy_branches=("release/*",)))
        == "deploy"
    )
    promote = detect({**env, "DRONE_BUILD_EVENT": "promote"})
    assert promote.event == "other"
    assert mode(promote, CiConfig()) == "build"


def test_none():
    ctx = detect({"PATH": "/bin", "CI": "true"})
    assert (ctx.provider, ctx.event, ctx.base) == ("none", "other", None)
    assert mode(ctx, CiConfig()) == "build"
    assert mode_reason(ctx, CiConfig()) == "no CI service detected: build only"


# -- outputs ------------------------------------------------------------------------------


def parse_github_output(text: str) -> dict[str, str]:
    """Read $GITHUB_OUTPUT the way the runner does."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        heredoc = re.match(r"^([^=]+)<<(.+)$", line)
        if heredoc and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = heredoc.groups()
            value: list[str] = []
            while lines[i] != delimiter:
                value.append(lines[i])
                i += 1
            i += 1
            out[name] = "\n".join(value)
        else:
            name, _, rest = line.partition("=")
            out[name] = rest
    return out


def test_write_github_outputs(tmp_path):
    target = tmp_path / "output"
    target.write_text("earlier=1\n")
    ctx = CiContext("github", "push")
    outputs = {
        **node_outputs("deploy", ["web1", "web2"], ["web1"], ["web2"]),
        "summary": "line one\nline two\r\nghadelimiter_x",
        "empty": "",
    }
    written = write_outputs(ctx, outputs, {"GITHUB_OUTPUT": str(target)})
    assert written == target
    parsed = parse_github_output(target.read_bytes().decode("utf-8"))
    assert parsed == {"earlier": "1", **outputs, "summary": "line one\nline two\r\nghadelimiter_x"}
    assert parsed["affected-nodes"] == "web1,web2"
    assert parsed["mode"] == "deploy"


def test_github_output_format():
    assert format_github_output("deployed", "a,b") == "deployed=a,b\n"
    text = format_github_output("x", "1\n2")
    first, *_ = text.split("\n")
    delimiter = first.split("<<", 1)[1]
    assert delimiter.startswith("ghadelimiter_")
    assert text == f"x<<{delimiter}\n1\n2\n{delimiter}\n"
    with pytest.raises(ValueError, match="output name"):
        format_github_output("bad name", "x")


def test_write_outputs_gitlab_dotenv_and_others(tmp_path):
    dotenv = tmp_path / "out" / "waggle.env"
    ctx = CiContext("gitlab", "push")
    outputs = node_outputs("deploy", ["a", "b"], [], ["b"])
    assert write_outputs(ctx, {**outputs, "note": "x\ny"}, {}, dotenv=dotenv) == dotenv
    assert dotenv.read_text().splitlines() == [
        "WAGGLE_MODE=deploy",
        "WAGGLE_AFFECTED_NODES=a,b",
        "WAGGLE_DEPLOYED=",
        "WAGGLE_FAILED=b",
        "WAGGLE_NOTE=x y",
    ]
    assert write_outputs(ctx, outputs, {}) is None
    assert write_outputs(CiContext("drone", "push"), outputs, {}) is None
    assert write_outputs(CiContext("github", "push"), outputs, {}) is None  # no GITHUB_OUTPUT


# -- annotations --------------------------------------------------------------------------


def test_annotation_escaping():
    (line,) = ci.annotations([("web:1,x", "activate failed: 50% done\nexit 4")], "github")
    assert (
        line == "::error title=waggle%3A web%3A1%2Cx failed::activate failed: 50%25 done%0Aexit 4"
    )
    (warning,) = ci.annotations([("n", "m")], "github", kind="warning")
    assert warning.startswith("::warning title=")


def test_annotation_limit():
    failed = [(f"node{i}", f"failed {i}") for i in range(25)]
    lines = ci.annotations(failed, "github")
    assert len(lines) == 10
    assert all(line.startswith("::error ") for line in lines)
    assert "node8" in lines[8]
    assert "16 more nodes failed" in lines[9]
    assert "node9," in lines[9]
    assert "node24" in lines[9]
    exactly = ci.annotations(failed[:10], "github")
    assert len(exactly) == 10
    assert "node9" in exactly[9]
    assert len(ci.annotations(failed, "github", limit=3)) == 3
    assert ci.annotations(failed, "gitlab") == []
    assert ci.annotations(failed, "drone") == []
    assert ci.annotations(failed, "none") == []
    assert ci.annotations([], "github") == []


def test_failed_nodes_from_summary():
    ok = NodeResult("web1", (StageResult(Stage.BUILD, Status.OK, 1.0),))
    bad = NodeResult(
        "web2",
        (
            StageResult(Stage.BUILD, Status.OK, 1.0),
            StageResult(Stage.ACTIVATE, Status.FAILED, 2.0, message="exit 4"),
        ),
    )
    summary = RunSummary("ci", "switch", "hive.nix", None, 0.0, 3.0, (Stage.BUILD,), (ok, bad))
    assert failed_nodes(summary) == [("web2", "activate failed: exit 4")]


# -- shards from the CI's variables --------------------------------------------------------


def test_shard_from_gitlab_parallel():
    found = ci.shard_from_env({**GITLAB, "CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "3"})
    assert found == ci.CiShard(ShardSpec(2, 3), "CI_NODE_INDEX/CI_NODE_TOTAL")
    # a job without `parallel:` has CI_NODE_TOTAL=1 and no index: not sharded
    assert ci.shard_from_env({**GITLAB, "CI_NODE_TOTAL": "1"}) is None
    # other CI services' CI_NODE_INDEX may count from 0: only GitLab's is read
    assert ci.shard_from_env({"CI_NODE_INDEX": "0", "CI_NODE_TOTAL": "3"}) is None
    with pytest.raises(UsageError, match="CI_NODE_INDEX/CI_NODE_TOTAL '4/3'"):
        ci.shard_from_env({**GITLAB, "CI_NODE_INDEX": "4", "CI_NODE_TOTAL": "3"})


def test_shard_from_waggle_shard_wins_over_gitlab():
    env = {"GITHUB_ACTIONS": "true", "WAGGLE_SHARD": "1/4"}
    assert ci.shard_from_env(env) == ci.CiShard(ShardSpec(1, 4), "WAGGLE_SHARD")
    gitlab = {**GITLAB, "CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "3", "WAGGLE_SHARD": "3/3"}
    assert ci.shard_from_env(gitlab) == ci.CiShard(ShardSpec(3, 3), "WAGGLE_SHARD")
    assert ci.shard_from_env({"DRONE": "true", "WAGGLE_SHARD": " "}) is None
    with pytest.raises(UsageError, match="WAGGLE_SHARD 'two'"):
        ci.shard_from_env({"WAGGLE_SHARD": "two"})


def test_explicit_shard_wins_and_the_mode_line_says_so():
    from runner.app.ci import shard_for
    from runner.app.requests import ApplyRequest, CiRequest

    env = {**GITLAB, "CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "3"}
    assert shard_for(CiRequest(apply=ApplyRequest()), env) == (
        ShardSpec(2, 3),
        "; shard 2/3 (from CI_NODE_INDEX/CI_NODE_TOTAL)",
    )
    given = CiRequest(apply=ApplyRequest(shard=ShardSpec(1, 3)))
    assert shard_for(given, env) == (
        ShardSpec(1, 3),
        "; shard 1/3 (from --shard, over CI_NODE_INDEX/CI_NODE_TOTAL's 2/3)",
    )
    assert shard_for(given, {}) == (ShardSpec(1, 3), "; shard 1/3 (from --shard)")
    assert shard_for(CiRequest(apply=ApplyRequest()), {}) == (None, "")
