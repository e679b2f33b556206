"""The application layer (runner/app): typed requests in, results out; no argparse below the CLI.

Real nix evaluates and builds the stand-in's systems; hosts are fakes where the point is
what the layer does with a host that misbehaves, not the host.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runner.app import ci as ci_app
from runner.app import watch as watch_app
from runner.app.requests import (
    ApplyRequest,
    CiRequest,
    HiveRef,
    Reports,
    WatchRequest,
    parse_node_limit,
)
from runner.app.run import apply
from runner.deploy.pipeline import DeploySettings
from runner.errors import UsageError
from runner.evaluate import EvalSettings
from runner.gitops.config import CiConfig, RolloutConfig
from runner.gitops.watch import WatchResult
from runner.goals import Goal
from runner.hosts import LineCallback, RemoteResult
from runner.results import RunSummary, Stage
from tests.conftest import write_hive

HIVE = """
let pkgs = import @NIXPKGS@ { }; in
{ meta.nixpkgs = pkgs; } // builtins.listToAttrs (map (i: {
  name = "n${toString i}";
  value = { name, ... }: { networking.hostName = name; };
}) (builtins.genList (i: i + 1) 3))
"""


@dataclass
class HasEverything:
    """A host that has every path already; `bug` makes its commands raise a plain exception."""

    name: str
    bug: bool = False
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
        if self.bug:
            raise KeyError("a bug in a host implementation")
        return RemoteResult(tuple(argv), 0, "", "", 0.01)

    async def run_fed(
        self, argv: Sequence[str], chunks: AsyncIterator[bytes], *, timeout=None, privileged=True
    ) -> RemoteResult:
        raise AssertionError("nothing should be sent")

    async def write_file(self, path: str, data: bytes, *, mode: int, timeout=None) -> None:
        raise AssertionError("no keys here")

    async def close(self) -> None:
        return None


def test_a_host_raising_a_plain_exception_fails_its_node_alone_and_reports_are_written(
    tmp_path,
):
    write_hive(tmp_path, HIVE)
    xml, md, js = tmp_path / "out" / "r.xml", tmp_path / "r.md", tmp_path / "r.json"
    reports = Reports(junit=xml, markdown=md, json=js)
    request = ApplyRequest(
        hive=HiveRef(cwd=tmp_path),
        eval=EvalSettings(node_limit=0),
        deploy=DeploySettings(goal=Goal.PUSH, substitute=False),
        reports=reports,
        host_factory=lambda c: HasEverything(c.name, bug=c.name == "n2"),
    )
    summary = asyncio.run(apply(request))
    by_name = {n.name: n for n in summary.nodes}
    assert by_name["n1"].ok and by_name["n3"].ok
    failure = by_name["n2"].failure
    assert failure is not None and failure.stage is Stage.PUSH
    assert failure.message.startswith("internal error: KeyError:")
    assert "Traceback" in failure.detail
    data = json.loads(js.read_text())
    assert [n["status"] for n in data["nodes"]] == ["ok", "failed", "ok"]
    assert "internal error" in xml.read_text()
    assert "n2" in md.read_text()


def test_ci_derives_its_run_request_from_the_flags_and_waggle_yaml():
    flags = ApplyRequest(
        hive=HiveRef(config=None, cwd=Path("/x")),
        deploy=DeploySettings(parallel=10),
    )
    config = CiConfig(
        hive="fleet/hive.nix",
        on="@web",
        parallel=3,
        eval_node_limit="4",
        junit=Path("j.xml"),
        report_md=Path("r.md"),
    )
    request = ci_app.apply_request(
        CiRequest(apply=flags, reports=Reports(json=Path("r.json"))), config
    )
    assert request.hive.config == "fleet/hive.nix"
    assert request.on == "@web"
    assert request.deploy.parallel == 3  # no --parallel given: the file's
    assert request.eval.node_limit == 4
    assert request.reports == Reports(Path("j.xml"), Path("r.md"), Path("r.json"))
    assert request.command == "ci"
    # A flag given on the command line wins over the file.
    given = ci_app.apply_request(CiRequest(apply=flags, parallel_given=True), config)
    assert given.deploy.parallel == 10
    with_hive = ApplyRequest(hive=HiveRef(config="mine.nix", cwd=Path("/x")))
    assert ci_app.apply_request(CiRequest(apply=with_hive), config).hive.config == "mine.nix"


def test_ci_takes_the_rollout_from_waggle_yaml_where_no_flag_was_given():
    rollout = RolloutConfig(
        waves=("1", "10%", "100%"), max_failures="2", confirm_timeout=45.0, health_checks=False
    )
    config = CiConfig(rollout=rollout)
    deploy = ci_app.apply_request(CiRequest(apply=ApplyRequest()), config).deploy
    assert (deploy.waves, deploy.max_failures, deploy.confirm_timeout) == (
        ("1", "10%", "100%"),
        "2",
        45.0,
    )
    assert deploy.health_checks is False
    # Flags win: --waves, --max-failures, --confirm-timeout given (even at their defaults).
    flags = ApplyRequest(
        deploy=DeploySettings(waves=("1", "100%"), max_failures="0", confirm_timeout=30.0)
    )
    given = CiRequest(apply=flags, max_failures_given=True, confirm_timeout_given=True)
    deploy = ci_app.apply_request(given, config).deploy
    assert (deploy.waves, deploy.max_failures, deploy.confirm_timeout) == (("1", "100%"), "0", 30.0)
    # health_checks: true in the file cannot undo --no-health-checks
    no_checks = ApplyRequest(deploy=DeploySettings(health_checks=False))
    on = CiConfig(rollout=RolloutConfig(health_checks=True))
    assert ci_app.apply_request(CiRequest(apply=no_checks), on).deploy.health_checks is False
    # Nothing in the file: the flags' settings as they are.
    plain = ci_app.apply_request(CiRequest(apply=flags), CiConfig()).deploy
    assert plain == flags.deploy


def test_ci_deploys_with_a_request_of_its_own(monkeypatch, tmp_path):
    seen: list[ApplyRequest] = []

    async def fake_apply(request: ApplyRequest) -> RunSummary:
        seen.append(request)
        return RunSummary("ci", str(request.goal), "h", None, 0.0, 0.0, (), ())

    monkeypatch.setattr(ci_app, "apply", fake_apply)
    env = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_EVENT_NAME": "push",
        "GITHUB_REF": "refs/heads/main",
        "GITHUB_REF_NAME": "main",
        "GITHUB_SHA": "b" * 40,
        "GITHUB_REPOSITORY": "o/r",
        "GITHUB_OUTPUT": str(tmp_path / "out"),
    }
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"before": "a" * 40, "repository": {"default_branch": "main"}}))
    env["GITHUB_EVENT_PATH"] = str(event)
    printed: list[str] = []
    printer = ci_app.CiPrinter(
        printed.append, lambda _, text: printed.append(text), lambda s: printed.append(s.goal)
    )
    request = CiRequest(apply=ApplyRequest(hive=HiveRef(cwd=tmp_path)))
    outcome = asyncio.run(ci_app.run_ci(request, printer, env))
    assert outcome.mode == "deploy" and outcome.ok
    (run,) = seen
    assert run.goal is Goal.SWITCH
    assert run.changes is not None and run.changes.since == "a" * 40
    assert run.command == "ci"
    assert any(line.startswith("waggle ci:") for line in printed)


def test_watch_applies_each_commit_with_a_request_of_its_own(monkeypatch, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    write_hive(tree, HIVE)
    seen: list[ApplyRequest] = []

    async def fake_apply(request: ApplyRequest) -> RunSummary:
        seen.append(request)
        return RunSummary("watch", "switch", "h", None, 0.0, 0.0, (), ())

    async def fake_watch(settings, deploy_commit, *, stop):
        summary = await deploy_commit("c" * 40, tree)
        assert summary.commit == "c" * 40
        return WatchResult((), (), ())

    monkeypatch.setattr(watch_app, "apply", fake_apply)
    monkeypatch.setattr(watch_app, "watch", fake_watch)
    template = ApplyRequest(
        hive=HiveRef(cwd=tmp_path),
        deploy=DeploySettings(goal=Goal.BUILD, parallel=4),
        reports=Reports(json=tmp_path / "r.json"),
    )
    outcome = asyncio.run(watch_app.run_watch(WatchRequest(repo=tmp_path, apply=template)))
    assert outcome.stopped_by is None
    (run,) = seen
    assert run.hive.config == str(tree / "hive.nix") and run.hive.cwd == tree
    assert run.goal is Goal.SWITCH and run.deploy.parallel == 4
    assert run.reports == Reports()  # watch writes its own per commit
    assert run.command == "watch" and run.changes is None


@pytest.mark.parametrize(("text", "limit"), [("auto", None), ("0", 0), (" 7 ", 7)])
def test_parse_node_limit(text, limit):
    assert parse_node_limit(text) == limit


@pytest.mark.parametrize("text", ["-1", "many", ""])
def test_parse_node_limit_refuses(text):
    with pytest.raises(UsageError, match="--eval-node-limit"):
        parse_node_limit(text)
