"""`apply --changed-since`: only affected and drifted hosts are deployed (real fleet, real git)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping

import pytest

from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import outside_ci, waggle

pytestmark = needs_fleet()

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, ... }: { networking.hostName = name; };
  host1 = import ./host1.nix;
  host2 = import ./host2.nix;
  host3 = import ./host3.nix;
}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    with Fleet.start(tmp_path_factory.mktemp("fleet"), 3, first_octet=free_first_octet(3)) as f:
        yield f


def git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def outcome(done) -> dict[str, str]:
    return {
        line.split("\t")[0]: line.split("\t")[1]
        for line in done.stdout.splitlines()
        if "\t" in line
    }


def test_changed_since_deploys_affected_and_drifted(fleet, tmp_path):
    write_hive(tmp_path, HIVE)
    for n in ("host1", "host2", "host3"):
        (tmp_path / f"{n}.nix").write_text(f'{{ environment.etc.v.text = "{n} one"; }}\n')
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "one")
    ssh = ["--ssh-config", str(fleet.ssh_config)]
    first = waggle("apply", *ssh, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert set(outcome(first).values()) == {"ok"}

    (tmp_path / "host2.nix").write_text('{ environment.etc.v.text = "host2 two"; }\n')
    git(tmp_path, "commit", "-qam", "two")
    done = waggle("apply", "--changed-since", "HEAD~1", *ssh, "-v", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert outcome(done) == {"host1": "unchanged", "host2": "ok", "host3": "unchanged"}
    assert fleet["host2"].resolve("/etc/v").read_text() == "host2 two"

    # host3 drifts: someone activated something else there by hand.
    fleet.run("host3", "ln -sfn /nix/var/nix/profiles /run/current-system")
    report = tmp_path / "report.json"
    done = waggle(
        "apply", "--changed-since", "HEAD", *ssh, "-v", "--report-json", str(report), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert outcome(done) == {"host1": "unchanged", "host2": "unchanged", "host3": "ok"}
    assert "host3: deploying (drift" in done.stderr
    import json

    reasons = {
        n["name"]: (n["status"], n["reason"]) for n in json.loads(report.read_text())["nodes"]
    }
    assert reasons["host3"][0] == "ok" and reasons["host3"][1].startswith("drift")
    assert reasons["host1"] == ("unchanged", "")
    assert fleet["host3"].resolve("/etc/v").read_text() == "host3 one"


def rev(cwd, what="HEAD") -> str:
    return subprocess.run(
        ["git", "rev-parse", what], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def github_env(
    tmp_path, event_name: str, event: Mapping[str, object], sha: str, ref_name: str
) -> dict[str, str]:
    import json

    event_path = tmp_path / "event.json"
    event_path.write_text(json.dumps(event))
    env = outside_ci()
    env.update(
        {
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_EVENT_NAME": event_name,
            "GITHUB_EVENT_PATH": str(event_path),
            "GITHUB_SHA": sha,
            "GITHUB_REF_NAME": ref_name,
            "GITHUB_REPOSITORY": "acme/fleet",
            "GITHUB_OUTPUT": str(tmp_path / "output.txt"),
            "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        }
    )
    return env


def run_ci(cwd, env, *args):
    return waggle("ci", *args, cwd=cwd, env=env, timeout=600)


def test_ci_push_deploys_only_affected_and_pr_only_plans(fleet, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    write_hive(repo, HIVE)
    for n in ("host1", "host2", "host3"):
        (repo / f"{n}.nix").write_text(f'{{ environment.etc.v.text = "{n} ci-one"; }}\n')
    (repo / "waggle.yaml").write_text("junit: reports/junit.xml\nreport_md: reports/report.md\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    ssh = ["--ssh-config", str(fleet.ssh_config)]
    assert waggle("apply", *ssh, cwd=repo).returncode == 0
    before = rev(repo)
    (repo / "host1.nix").write_text('{ environment.etc.v.text = "host1 ci-two"; }\n')
    git(repo, "commit", "-qam", "two")
    after = rev(repo)

    # A pull request: plan only, nothing activated.
    pr = {
        "pull_request": {
            "number": 7,
            "base": {"sha": before, "ref": "main", "repo": {"full_name": "acme/fleet"}},
            "head": {"sha": after, "repo": {"full_name": "acme/fleet"}},
        },
        "repository": {"full_name": "acme/fleet", "default_branch": "main"},
    }
    done = run_ci(repo, github_env(tmp_path, "pull_request", pr, after, "7/merge"), *ssh)
    assert done.returncode == 0, done.stderr
    assert "plan only" in done.stderr
    assert fleet["host1"].resolve("/etc/v").read_text() == "host1 ci-one"
    outputs = (tmp_path / "output.txt").read_text()
    assert "affected-nodes=host1" in outputs and "mode=plan" in outputs
    assert "host1" in (tmp_path / "summary.md").read_text()

    # With dry_activate_on_pr the PR also dry-activates the affected host: still nothing switched.
    # (A settings file outside the repository is the runner's: it counts as it is.)
    log = fleet["host1"].path("/run/standin/activations.log")
    dry_cfg = tmp_path / "dry.yaml"
    dry_cfg.write_text("dry_activate_on_pr: true\n")
    done = run_ci(
        repo,
        github_env(tmp_path, "pull_request", pr, after, "7/merge"),
        "--ci-config",
        str(dry_cfg),
        *ssh,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert log.read_text().splitlines()[-1].startswith("dry-activate ")
    assert fleet["host1"].resolve("/etc/v").read_text() == "host1 ci-one"

    # The push to main: host1 deployed, the others left alone.
    (tmp_path / "output.txt").unlink()
    push = {
        "before": before,
        "after": after,
        "repository": {"full_name": "acme/fleet", "default_branch": "main"},
    }
    done = run_ci(
        repo,
        github_env(tmp_path, "push", push, after, "main"),
        *template_ci_args("ci-templates/github/waggle.yml"),
        *ssh,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert outcome(done) == {"host1": "ok", "host2": "unchanged", "host3": "unchanged"}
    assert fleet["host1"].resolve("/etc/v").read_text() == "host1 ci-two"
    outputs = (tmp_path / "output.txt").read_text()
    assert "mode=deploy" in outputs and "deployed=host1" in outputs
    # The template's flags win over waggle.yaml's report paths.
    assert (repo / "waggle-junit.xml").exists() and (repo / "waggle-report.md").exists()


def test_watch_deploys_each_new_head(fleet, tmp_path):
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    dev = tmp_path / "dev"
    dev.mkdir()
    write_hive(dev, HIVE)
    for n in ("host1", "host2", "host3"):
        (dev / f"{n}.nix").write_text(f'{{ environment.etc.v.text = "{n} watch-one"; }}\n')
    git(dev, "init", "-q", "-b", "main")
    git(dev, "add", "-A")
    git(dev, "commit", "-qm", "one")
    git(dev, "remote", "add", "origin", str(origin))
    git(dev, "push", "-q", "origin", "main")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    reports, metrics = tmp_path / "reports", tmp_path / "waggle.prom"
    args = [
        "watch",
        "--once",
        "--repo",
        str(clone),
        "--reports-dir",
        str(reports),
        "--metrics-file",
        str(metrics),
        "--ssh-config",
        str(fleet.ssh_config),
    ]
    done = waggle(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert fleet["host2"].resolve("/etc/v").read_text() == "host2 watch-one"

    (dev / "host2.nix").write_text('{ environment.etc.v.text = "host2 watch-two"; }\n')
    git(dev, "commit", "-qam", "two")
    git(dev, "push", "-q", "origin", "main")
    done = waggle(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert fleet["host2"].resolve("/etc/v").read_text() == "host2 watch-two"
    assert fleet["host1"].resolve("/etc/v").read_text() == "host1 watch-one"
    runs = sorted(reports.iterdir())
    assert len(runs) == 2 and all((r / "junit.xml").exists() for r in runs)
    head = rev(dev)
    text = metrics.read_text()
    assert f'waggle_watch_last_commit_info{{commit="{head}"}} 1' in text
    assert "waggle_watch_last_deploy_success 1" in text


def template_ci_args(path: str) -> list[str]:
    """The arguments of the `waggle ci` line a template runs (after `waggle ci`)."""
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for line in (root / path).read_text().splitlines():
        text = line.strip().removeprefix("- ").removeprefix("run: ")
        if text.startswith("waggle ci"):
            return shlex.split(text)[2:]
    raise AssertionError(f"no waggle ci line in {path}")


def provider_env(provider: str, before: str, after: str) -> dict[str, str]:

    env = outside_ci()
    env["CI"] = "true"
    if provider == "gitlab":
        env.update(
            {
                "GITLAB_CI": "true",
                "CI_PIPELINE_SOURCE": "push",
                "CI_COMMIT_BEFORE_SHA": before,
                "CI_COMMIT_SHA": after,
                "CI_COMMIT_BRANCH": "main",
                "CI_DEFAULT_BRANCH": "main",
                "CI_PROJECT_ID": "42",
            }
        )
    else:
        env.update(
            {
                "DRONE": "true",
                "DRONE_BUILD_EVENT": "push",
                "DRONE_COMMIT_BEFORE": before,
                "DRONE_COMMIT_AFTER": after,
                "DRONE_COMMIT_SHA": after,
                "DRONE_BRANCH": "main",
                "DRONE_REPO_BRANCH": "main",
                "DRONE_COMMIT_BRANCH": "main",
            }
        )
    return env


@pytest.mark.parametrize(
    ("provider", "template"),
    [
        ("gitlab", "ci-templates/gitlab/.gitlab-ci.yml"),
        ("drone", "ci-templates/drone/.drone.yml"),
    ],
)
def test_ci_push_under_gitlab_and_drone(fleet, tmp_path, provider, template):
    repo = tmp_path / "repo"
    repo.mkdir()
    write_hive(repo, HIVE)
    for n in ("host1", "host2", "host3"):
        (repo / f"{n}.nix").write_text(f'{{ environment.etc.v.text = "{n} {provider}-one"; }}\n')
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    ssh = ["--ssh-config", str(fleet.ssh_config)]
    assert waggle("apply", *ssh, cwd=repo).returncode == 0
    before = rev(repo)
    (repo / "host3.nix").write_text(f'{{ environment.etc.v.text = "host3 {provider}-two"; }}\n')
    git(repo, "commit", "-qam", "two")
    # The template's own command line, as its pipeline would run it.
    done = run_ci(
        repo, provider_env(provider, before, rev(repo)), *template_ci_args(template), *ssh
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert outcome(done) == {"host1": "unchanged", "host2": "unchanged", "host3": "ok"}
    assert fleet["host3"].resolve("/etc/v").read_text() == f"host3 {provider}-two"
    assert fleet["host1"].resolve("/etc/v").read_text() == f"host1 {provider}-one"
