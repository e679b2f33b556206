"""`waggle plan` through the CLI, on a real git repository."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import write_hive
from tests.helpers import waggle

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, ... }: { networking.hostName = name; };
  alpha = import ./alpha.nix;
  beta = { environment.etc.beta.text = "beta"; };
}
"""


def git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_plan_names_the_changed_node(tmp_path):
    write_hive(tmp_path, HIVE)
    (tmp_path / "alpha.nix").write_text(
        "{ pkgs, ... }: { environment.systemPackages = [ pkgs.hello ]; }\n"
    )
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    (tmp_path / "alpha.nix").write_text(
        "{ pkgs, ... }: { environment.systemPackages = [ pkgs.hello pkgs.jq ]; }\n"
    )
    (tmp_path / "README.md").write_text("docs only\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "second")
    done = waggle(
        "plan",
        "--base",
        "HEAD~1",
        "--json",
        str(tmp_path / "plan.json"),
        "--junit",
        str(tmp_path / "plan.xml"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "alpha" in done.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    kinds = {n["name"]: n["kind"] for n in plan["nodes"]}
    assert kinds == {"alpha": "changed", "beta": "unchanged"}
    assert "jq" in (tmp_path / "plan.json").read_text()
    assert (tmp_path / "plan.xml").read_text().startswith("<?xml")
    # A base that stays unknown: every node is affected, and the plan says why.
    unknown = waggle("plan", "--base", "no-such-rev", "--no-build", cwd=tmp_path)
    assert unknown.returncode == 0, unknown.stderr
    assert "no-such-rev is not in the repository" in unknown.stdout
    assert "Traceback" not in unknown.stderr
