"""--parallel bounds the nodes pushing or activating at once (fake hosts, real nix)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from runner.build import BuildSettings
from runner.deploy.pipeline import DeploySettings, deploy
from runner.evaluate import EvalSettings
from runner.goals import Goal
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.hosts import LineCallback, RemoteResult
from runner.nix import NixFlags
from tests.conftest import write_hive

HIVE = """
let pkgs = import @NIXPKGS@ { }; in
{ meta.nixpkgs = pkgs; } // builtins.listToAttrs (map (i: {
  name = "n${toString i}";
  value = { name, ... }: { networking.hostName = name; };
}) (builtins.genList (i: i + 1) 6))
"""


@dataclass
class Gauge:
    now: int = 0
    most: int = 0


@dataclass
class SlowHost:
    """Has every path already; each command takes a while, so overlaps show."""

    name: str
    gauge: Gauge
    commands: list[str] = field(default_factory=list)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input_data: bytes | None = None,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult:
        self.commands.append(" ".join(argv))
        self.gauge.now += 1
        self.gauge.most = max(self.gauge.most, self.gauge.now)
        await asyncio.sleep(0.2)
        self.gauge.now -= 1
        return RemoteResult(tuple(argv), 0, "", "", 0.2)

    async def run_fed(
        self, argv: Sequence[str], chunks: AsyncIterator[bytes], *, timeout=None, privileged=True
    ) -> RemoteResult:
        raise AssertionError("nothing should be sent")

    async def write_file(self, path: str, data: bytes, *, mode: int, timeout=None) -> None:
        raise AssertionError("no keys here")

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(("parallel", "expected"), [(1, 1), (2, 2), (0, 6)])
def test_parallel_bounds_concurrent_pushes(tmp_path, parallel, expected):
    hive = Hive(locate(str(write_hive(tmp_path, HIVE)), tmp_path), NixFlags())
    gauge = Gauge()

    async def main():
        names = await hive.node_names()
        configs = await hive.deployment(names)
        return await deploy(
            hive,
            configs,
            names,
            EvalSettings(node_limit=0),  # no node limit: every node is ready soon after the other
            BuildSettings(jobs=6),
            DeploySettings(goal=Goal.PUSH, parallel=parallel, substitute=False),
            host_factory=lambda c: SlowHost(c.name, gauge),
        )

    run = asyncio.run(main())
    assert all(r.ok for r in run.nodes), [r.failure for r in run.nodes]
    assert all("nothing to copy" in r.stages[-1].message for r in run.nodes)
    assert gauge.most == expected
