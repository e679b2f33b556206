"""`apply --changed-since`: only affected and drifted hosts are deployed (real fleet, real git)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import waggle

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
    done = waggle("apply", "--changed-since", "HEAD", *ssh, "-v", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert outcome(done) == {"host1": "unchanged", "host2": "unchanged", "host3": "ok"}
    assert "host3: deploying (drift" in done.stderr
    assert fleet["host3"].resolve("/etc/v").read_text() == "host3 one"
