"""runner.gitops.trust without hosts: a pull request's settings come from the base commit,
and the plan decides and reports dry activation per node (real git, real nix)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from runner.evaluate import EvalSettings
from runner.gitops.ci import CiContext
from runner.gitops.config import CiConfig, ConfigError
from runner.gitops.plan import DryActivationPolicy, compute_plan
from runner.gitops.trust import (
    PrSettings,
    decide_dry_activation,
    dry_activation_config,
    dry_activation_policy,
    pr_config,
)
from runner.report.plan import plan_json, plan_markdown
from tests.conftest import write_hive


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def commit(repo: Path, files: dict[str, str | None], message: str = "c") -> str:
    for rel, text in files.items():
        path = repo / rel
        if text is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    return repo


BASE_SETTINGS = "comment: true\ntoken_env: FORGE_TOKEN\nparallel: 4\n"
WIDENING = (
    "comment: true\n"
    "comment_forks: true\n"
    "token_env: WAGGLE_SSH_KEY\n"
    "dry_activate_on_pr: true\n"
    "hive: ./other.nix\n"
    'on: "*"\n'
    "cache_dir: ./poisoned-cache\n"
    "report_md: /root/.bashrc\n"
    "deploy_branches: ['*']\n"
)


def test_a_pull_request_gets_the_base_commits_settings(repo):
    base = commit(repo, {"waggle.yaml": BASE_SETTINGS, "x": "1"})
    commit(repo, {"waggle.yaml": WIDENING})
    got = pr_config(None, search_from=repo, base=base)
    assert got.from_base
    assert got.config.comment is True and got.config.token_env == "FORGE_TOKEN"
    assert got.config.parallel == 4
    widened = ("comment_forks", "dry_activate_on_pr", "hive", "on", "cache_dir", "report_md")
    assert all(getattr(got.config, k) == getattr(CiConfig(), k) for k in widened)
    assert got.config.deploy_branches is None
    assert got.config.source == repo.resolve() / "waggle.yaml"
    (note,) = got.notes
    assert note.startswith("this pull request changes waggle.yaml")
    # From a subdirectory: the same file, found upwards in the base tree.
    (repo / "sub").mkdir()
    assert pr_config(None, search_from=repo / "sub", base=base).config == got.config


def test_a_pull_request_adding_or_deleting_waggle_yaml(repo):
    base = commit(repo, {"x": "1"})
    commit(repo, {"waggle.yaml": WIDENING})
    added = pr_config(None, search_from=repo, base=base)
    assert added.config == CiConfig() and "changes waggle.yaml" in added.notes[0]
    base = commit(repo, {"waggle.yaml": BASE_SETTINGS})
    commit(repo, {"waggle.yaml": None})
    deleted = pr_config(None, search_from=repo, base=base)
    assert deleted.config.token_env == "FORGE_TOKEN"
    unchanged = pr_config(None, search_from=repo, base=git(repo, "rev-parse", "HEAD"))
    assert unchanged.notes == ()


def test_the_pull_requests_own_copy_is_still_checked(repo):
    base = commit(repo, {"waggle.yaml": BASE_SETTINGS})
    commit(repo, {"waggle.yaml": "no_such_setting: 1\n"})
    with pytest.raises(ConfigError, match=r"waggle.yaml in this pull request: unknown setting"):
        pr_config(None, search_from=repo, base=base)


def test_a_symlinked_waggle_yaml_is_refused(repo, tmp_path):
    secret = tmp_path / "runner-secret.yaml"
    secret.write_text("dry_activate_on_pr: true\n")
    base = commit(repo, {"x": "1"})
    (repo / "waggle.yaml").symlink_to(secret)
    commit(repo, {})
    with pytest.raises(ConfigError, match="in this pull request is a symbolic link"):
        pr_config(None, search_from=repo, base=base)
    linked_base = git(repo, "rev-parse", "HEAD")
    (repo / "waggle.yaml").unlink()
    commit(repo, {"waggle.yaml": BASE_SETTINGS})
    with pytest.raises(ConfigError, match=f"in the base commit {linked_base[:12]} is a symbolic"):
        pr_config(None, search_from=repo, base=linked_base)


def test_ci_config_inside_the_repository_comes_from_the_base_outside_as_it_is(repo, tmp_path):
    base = commit(repo, {"ci/waggle.yaml": BASE_SETTINGS})
    commit(repo, {"ci/waggle.yaml": WIDENING})
    inside = pr_config(Path("ci/waggle.yaml"), search_from=repo, base=base)
    assert inside.from_base and inside.config.token_env == "FORGE_TOKEN"
    runner_file = tmp_path / "runner.yaml"
    runner_file.write_text("dry_activate_on_pr: true\n")
    outside = pr_config(runner_file, search_from=repo, base=base)
    assert not outside.from_base and outside.config.dry_activate_on_pr is True


def test_unknown_base_gives_the_defaults(repo):
    commit(repo, {"waggle.yaml": WIDENING})
    for base in (None, "0" * 40, "f" * 40):
        got = pr_config(None, search_from=repo, base=base)
        assert got.config == CiConfig() and not got.from_base
        assert "base commit is unknown" in got.notes[0]


def pr(**kw) -> CiContext:
    return CiContext("github", "pull_request", target_branch="main", default_branch="main", **kw)


def test_dry_activation_policy():
    on = PrSettings(CiConfig(dry_activate_on_pr=True), from_base=True)
    assert dry_activation_policy(pr(), on).enabled
    off = PrSettings(CiConfig(), from_base=True)
    assert "off in the base commit" in dry_activation_policy(pr(), off).reason
    assert "fork" in dry_activation_policy(pr(fork=True), on).reason
    other = CiContext("github", "pull_request", target_branch="dev", default_branch="main")
    assert "targets dev, not a deploy branch (main)" in dry_activation_policy(other, on).reason
    unknown = CiContext("github", "pull_request", default_branch="main")
    assert "an unknown branch" in dry_activation_policy(unknown, on).reason
    into_release = PrSettings(
        CiConfig(dry_activate_on_pr=True, deploy_branches=("release/*",)), from_base=True
    )
    ctx = CiContext("gitlab", "pull_request", target_branch="release/2")
    assert dry_activation_policy(ctx, into_release).enabled


HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  same = import ./same.nix;
  moved = import ./moved.nix;
  escalated = import ./escalated.nix;
  broken = import ./broken.nix;
}
"""


def node(text: str, extra: str = "") -> str:
    return f'{{ environment.etc.v.text = "{text}"; {extra}}}\n'


def test_the_plan_decides_and_reports_dry_activation_per_node(repo, tmp_path):
    write_hive(repo, HIVE)
    names = ("same", "moved", "escalated", "broken")
    base = commit(
        repo, {f"{n}.nix": node(f"{n} 1", 'deployment.targetUser = "ops"; ') for n in names}
    )
    head = commit(
        repo,
        {
            "same.nix": node("same 2", 'deployment.targetUser = "ops"; '),
            "moved.nix": node(
                "moved 2", 'deployment.targetUser = "ops"; deployment.targetHost = "elsewhere"; '
            ),
            "escalated.nix": node(
                "escalated 2",
                'deployment.targetUser = "ops"; '
                'deployment.privilegeEscalationCommand = [ "sh" "-c" ]; deployment.targetPort = 2222; ',
            ),
            "broken.nix": node("broken 2", 'deployment.targetUser = throw "no user"; '),
            "fresh.nix": node("fresh"),
        },
    )
    write_hive(repo, HIVE.replace("}\n", "  fresh = import ./fresh.nix;\n}\n"))
    head = commit(repo, {})
    cache = tmp_path / "cache"
    settings = EvalSettings(node_limit=0)

    def planned():
        return asyncio.run(
            compute_plan(
                repo / "hive.nix",
                base,
                head,
                host_access=True,
                cache_dir=cache,
                eval_settings=settings,
            )
        )

    first = planned()
    second = planned()  # the base side from the cache keeps its host access
    assert second.base_cached and not first.base_cached
    for p in (first, second):
        assert p.node("same").base_access == p.node("same").head_access
        assert p.node("same").base_access is not None
        assert p.node("same").base_access.target_user == "ops"
    policy = DryActivationPolicy(True, "Dry activation is on in the base commit's settings")
    decided = decide_dry_activation(second, policy)
    data = plan_json(decided)
    assert data["dry_activation"] == {"enabled": True, "reason": policy.reason}
    by_name = {n["name"]: n["dry_activate"] for n in data["nodes"]}
    assert by_name["same"]["planned"] is True
    assert by_name["moved"] == {
        "planned": False,
        "reason": "not dry-activated: this pull request changes deployment.targetHost (how the "
        "host is reached comes only from the base)",
    }
    assert (
        "deployment.targetPort, deployment.privilegeEscalationCommand"
        in (by_name["escalated"]["reason"])
    )
    assert by_name["broken"]["planned"] is False and "no user" in by_name["broken"]["reason"]
    assert by_name["fresh"]["planned"] is False and "new node" in by_name["fresh"]["reason"]
    config = dry_activation_config(decided.node("same"))
    assert (config.target_user, config.keys, config.build_on_target) == ("ops", (), False)
    with pytest.raises(ValueError, match="moved"):
        dry_activation_config(decided.node("moved"))
    text = plan_markdown(decided)
    assert "### Dry activation" in text and "- `same`: dry-activate" in text
    # Switched off: the policy's reason is the whole story, no node is planned.
    off = decide_dry_activation(second, DryActivationPolicy(False, "No dry activation: fork"))
    assert plan_json(off)["dry_activation"]["enabled"] is False
    assert all(n.dry_activate is None for n in off.nodes)
