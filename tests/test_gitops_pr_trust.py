"""What a pull request can reach through `waggle ci` (real git repositories, the real fleet).

The plan job of a pull request runs the PR's code. `dry_activate_on_pr` lets it reach the
hosts, so it counts only from the base commit's waggle.yaml, never for forks or PRs into a
branch that does not deploy, never uploads keys, and reaches each host only with the base's
connection settings: a PR that changes them gets no dry-activation for that node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.binary_cache import BinaryCache
from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, TestHost, free_first_octet
from tests.helpers import outside_ci

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
NAMES = ("host1", "host2", "host3")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet")
    with Fleet.start(directory, 3, names=list(NAMES), first_octet=free_first_octet(3, 200)) as f:
        yield f


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def node_file(text: str, extra: str = "") -> str:
    return f'{{ environment.etc.v.text = "{text}"; {extra}}}\n'


def commit(repo: Path, message: str, files: dict[str, str | None]) -> str:
    for rel, text in files.items():
        if text is None:
            (repo / rel).unlink()
        else:
            (repo / rel).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


def base_repo(tmp_path: Path, tag: str, *, settings: str | None) -> tuple[Path, str]:
    """A repository whose main branch has the hive (and `settings` as waggle.yaml)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    write_hive(repo, HIVE)
    files: dict[str, str | None] = {f"{n}.nix": node_file(f"{n} {tag} base") for n in NAMES}
    if settings is not None:
        files["waggle.yaml"] = settings
    git(repo, "init", "-q", "-b", "main")
    return repo, commit(repo, "base", files)


def pull_request(
    tmp_path: Path, repo: Path, base: str, head: str, *, fork: bool = False, into: str = "main"
) -> dict[str, str]:
    """The environment of a GitHub Actions pull_request job with `head` checked out."""
    event = {
        "number": 9,
        "pull_request": {
            "number": 9,
            "base": {"sha": base, "ref": into, "repo": {"full_name": "acme/fleet"}},
            "head": {
                "sha": head,
                "ref": "feature",
                "repo": {"full_name": "mallory/fleet" if fork else "acme/fleet", "fork": fork},
            },
        },
        "repository": {"full_name": "acme/fleet", "default_branch": "main"},
    }
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    env = outside_ci()
    env.update(
        {
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_EVENT_NAME": "pull_request",
            "GITHUB_EVENT_PATH": str(path),
            "GITHUB_SHA": head,
            "GITHUB_REF_NAME": "9/merge",
            "GITHUB_BASE_REF": into,
            "GITHUB_HEAD_REF": "feature",
            "GITHUB_REPOSITORY": "acme/fleet",
            "GITHUB_OUTPUT": str(tmp_path / "output.txt"),
        }
    )
    return env


def run_ci(fleet: Fleet, repo: Path, env: dict[str, str], report: Path):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "ci",
            "--ssh-config",
            str(fleet.ssh_config),
            "--report-md",
            str(report),
            "--connect-timeout",
            "5",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def report_text(path: Path) -> str:
    """The markdown report as a reader sees it (markdown escapes removed)."""
    return path.read_text().replace("\\", "")


def activations(host: TestHost) -> list[str]:
    log = host.path("/run/standin/activations.log")
    return log.read_text().splitlines() if log.exists() else []


def dry_activated(fleet: Fleet, before: dict[str, list[str]]) -> set[str]:
    """The hosts whose activation log grew since `before`, checking it grew by dry-activate."""
    grown = set()
    for host in fleet:
        new = activations(host)[len(before[host.name]) :]
        assert all(line.startswith("dry-activate ") for line in new), (host.name, new)
        if new:
            grown.add(host.name)
    return grown


def current_system(host: TestHost) -> str | None:
    link = host.path("/run/current-system")
    return os.readlink(link) if link.is_symlink() else None


def snapshot(fleet: Fleet) -> dict[str, list[str]]:
    return {h.name: activations(h) for h in fleet}


ON = "dry_activate_on_pr: true\n"


def test_a_pull_request_cannot_switch_dry_activation_on_for_itself(fleet, tmp_path):
    repo, base = base_repo(tmp_path, "self", settings=None)
    head = commit(
        repo, "pr", {"host1.nix": node_file("host1 self pr"), "waggle.yaml": ON + "parallel: 3\n"}
    )
    before = snapshot(fleet)
    report = tmp_path / "plan.md"
    done = run_ci(fleet, repo, pull_request(tmp_path, repo, base, head), report)
    assert done.returncode == 0, done.stdout + done.stderr
    assert dry_activated(fleet, before) == set()
    text = report_text(report)
    assert "dry_activate_on_pr is off" in text, text
    assert "this pull request changes waggle.yaml" in text, text


def test_no_dry_activation_for_forks_or_branches_that_do_not_deploy(fleet, tmp_path):
    repo, base = base_repo(tmp_path, "fork", settings=ON)
    head = commit(repo, "pr", {"host1.nix": node_file("host1 fork pr")})
    before = snapshot(fleet)
    report = tmp_path / "plan.md"
    done = run_ci(fleet, repo, pull_request(tmp_path, repo, base, head, fork=True), report)
    assert done.returncode == 0, done.stdout + done.stderr
    assert dry_activated(fleet, before) == set()
    assert "from a fork" in report_text(report), report_text(report)

    git(repo, "branch", "develop", base)
    env = pull_request(tmp_path, repo, base, head, into="develop")
    done = run_ci(fleet, repo, env, report)
    assert done.returncode == 0, done.stdout + done.stderr
    assert dry_activated(fleet, before) == set()
    assert "targets develop, not a deploy branch" in report_text(report), report_text(report)


def test_a_pull_request_changing_how_a_host_is_reached_is_not_dry_activated_there(fleet, tmp_path):
    repo, base = base_repo(tmp_path, "conn", settings=ON)
    ran = tmp_path / "proxy-command-ran"
    proxy = f'deployment.sshOptions = [ "-o" "ProxyCommand=touch {ran}" "-A" ]; '
    head = commit(
        repo,
        "pr",
        {
            "host1.nix": node_file("host1 conn pr", proxy),
            "host2.nix": node_file("host2 conn pr", 'deployment.targetHost = "host3"; '),
            "host3.nix": node_file("host3 conn pr"),
        },
    )
    before = snapshot(fleet)
    report = tmp_path / "plan.md"
    done = run_ci(fleet, repo, pull_request(tmp_path, repo, base, head), report)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not ran.exists(), "the PR's ProxyCommand ran on the runner"
    # host3 is dry-activated once, for its own change: not for host2's system
    assert dry_activated(fleet, before) == {"host3"}
    assert len(activations(fleet["host3"])) == len(before["host3"]) + 1
    text = report_text(report)
    assert "changes deployment.sshOptions" in text, text
    assert "changes deployment.targetHost" in text, text
    lines = [line for line in text.splitlines() if "host3" in line and "dry-activate" in line]
    assert lines, text


def test_keys_of_a_pull_request_never_reach_a_host(fleet, tmp_path):
    repo, base = base_repo(tmp_path, "keys", settings=ON)
    ran = tmp_path / "key-command-ran"
    keys = (
        'deployment.keys.secret = { text = "pr-secret-value"; }; '
        f'deployment.keys.cmd = {{ keyCommand = [ "sh" "-c" "touch {ran}; echo x" ]; }}; '
    )
    head = commit(repo, "pr", {"host1.nix": node_file("host1 keys pr", keys)})
    before = snapshot(fleet)
    done = run_ci(fleet, repo, pull_request(tmp_path, repo, base, head), tmp_path / "plan.md")
    assert done.returncode == 0, done.stdout + done.stderr
    assert dry_activated(fleet, before) == {"host1"}  # still dry-activated, without keys
    assert not ran.exists(), "the PR's keyCommand ran on the runner"
    host = fleet["host1"]
    for directory in ("/run/keys", "/var/keys"):
        found = host.path(directory)
        names = sorted(p.name for p in found.iterdir()) if found.is_dir() else []
        assert "secret" not in names and "cmd" not in names, (directory, names)
    assert "pr-secret-value" not in done.stdout + done.stderr


def test_a_normal_pull_request_is_dry_activated_with_the_base_connection_settings(fleet, tmp_path):
    # The base's settings also name a signed binary cache: a PR's closures must never be
    # signed with the fleet's key and uploaded (hosts would trust them); dry activation
    # pushes them directly.
    cache = BinaryCache.create(tmp_path / "cache")
    signed = f"cache:\n  url: {cache.file_url}\n  key: {cache.secret_key}\n"
    repo, base = base_repo(tmp_path, "normal", settings=ON + signed)
    # The base reaches host2 with explicit connection settings; the PR keeps them.
    reach = (
        'deployment.targetUser = "root"; deployment.targetPort = 22; '
        'deployment.sshOptions = [ "-o" "ConnectTimeout=7" ]; '
    )
    base = commit(repo, "base reach", {"host2.nix": node_file("host2 normal base", reach)})
    head = commit(repo, "pr", {"host2.nix": node_file("host2 normal pr", reach)})
    before, system_before = snapshot(fleet), current_system(fleet["host2"])
    report = tmp_path / "plan.md"
    done = run_ci(fleet, repo, pull_request(tmp_path, repo, base, head), report)
    assert done.returncode == 0, done.stdout + done.stderr
    assert dry_activated(fleet, before) == {"host2"}
    assert current_system(fleet["host2"]) == system_before  # nothing switched
    text = report_text(report)
    assert "Dry activation is on in the base commit's settings" in text, text
    assert "`host2`: dry-activate, reached with the base commit's connection settings" in text
    assert cache.narinfos() == []  # nothing of the PR went to the cache
