"""Remote commands per host (issue 11 item 7): real nix, real sshd hosts (tests/fleet.py).

Every remote command is a new channel through the host's login shell, so each costs a shell
start-up there. Counted through the Host layer: `CountingHost` is an SshHost (so the host
lock is taken as in a real run) that records every command it starts on its connection,
the host lock's long-lived channel included. The magic rollback's confirmation runs over a
new connection by design; it is counted separately (`fresh_host`). Rollback and locks are
at their defaults.

- a first deploy runs at most 4 commands per host (the lock channel, which also answers the
  query: validity of the closure and the current system; the import; the launch; the
  follow, which also removes the run directory), a no-op exactly 1 (the lock channel);
- a changed deploy runs at most 4 on the run's connection plus 1 on the confirmation's;
- a host whose own substituter has some of the closure fetches it (paths_substituted),
  still within 4 commands: the substitution is part of the import command.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from typing_extensions import override

from runner.build import BuildSettings
from runner.deploy import confirm
from runner.deploy.pipeline import DeploySettings, deploy
from runner.evaluate import EvalSettings
from runner.goals import Goal
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.hive.model import NodeConfig
from runner.hosts import Host, LineCallback, RemoteResult
from runner.hosts.ssh import SshHost, SshSettings, ssh_host_for
from runner.nix import NixFlags
from runner.results import NodeResult, Status
from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet

pytestmark = needs_fleet()

NAMES = ("rt1", "rt2")

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, pkgs, ... }: {
    networking.hostName = name;
    environment.systemPackages = [ pkgs.hello ];
    environment.etc.release.text = "@RELEASE@";
  };
@NODES@
}
"""


class CountingHost(SshHost):
    """An SshHost recording each remote command it starts (the first words of its script)."""

    commands: list[str]

    @override
    def __post_init__(self) -> None:
        super().__post_init__()
        self.commands = []

    def _note(self, argv: Sequence[str]) -> None:
        words = list(argv)
        if words[:2] == ["sh", "-c"]:  # a script: its first line of code says which
            code = [line for line in words[2].splitlines() if line.strip()]
            words = ["sh", "-c", code[0][:60] if code else ""]
        self.commands.append(" ".join(words)[:100])

    @override
    async def run(
        self,
        argv: Sequence[str],
        *,
        input_data: bytes | None = None,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult:
        self._note(argv)
        return await super().run(
            argv, input_data=input_data, timeout=timeout, privileged=privileged, on_line=on_line
        )

    @override
    async def run_fed(
        self,
        argv: Sequence[str],
        chunks: AsyncIterator[bytes],
        *,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult:
        self._note(argv)
        return await super().run_fed(
            argv, chunks, timeout=timeout, privileged=privileged, on_line=on_line
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    first = free_first_octet(len(NAMES), 230)
    with Fleet.start(d, len(NAMES), names=list(NAMES), first_octet=first, etc="overlay") as f:
        yield f


def hive_at(directory: Path, release: str, extra: str = "") -> Hive:
    nodes = "\n".join(f'  {n} = {{ deployment.targetHost = "{n}"; {extra} }};' for n in NAMES)
    text = HIVE.replace("@RELEASE@", release).replace("@NODES@", nodes)
    return Hive(locate(str(write_hive(directory, text)), directory), NixFlags())


Counts = dict[str, list[str]]


def run_counted(
    hive: Hive, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, NodeResult], Counts, Counts]:
    """Deploy (switch, defaults otherwise): results, commands per host on the run's
    connection, and on confirmation connections."""
    ssh = SshSettings(config_files=(str(fleet.ssh_config),))
    counted: Counts = {}
    confirmations: Counts = {}

    def factory(config: NodeConfig) -> Host:
        host = CountingHost(ssh_host_for(config, ssh).target, ssh)
        counted[config.name] = host.commands
        return host

    def fresh(host: Host) -> Host | None:
        assert isinstance(host, SshHost)
        again = CountingHost(host.target, host.settings)
        again.commands = confirmations.setdefault(host.name, [])
        return again

    monkeypatch.setattr(confirm, "fresh_host", fresh)

    async def main() -> dict[str, NodeResult]:
        names = await hive.node_names()
        configs = await hive.deployment(names)
        run = await deploy(
            hive,
            configs,
            names,
            EvalSettings(),
            BuildSettings(),
            DeploySettings(goal=Goal.SWITCH, ssh=ssh, activation_timeout=60),
            host_factory=factory,
        )
        return {r.name: r for r in run.nodes}

    results = asyncio.run(asyncio.wait_for(main(), 300))
    return results, counted, confirmations


def statuses(result: NodeResult) -> dict[str, Status]:
    return {str(s.stage): s.status for s in result.stages}


def test_first_deploy_runs_at_most_4_commands_per_host_and_a_noop_1(fleet, tmp_path, monkeypatch):
    hive = hive_at(tmp_path, uuid.uuid4().hex)
    results, counted, confirmations = run_counted(hive, fleet, monkeypatch)
    for name in NAMES:
        assert results[name].ok, results[name].failure
        assert len(counted[name]) <= 4, counted[name]
    assert confirmations == {}  # a first deploy has nothing to roll back to

    results, counted, confirmations = run_counted(hive, fleet, monkeypatch)
    for name in NAMES:
        assert results[name].ok, results[name].failure
        assert statuses(results[name])["activate"] is Status.SKIPPED  # unchanged
        assert len(counted[name]) == 1, counted[name]
    assert confirmations == {}

    # A change: the same 4 commands on the run's connection, plus the confirmation's.
    results, counted, confirmations = run_counted(
        hive_at(tmp_path, uuid.uuid4().hex), fleet, monkeypatch
    )
    for name in NAMES:
        assert results[name].ok, results[name].failure
        assert statuses(results[name])["confirm"] is Status.OK
        assert len(counted[name]) <= 4, counted[name]
        assert len(confirmations[name]) == 1, confirmations[name]


def test_a_host_substitutes_from_its_own_cache_within_the_same_commands(
    fleet, tmp_path, monkeypatch
):
    # A source file in the closure (added to the store here, not built): a binary cache can
    # have it. rt1's own substituter (a file:// cache) does; rt2 has no substituter.
    note = tmp_path / "note.txt"
    note.write_text(f"note-{uuid.uuid4().hex}\n")
    added = subprocess.run(
        ["nix-store", "--add", str(note)], capture_output=True, text=True, check=True
    ).stdout.strip()
    cache = tmp_path / "cache"
    subprocess.run(
        ["nix", "copy", "--to", f"file://{cache}", added], capture_output=True, check=True
    )
    conf = fleet["rt1"].path("/etc/nix/nix.conf")
    before = conf.read_text()
    conf.write_text(before + f"substituters = file://{cache}\nrequire-sigs = false\n")
    try:
        hive = hive_at(tmp_path, uuid.uuid4().hex, "environment.etc.note.source = ./note.txt;")
        results, counted, _ = run_counted(hive, fleet, monkeypatch)
    finally:
        conf.write_text(before)
    for name in NAMES:
        assert results[name].ok, results[name].failure
        assert len(counted[name]) <= 4, counted[name]
        assert fleet[name].path(added).is_file()
    facts: dict[str, dict[str, Any]] = {
        name: dict(next(s for s in results[name].stages if str(s.stage) == "push").facts)
        for name in NAMES
    }
    assert facts["rt1"]["paths_substituted"] == 1, facts
    assert facts["rt1"]["paths_sent"] == facts["rt2"]["paths_sent"] - 1, facts
    assert facts["rt2"]["paths_substituted"] == 0, facts
    print(json.dumps({n: counted[n] for n in NAMES}, indent=1))
