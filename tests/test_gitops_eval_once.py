"""`apply --changed-since` and `waggle ci` on a push evaluate head once per node.

The plan's head evaluation (drvPaths and outPaths) feeds the build and deploy steps. A
`nix-instantiate` first on PATH logs every call's argv; each node evaluation's expression
names the hive file it read, so head and base evaluations are told apart (the base is
evaluated from a temporary checkout, `.../base/hive.nix`).
"""

from __future__ import annotations

import base64
import os
import platform
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import STANDIN, needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import waggle
from tests.test_gitops_apply import git, github_env, outcome, rev, run_ci

pytestmark = needs_fleet()

NAMES = ("once1", "once2", "once3")
SYSTEM = f"{platform.machine()}-linux"
HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, ... }: { networking.hostName = name; };
  once1 = import ./once1.nix;
  once2 = import ./once2.nix;
  once3 = import ./once3.nix;
}
"""

ONCE = Counter(dict.fromkeys(NAMES, 1))
# `(...).evalOne "x"`, `.evalQueue [ ... ]`: a node evaluation.
_NODE_EVAL = re.compile(r"\)\.(eval[A-Z]\w*) (.*)\Z", re.DOTALL)


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A logging nix-instantiate first on PATH; returns the log (one base64 argv a line)."""
    real = shutil.which("nix-instantiate")
    assert real is not None
    bin_dir, log = tmp_path / "bin", tmp_path / "nix-instantiate.log"
    bin_dir.mkdir()
    wrapper = bin_dir / "nix-instantiate"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'line=$(printf "%s\\0" "$@" | base64 -w0); echo "$line" >> "{log}"\n'
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def node_evaluations(log: Path) -> list[str]:
    """The expressions of the node evaluations logged."""
    out = []
    for line in log.read_text().splitlines():
        argv = base64.b64decode(line).decode().split("\0")
        expr = argv[argv.index("-E") + 1] if "-E" in argv else ""
        if _NODE_EVAL.search(expr):
            out.append(expr)
    return out


def head_evaluations(log: Path) -> Counter[str]:
    """How often each node was evaluated at head (not from the plan's base checkout)."""
    counts: Counter[str] = Counter()
    for expr in node_evaluations(log):
        found = _NODE_EVAL.search(expr)
        if found is None or re.search(r"/waggle-plan-[^/]*/base\b", expr):
            continue
        # the names as JSON (`builtins.fromJSON "[\"a\"]"`) or as Nix strings
        counts.update(n for n in NAMES if re.search(rf'\\?"{n}\\?"', found.group(2)))
    return counts


def repo_with_hive(repo: Path, text: str) -> Path:
    repo.mkdir(exist_ok=True)
    hive = write_hive(repo, HIVE)
    for n in NAMES:
        (repo / f"{n}.nix").write_text(f'{{ environment.etc.v.text = "{n} {text}"; }}\n')
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    return hive


def test_changed_since_evaluates_head_once(tmp_path, counted):
    hive = repo_with_hive(tmp_path / "repo", "one")
    (hive.parent / "once2.nix").write_text('{ environment.etc.v.text = "once2 two"; }\n')
    git(hive.parent, "commit", "-qam", "two")
    done = waggle("apply", "build", "--changed-since", "HEAD~1", "-v", cwd=hive.parent)
    assert done.returncode == 0, done.stderr
    assert outcome(done)["once2"].endswith("-nixos-system-once2-23.11.standin"), done.stdout
    assert "once2: deploying (changed)" in done.stderr
    assert head_evaluations(counted) == ONCE, node_evaluations(counted)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    octet = free_first_octet(len(NAMES), 150)
    with Fleet.start(
        tmp_path_factory.mktemp("fleet"), len(NAMES), names=list(NAMES), first_octet=octet
    ) as f:
        yield f


def test_ci_push_evaluates_head_once_with_drift(fleet, tmp_path, counted):
    repo = tmp_path / "repo"
    repo_with_hive(repo, "ci-one")
    ssh = ["--ssh-config", str(fleet.ssh_config)]
    first = waggle("apply", *ssh, cwd=repo)
    assert first.returncode == 0, first.stderr
    before = rev(repo)
    (repo / "once1.nix").write_text('{ environment.etc.v.text = "once1 ci-two"; }\n')
    git(repo, "commit", "-qam", "two")
    after = rev(repo)
    fleet.run("once3", "ln -sfn /nix/var/nix/profiles /run/current-system")  # drift
    counted.write_text("")
    repo_json = {"full_name": "acme/fleet", "default_branch": "main"}
    push = {"before": before, "after": after, "repository": repo_json}
    done = run_ci(repo, github_env(tmp_path, "push", push, after, "main"), *ssh)
    assert done.returncode == 0, done.stdout + done.stderr
    assert outcome(done) == {"once1": "ok", "once2": "unchanged", "once3": "ok"}
    assert fleet["once1"].resolve("/etc/v").read_text() == "once1 ci-two"
    assert fleet["once3"].resolve("/etc/v").read_text() == "once3 ci-one"
    assert head_evaluations(counted) == ONCE, node_evaluations(counted)


def test_changed_since_evaluates_a_flake_head_once(tmp_path, counted):
    # A flake is evaluated from the working tree (git+file) at head and from a `path:`
    # checkout at base: the drvPaths still agree, so the unchanged node stays unchanged.
    repo = tmp_path / "repo"
    shutil.copytree(STANDIN, repo / "nixpkgs")
    flake = (
        '{ outputs = { self }: let pkgs = import ./nixpkgs { system = "' + SYSTEM + '"; }; in {'
        ' colmena = { meta.nixpkgs = pkgs; once1 = { environment.etc.motd.text = "MOTD"; };'
        " once2 = { }; }; }; }\n"
    )
    (repo / "flake.nix").write_text(flake.replace("MOTD", "hi"))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    (repo / "flake.nix").write_text(flake.replace("MOTD", "hello"))
    git(repo, "commit", "-qam", "two")
    done = waggle("apply", "build", "--changed-since", "HEAD~1", "-v", cwd=repo)
    assert done.returncode == 0, done.stderr
    assert "once1: deploying (changed)" in done.stderr
    assert "once2: deploying" not in done.stderr and "1 node(s) unchanged" in done.stderr
    evaluations = head_evaluations(counted)
    assert evaluations == Counter(once1=1, once2=1), node_evaluations(counted)


def test_ci_pull_request_dry_activation_reuses_the_plans_evaluation(fleet, tmp_path, counted):
    # With dry_activate_on_pr the pull request's plan is followed by a dry activation of
    # the affected hosts: it builds nothing new and evaluates nothing again.
    repo = tmp_path / "repo"
    repo_with_hive(repo, "pr-one")
    ssh = ["--ssh-config", str(fleet.ssh_config)]
    assert waggle("apply", *ssh, cwd=repo).returncode == 0
    before = rev(repo)
    (repo / "once2.nix").write_text('{ environment.etc.v.text = "once2 pr-two"; }\n')
    git(repo, "commit", "-qam", "two")
    after = rev(repo)
    counted.write_text("")
    pr = {
        "pull_request": {
            "number": 9,
            "base": {"sha": before, "ref": "main", "repo": {"full_name": "acme/fleet"}},
            "head": {"sha": after, "repo": {"full_name": "acme/fleet"}},
        },
        "repository": {"full_name": "acme/fleet", "default_branch": "main"},
    }
    dry_cfg = tmp_path / "dry.yaml"
    dry_cfg.write_text("dry_activate_on_pr: true\n")
    env = github_env(tmp_path, "pull_request", pr, after, "9/merge")  # PATH: the wrapper's
    done = run_ci(repo, env, "--ci-config", str(dry_cfg), *ssh)
    assert done.returncode == 0, done.stdout + done.stderr
    log = fleet["once2"].path("/run/standin/activations.log")
    assert log.read_text().splitlines()[-1].startswith("dry-activate ")
    assert fleet["once2"].resolve("/etc/v").read_text() == "once2 pr-one"
    assert head_evaluations(counted) == ONCE, node_evaluations(counted)


def test_drift_check_evaluation_is_reused_when_only_ignored_paths_changed(fleet, tmp_path, counted):
    # Only README.md changed: the plan evaluates nothing, the drift check evaluates head,
    # and the drifted host is deployed from that evaluation.
    repo = tmp_path / "repo"
    repo_with_hive(repo, "docs-one")
    ssh = ["--ssh-config", str(fleet.ssh_config)]
    assert waggle("apply", *ssh, cwd=repo).returncode == 0
    (repo / "README.md").write_text("docs\n")
    git(repo, "add", "README.md")
    git(repo, "commit", "-qm", "docs")
    fleet.run("once1", "ln -sfn /nix/var/nix/profiles /run/current-system")  # drift
    counted.write_text("")
    done = waggle("apply", "--changed-since", "HEAD~1", *ssh, "-v", cwd=repo)
    assert done.returncode == 0, done.stderr
    assert outcome(done) == {"once1": "ok", "once2": "unchanged", "once3": "unchanged"}
    assert head_evaluations(counted) == ONCE, node_evaluations(counted)


@pytest.mark.parametrize("command", ["apply", "plan"])
def test_a_shard_evaluates_only_its_nodes_on_both_sides(tmp_path, counted, command):
    # A sharded plan (and a sharded --changed-since run) evaluates its share at head and at
    # base, not every node: N shards divide the evaluation, as they divide the deploys.
    from runner.shard import ShardSpec, shard_nodes

    hive = repo_with_hive(tmp_path / "repo", "one")
    for n in NAMES:
        (hive.parent / f"{n}.nix").write_text(f'{{ environment.etc.v.text = "{n} two"; }}\n')
    git(hive.parent, "commit", "-qam", "two")
    spec = next(ShardSpec(k, 2) for k in (1, 2) if len(shard_nodes(NAMES, ShardSpec(k, 2))) == 1)
    mine = shard_nodes(NAMES, spec)
    args = ("apply", "build", "--changed-since", "HEAD~1") if command == "apply" else ("plan",
            "--base", "HEAD~1", "--no-build")  # fmt: skip
    done = waggle(*args, "--shard", str(spec), cwd=hive.parent)
    assert done.returncode == 0, done.stderr
    evaluated = Counter(
        n for expr in node_evaluations(counted) for n in NAMES if re.search(rf'\\?"{n}\\?"', expr)
    )
    assert set(evaluated) == set(mine), node_evaluations(counted)
    assert evaluated == Counter(dict.fromkeys(mine, 2)), evaluated  # head and base, once each
