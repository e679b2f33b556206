"""`waggle ci` in a GitLab `parallel:` job deploys only its shard (real fleet, real git)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from runner.shard import ShardSpec, shard_nodes
from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.test_gitops_apply import git

pytestmark = needs_fleet()

NAMES = [f"sh{i}" for i in range(1, 7)]
HIVE = (
    "{\n  meta.nixpkgs = import @NIXPKGS@ { };\n"
    "  defaults = { name, ... }: { networking.hostName = name; };\n"
    + "".join(f'  {n} = {{ environment.etc.v.text = "{n} sharded"; }};\n' for n in NAMES)
    + "}\n"
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    first = free_first_octet(len(NAMES), 236)
    with Fleet.start(
        tmp_path_factory.mktemp("fleet"), len(NAMES), names=NAMES, first_octet=first, etc="overlay"
    ) as f:
        yield f


def gitlab_push_env(repo, index: str, total: str) -> dict[str, str]:
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GITHUB_", "GITLAB", "CI_", "DRONE", "WAGGLE_"))
    }
    env.update(
        {
            "CI": "true",
            "GITLAB_CI": "true",
            "CI_PIPELINE_SOURCE": "push",
            "CI_COMMIT_BRANCH": "main",
            "CI_DEFAULT_BRANCH": "main",
            "CI_COMMIT_SHA": sha,
            "CI_COMMIT_BEFORE_SHA": "0" * 40,  # a new branch: every node counts as affected
            "CI_PROJECT_PATH": "acme/fleet",
            "CI_NODE_INDEX": index,  # GitLab's `parallel: 3`, job 2 of 3
            "CI_NODE_TOTAL": total,
        }
    )
    return env


def test_gitlab_parallel_job_deploys_exactly_its_shard(fleet, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    write_hive(repo, HIVE)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    done = subprocess.run(
        [sys.executable, "-m", "runner", "ci", "--ssh-config", str(fleet.ssh_config),
         "--report-json", "report.json", "--junit", "junit.xml"],
        cwd=repo, env=gitlab_push_env(repo, "2", "3"),
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deploy; shard 2/3 (from CI_NODE_INDEX/CI_NODE_TOTAL)" in done.stderr
    mine = shard_nodes(NAMES, ShardSpec(2, 3))
    assert 0 < len(mine) < len(NAMES)
    for name in NAMES:
        etc_v = fleet[name].path("/etc/v")
        if name in mine:
            assert fleet[name].resolve("/etc/v").read_text() == f"{name} sharded", name
        else:  # never contacted: nothing activated there
            assert not etc_v.exists() and not os.path.lexists(etc_v), name
            assert not fleet[name].path("/run/standin/activations.log").exists(), name
    report = json.loads((repo / "report.json").read_text())
    assert [n["name"] for n in report["nodes"]] == mine
    assert {n["status"] for n in report["nodes"]} == {"ok"}
    assert report["run"]["shard"]["index"] == 2 and report["run"]["shard"]["total"] == 3
    assert report["not_selected"] == []
    assert '<property name="shard" value="2/3"' in (repo / "junit.xml").read_text()
