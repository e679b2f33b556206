"""Remote builders reach `waggle plan` and `waggle ci`: meta.machinesFile and --builders.

The builder is a fleet host (its own Nix store, reached with `ssh://` over the fleet's
sshd) that offers the system feature `waggle-builder`; the changed node needs a derivation
that requires it, so only the builder can build it. The derivation writes the hostname it
was built on, and its output must be in the builder's store.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import waggle
from tests.test_gitops_apply import git, github_env, rev, run_ci

pytestmark = needs_fleet()

BUILDER = "pbuilder"
HIVE = """
{{
  meta = {{ nixpkgs = import @NIXPKGS@ {{ }}; {meta} }};
  web = import ./web.nix;
  db = {{ environment.etc.v.text = "db"; }};
}}
"""
NEEDS_BUILDER = """
{{
  environment.etc.built.source = derivation {{
    name = "needs-builder-{nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "read -r h < /etc/hostname; echo \\"built on $h\\" > $out" ];
    requiredSystemFeatures = [ "waggle-builder" ];
  }};
}}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    with Fleet.start(
        tmp_path_factory.mktemp("fleet"), 1, names=[BUILDER], first_octet=free_first_octet(1, 170)
    ) as f:
        conf = f[BUILDER].path("/etc/nix/nix.conf")
        conf.write_text(conf.read_text() + "system-features = waggle-builder\n")
        yield f


def machines_line(fleet: Fleet) -> str:
    """A machines-file line for the builder: ssh://, the fleet's key, its host key."""
    host = fleet[BUILDER]
    public = (host.root / "ssh_host_ed25519_key.pub").read_text().strip()
    host_key = base64.b64encode(public.encode()).decode()
    return f"ssh://{host.target} - {fleet.client_key} 1 1 waggle-builder - {host_key}"


def plan_repo(repo: Path, meta: str, machines: str | None = None) -> str:
    """A repository whose second commit makes `web` need the builder; returns the nonce."""
    repo.mkdir()
    write_hive(repo, HIVE.format(meta=meta))
    if machines is not None:
        (repo / "machines").write_text(machines + "\n")
    (repo / "web.nix").write_text('{ environment.etc.v.text = "web"; }\n')
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    nonce = uuid.uuid4().hex
    (repo / "web.nix").write_text(NEEDS_BUILDER.format(nonce=nonce))
    git(repo, "commit", "-qam", "web needs the builder")
    return nonce


def built_on_builder(fleet: Fleet, report: Path, nonce: str) -> None:
    """The plan built `web`, and its builder-only part was built on the builder."""
    data = json.loads(report.read_text())
    web = next(n for n in data["nodes"] if n["name"] == "web")
    assert web["built"] is True, web
    assert_on_builder(fleet, nonce)


def assert_on_builder(fleet: Fleet, nonce: str) -> None:
    name = f"-needs-builder-{nonce}"
    found = [p for p in fleet[BUILDER].path("/nix/store").iterdir() if p.name.endswith(name)]
    assert len(found) == 1, f"the builder's store holds no {name} output"
    assert found[0].read_text() == f"built on {BUILDER}\n"


def test_plan_builds_with_the_hives_machines_file(fleet, tmp_path):
    repo = tmp_path / "repo"
    nonce = plan_repo(repo, "machinesFile = ./machines;", machines_line(fleet))
    report = tmp_path / "plan.json"
    done = waggle("plan", "--base", "HEAD~1", "--report-json", str(report), cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    built_on_builder(fleet, report, nonce)


def test_builders_flag_reaches_plan_and_build(fleet, tmp_path):
    repo = tmp_path / "repo"
    nonce = plan_repo(repo, "")
    builders = ["--builders", machines_line(fleet)]
    report = tmp_path / "plan.json"
    done = waggle("plan", *builders, "--base", "HEAD~1", "--report-json", str(report), cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    built_on_builder(fleet, report, nonce)
    # `waggle build` takes it too (the output is valid here now: change the nonce).
    (repo / "web.nix").write_text(NEEDS_BUILDER.format(nonce=nonce + "b"))
    done = waggle("build", "--on", "web", *builders, cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    found = list(fleet[BUILDER].path("/nix/store").glob(f"*-needs-builder-{nonce}b"))
    assert len(found) == 1, done.stderr


def test_ci_pull_request_plan_uses_the_base_commits_machines_file(fleet, tmp_path):
    # The PR points meta.machinesFile at a machine of its choosing (nothing listens on
    # 127.0.0.254): a pull request's plan must not send builds there. The base commit's
    # machines file is used instead.
    repo = tmp_path / "repo"
    repo.mkdir()
    write_hive(repo, HIVE.format(meta="machinesFile = ./machines;"))
    (repo / "machines").write_text(machines_line(fleet) + "\n")
    (repo / "web.nix").write_text('{ environment.etc.v.text = "web"; }\n')
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    before = rev(repo)
    nonce = uuid.uuid4().hex
    (repo / "web.nix").write_text(NEEDS_BUILDER.format(nonce=nonce))
    (repo / "machines").write_text("ssh://root@127.0.0.254 - - 1 1 waggle-builder\n")
    git(repo, "commit", "-qam", "web needs the builder; another builder")
    after = rev(repo)
    pr = {
        "pull_request": {
            "number": 3,
            "base": {"sha": before, "ref": "main", "repo": {"full_name": "acme/fleet"}},
            "head": {"sha": after, "repo": {"full_name": "acme/fleet"}},
        },
        "repository": {"full_name": "acme/fleet", "default_branch": "main"},
    }
    done = run_ci(repo, github_env(tmp_path, "pull_request", pr, after, "3/merge"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_on_builder(fleet, nonce)
    assert "127.0.0.254" not in done.stdout + done.stderr
    assert "machinesFile of the base commit" in (tmp_path / "summary.md").read_text()


def test_plan_does_not_build_build_on_target_nodes(tmp_path):
    # A buildOnTarget node is built on its host at deploy time; a plan never builds on (or
    # pushes to) hosts, and need not be able to build it here: it is not built, and says so.
    repo = tmp_path / "repo"
    repo.mkdir()
    write_hive(
        repo,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      far = { deployment.buildOnTarget = true; environment.etc.v.text = builtins.readFile ./v; };
      near = { environment.etc.v.text = builtins.readFile ./v; };
    }
    """,
    )
    (repo / "v").write_text("one")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    (repo / "v").write_text(uuid.uuid4().hex)
    git(repo, "commit", "-qam", "two")
    report = tmp_path / "plan.json"
    done = waggle("plan", "--base", "HEAD~1", "--report-json", str(report), cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    nodes = {n["name"]: n for n in json.loads(report.read_text())["nodes"]}
    assert nodes["near"]["built"] is True
    assert nodes["far"]["kind"] == "changed" and nodes["far"]["built"] is None, nodes["far"]
    assert nodes["far"]["build_on_target"] is True and nodes["near"]["build_on_target"] is False
    assert (
        "| far | changed | system derivation changed | on its host at deploy time |" in done.stdout
    )
    assert any("buildOnTarget" in note for note in nodes["far"]["notes"]), nodes["far"]
    assert nodes["far"]["packages"] is not None  # the diff is still there


def test_a_missing_machines_file_is_named(tmp_path):
    # Nix silently uses no builders when the machines file is not there: Waggle says so.
    repo = tmp_path / "repo"
    nonce = plan_repo(repo, "machinesFile = ./no-such-machines;")
    (repo / "web.nix").write_text('{ environment.etc.v.text = "' + nonce + '"; }\n')
    git(repo, "commit", "-qam", "web without the builder")
    report = tmp_path / "plan.json"
    done = waggle("plan", "--base", "HEAD~1", "--report-json", str(report), cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    notes = json.loads(report.read_text())["notes"]
    assert any("no-such-machines is not a file" in n for n in notes), notes
    done = waggle("build", "--on", "db", cwd=repo)
    assert done.returncode == 0, done.stderr
    assert "no-such-machines is not a file: no remote builders from it" in done.stderr
