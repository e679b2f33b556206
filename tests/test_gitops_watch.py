"""`waggle watch`: polling a real bare repository, deploying new heads, metrics and reports."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pygit2
import pytest
from pygit2.enums import Option
from typing_extensions import override

from runner import cli
from runner.app import watch as watch_app
from runner.app.requests import ApplyRequest, HiveRef, WatchRequest
from runner.deploy.pipeline import DeploySettings
from runner.errors import EXIT_NODES_FAILED, UsageError
from runner.gitops.changes import GitError
from runner.gitops.watch import WatchResult, WatchSettings, watch
from runner.goals import Goal
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status
from tests.test_gitops_metrics import parse_metrics

pytestmark = pytest.mark.timeout(60)

TICK = 0.05  # the watcher's interval in these tests


# -- git helpers -----------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.org", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


@dataclass
class Remote:
    bare: Path
    dev: Path  # the developer's clone, pushing
    clone: Path  # the watcher's clone, fetching
    counter: int = 0

    def push(self, message: str, files: dict[str, str] | None = None) -> str:
        self.counter += 1
        for rel, text in (files or {f"n{self.counter}.nix": f"{message}\n"}).items():
            path = self.dev / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git(self.dev, "add", "-A")
        git(self.dev, "commit", "-q", "-m", message)
        git(self.dev, "push", "-q", "origin", "HEAD:main")
        return git(self.dev, "rev-parse", "HEAD")

    def force_push_sibling(self, message: str) -> str:
        """Replace main by a commit that does not descend from the current head."""
        git(self.dev, "reset", "-q", "--hard", "HEAD~1")
        (self.dev / "sibling.nix").write_text(message + "\n")
        git(self.dev, "add", "-A")
        git(self.dev, "commit", "-q", "-m", message)
        git(self.dev, "push", "-q", "--force", "origin", "HEAD:main")
        return git(self.dev, "rev-parse", "HEAD")

    async def apush(self, message: str, files: dict[str, str] | None = None) -> str:
        return await asyncio.to_thread(self.push, message, files)


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    bare = tmp_path / "fleet.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    dev = tmp_path / "dev"
    git(tmp_path, "clone", "-q", str(bare), str(dev))
    git(dev, "checkout", "-q", "-b", "main")
    r = Remote(bare, dev, tmp_path / "watcher")
    r.push("init", {"hive.nix": "{ }\n"})
    git(tmp_path, "clone", "-q", str(bare), str(r.clone))
    return r


# -- a fake deploy ---------------------------------------------------------------------------


def node(name: str, status: str) -> NodeResult:
    stages: tuple[StageResult, ...]
    if status == "failed":
        stages = (StageResult(Stage.ACTIVATE, Status.FAILED, 0.1, "exit 4"),)
    elif status == "unchanged":
        stages = (
            StageResult(Stage.BUILD, Status.OK, 0.1),
            StageResult(Stage.ACTIVATE, Status.SKIPPED, 0.0, "unchanged"),
        )
    else:
        stages = (
            StageResult(Stage.BUILD, Status.OK, 0.1),
            StageResult(Stage.ACTIVATE, Status.OK, 0.2),
        )
    return NodeResult(name, stages)


@dataclass
class FakeDeploy:
    """Records (sha, {file: text}) of each deploy; `gate`, when set up, holds deploys until
    it is set; `nodes` are the node results each deploy returns."""

    nodes: tuple[tuple[str, str], ...] = (("web", "ok"),)
    gate: asyncio.Event | None = None
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    concurrent: int = 0
    most_concurrent: int = 0

    async def __call__(self, sha: str, directory: Path) -> RunSummary:
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            files = {
                str(p.relative_to(directory)): p.read_text()
                for p in sorted(directory.rglob("*"))
                if p.is_file()
            }
            self.calls.append((sha, files))
            self.dirs.append(directory)
            if self.gate is not None:
                await self.gate.wait()
            self.finished.append(sha)
            return RunSummary(
                command="watch",
                goal="switch",
                hive=str(directory),
                commit=sha,
                started_at=time.time(),
                seconds=0.01,
                stages=(Stage.BUILD, Stage.ACTIVATE),
                nodes=tuple(node(n, s) for n, s in self.nodes),
            )
        finally:
            self.concurrent -= 1


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def settings(fleet: Remote, tmp_path: Path, /, **kw: object) -> WatchSettings:
    base: dict[str, object] = {
        "repo": fleet.clone,
        "interval": TICK,
        "reports_dir": tmp_path / "reports",
        "metrics_file": tmp_path / "metrics" / "waggle.prom",
        "fetch_timeout": 10.0,
    }
    base.update(kw)
    return WatchSettings(**base)  # type: ignore[arg-type]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    @override
    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_logger() -> tuple[logging.Logger, Lines]:
    logger = logging.getLogger(f"waggle.test.{time.monotonic_ns()}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    return logger, handler


test_logger.__test__ = False  # type: ignore[attr-defined]


def run(scenario: Callable[[], Awaitable[WatchResult]]) -> WatchResult:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def head_files(remote: Remote, sha: str) -> dict[str, str]:
    names = git(remote.dev, "ls-tree", "-r", "--name-only", sha).splitlines()
    return {n: git(remote.dev, "show", f"{sha}:{n}") + "\n" for n in names}


# -- the watcher -------------------------------------------------------------------------------


def test_commits_pushed_one_after_another_are_deployed_in_order(remote, tmp_path):
    first = git(remote.dev, "rev-parse", "HEAD")
    shas = [first]

    async def scenario() -> WatchResult:
        deploy = FakeDeploy()
        stop = asyncio.Event()
        task = asyncio.create_task(watch(settings(remote, tmp_path), deploy, stop=stop))
        await until(lambda: len(deploy.finished) == 1)
        shas.append(await remote.apush("commit 2", {"hosts/h2.nix": "h2\n"}))
        await until(lambda: len(deploy.finished) == 2)
        shas.append(
            await remote.apush("commit 3", {"hosts/h3.nix": "h3\n", "hive.nix": "{ x = 1; }\n"})
        )
        await until(lambda: len(deploy.finished) == 3)
        stop.set()
        result = await task
        assert [c[0] for c in deploy.calls] == shas
        for sha, files in deploy.calls:
            assert files == head_files(remote, sha)
        assert all(not d.exists() for d in deploy.dirs)  # checkouts are removed
        assert deploy.most_concurrent == 1
        return result

    result = run(scenario)
    assert result.commits == tuple(shas)
    assert all(d.ok for d in result.deployed)
    assert result.refused == () and result.fetch_errors == ()


def test_two_commits_during_one_deploy_give_one_further_deploy_of_the_latest(remote, tmp_path):
    first = git(remote.dev, "rev-parse", "HEAD")

    async def scenario() -> tuple[WatchResult, list[str]]:
        gate = asyncio.Event()
        deploy = FakeDeploy(gate=gate)
        stop = asyncio.Event()
        task = asyncio.create_task(watch(settings(remote, tmp_path), deploy, stop=stop))
        await until(lambda: len(deploy.calls) == 1)
        second = await remote.apush("second")
        third = await remote.apush("third")
        await asyncio.sleep(5 * TICK)  # the watcher would fetch now if it were not deploying
        assert len(deploy.calls) == 1
        gate.set()
        await until(lambda: len(deploy.finished) == 2)
        await asyncio.sleep(6 * TICK)  # several more polls: nothing new to deploy
        stop.set()
        result = await task
        assert deploy.most_concurrent == 1
        assert second not in [c[0] for c in deploy.calls]
        return result, [first, third]

    result, expected = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert list(result.commits) == expected


def test_force_push_to_a_non_descendant_is_refused(remote, tmp_path):
    logger, lines = test_logger()

    async def scenario() -> tuple[WatchResult, str, str]:
        deploy = FakeDeploy()
        stop = asyncio.Event()
        s = settings(remote, tmp_path)
        task = asyncio.create_task(watch(s, deploy, stop=stop, log=logger))
        await until(lambda: len(deploy.finished) == 1)
        second = await remote.apush("second")
        await until(lambda: len(deploy.finished) == 2)
        sibling = await asyncio.to_thread(remote.force_push_sibling, "rewritten")
        await until(lambda: any("refused" in line for line in lines.lines))
        await asyncio.sleep(5 * TICK)  # refused once, not once per poll
        stop.set()
        return await task, second, sibling

    result, second, sibling = run_tuple(scenario)
    assert result.commits[-1] == second
    assert result.refused == (sibling,)
    assert sum("refused" in line for line in lines.lines) == 1
    metrics = parse_metrics((tmp_path / "metrics" / "waggle.prom").read_text())
    assert metrics[("waggle_watch_refused_total", ())] == 1
    assert metrics[("waggle_watch_last_commit_info", (("commit", second),))] == 1
    assert not result.ok


def test_force_push_is_deployed_when_allowed(remote, tmp_path):
    async def scenario() -> tuple[WatchResult, str, str]:
        deploy = FakeDeploy()
        stop = asyncio.Event()
        s = settings(remote, tmp_path, allow_non_descendant=True)
        task = asyncio.create_task(watch(s, deploy, stop=stop))
        await until(lambda: len(deploy.finished) == 1)
        second = await remote.apush("second")
        await until(lambda: len(deploy.finished) == 2)
        sibling = await asyncio.to_thread(remote.force_push_sibling, "rewritten")
        await until(lambda: len(deploy.finished) == 3)
        stop.set()
        return await task, second, sibling

    result, second, sibling = run_tuple(scenario)
    assert result.commits[1:] == (second, sibling)
    assert result.refused == ()


def test_fetch_error_is_logged_and_the_watcher_recovers(remote, tmp_path):
    logger, lines = test_logger()
    moved = remote.bare.with_name("moved.git")
    remote.bare.rename(moved)

    async def scenario() -> WatchResult:
        deploy = FakeDeploy()
        stop = asyncio.Event()
        task = asyncio.create_task(watch(settings(remote, tmp_path), deploy, stop=stop, log=logger))
        await until(lambda: sum("fetch failed" in line for line in lines.lines) >= 2)
        assert not task.done()
        metrics = parse_metrics((tmp_path / "metrics" / "waggle.prom").read_text())
        assert metrics[("waggle_watch_fetch_errors_total", ())] >= 1
        moved.rename(remote.bare)
        await until(lambda: len(deploy.finished) == 1)
        stop.set()
        return await task

    result = run(scenario)
    assert result.commits == (git(remote.dev, "rev-parse", "HEAD"),)
    assert len(result.fetch_errors) >= 2
    assert "fetching main from origin failed" in result.fetch_errors[0]
    assert sum("fetch failed" in line for line in lines.lines) == len(result.fetch_errors)


def test_stop_during_a_deploy_lets_it_finish(remote, tmp_path):
    logger, lines = test_logger()

    async def scenario() -> WatchResult:
        gate = asyncio.Event()
        deploy = FakeDeploy(gate=gate)
        stop = asyncio.Event()
        task = asyncio.create_task(watch(settings(remote, tmp_path), deploy, stop=stop, log=logger))
        await until(lambda: len(deploy.calls) == 1)
        stop.set()
        await asyncio.sleep(5 * TICK)
        assert not task.done()  # still deploying
        await remote.apush("arrives while stopping")
        gate.set()
        result = await asyncio.wait_for(task, timeout=5)
        assert deploy.finished == [deploy.calls[0][0]]
        return result

    result = run(scenario)
    assert len(result.deployed) == 1 and result.deployed[0].ok
    assert lines.lines[-1] == "watch: stopping"
    assert sum("stop requested; waiting for the deploy" in line for line in lines.lines) == 1
    assert len(result.deployed) == 1  # the commit pushed while stopping is left for next time


def test_cancelling_the_watcher_waits_for_the_deploy_in_flight(remote, tmp_path):
    async def scenario() -> None:
        gate = asyncio.Event()
        deploy = FakeDeploy(gate=gate)
        task = asyncio.create_task(watch(settings(remote, tmp_path), deploy))
        await until(lambda: len(deploy.calls) == 1)
        task.cancel()
        await asyncio.sleep(5 * TICK)
        assert not task.done()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)
        assert len(deploy.finished) == 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_stop_while_sleeping_returns_promptly(remote, tmp_path):
    async def scenario() -> float:
        deploy = FakeDeploy()
        stop = asyncio.Event()
        task = asyncio.create_task(
            watch(settings(remote, tmp_path, interval=60), deploy, stop=stop)
        )
        await until(lambda: len(deploy.finished) == 1)
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        return time.monotonic() - t0

    assert asyncio.run(scenario()) < 1.0


def test_once_deploys_the_head_and_returns_and_keeps_no_state(remote, tmp_path):
    head = git(remote.dev, "rev-parse", "HEAD")

    async def scenario() -> WatchResult:
        return await watch(settings(remote, tmp_path, once=True, interval=60), FakeDeploy())

    assert run(scenario).commits == (head,)
    assert run(scenario).commits == (head,)  # stateless: a restart deploys the head again
    assert len(list((tmp_path / "reports").iterdir())) == 2


def test_a_deploy_that_raises_is_recorded_and_the_watcher_goes_on(remote, tmp_path):
    calls: list[str] = []

    async def broken(sha: str, directory: Path) -> RunSummary:
        calls.append(sha)
        raise GitError("hive.nix does not evaluate")

    async def scenario() -> WatchResult:
        stop = asyncio.Event()
        task = asyncio.create_task(watch(settings(remote, tmp_path), broken, stop=stop))
        await until(lambda: len(calls) == 1)
        await remote.apush("fix")
        await until(lambda: len(calls) == 2)
        stop.set()
        return await task

    result = run(scenario)
    assert len(result.deployed) == 2
    assert not result.deployed[0].ok
    assert "does not evaluate" in result.deployed[0].error
    report = result.deployed[0].report_dir
    assert report is not None and "does not evaluate" in (report / "error.txt").read_text()
    metrics = parse_metrics((tmp_path / "metrics" / "waggle.prom").read_text())
    assert metrics[("waggle_watch_last_deploy_success", ())] == 0
    assert metrics[("waggle_watch_deploy_failures_total", ())] == 2


def test_a_second_watcher_on_the_same_clone_is_refused(remote, tmp_path):
    async def scenario() -> None:
        gate = asyncio.Event()
        deploy = FakeDeploy(gate=gate)
        task = asyncio.create_task(watch(settings(remote, tmp_path), deploy))
        await until(lambda: len(deploy.calls) == 1)
        with pytest.raises(UsageError, match="another waggle watch"):
            await watch(settings(remote, tmp_path, once=True), FakeDeploy())
        gate.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_missing_remote_is_a_usage_error(remote, tmp_path):
    with pytest.raises(UsageError, match="no remote 'upstream'"):
        asyncio.run(watch(settings(remote, tmp_path, remote="upstream", once=True), FakeDeploy()))


def test_a_hanging_fetch_is_bounded_and_the_watcher_goes_on(remote, tmp_path):
    """A remote that accepts the connection and never answers: each fetch ends after
    fetch_timeout, is counted, and stop still returns at once."""
    logger, lines = test_logger()

    async def scenario() -> tuple[WatchResult, float]:
        held: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # never answer

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        await asyncio.to_thread(
            git, remote.clone, "remote", "set-url", "origin", f"http://127.0.0.1:{port}/f.git"
        )
        stop = asyncio.Event()
        s = settings(remote, tmp_path, fetch_timeout=0.3)
        task = asyncio.create_task(watch(s, FakeDeploy(), stop=stop, log=logger))
        await until(lambda: sum("fetch failed" in line for line in lines.lines) >= 2)
        t0 = time.monotonic()
        stop.set()
        result = await asyncio.wait_for(task, timeout=5)
        took = time.monotonic() - t0
        for w in held:
            w.close()
        server.close()
        return result, took

    result, took = run_tuple(scenario)
    assert result.commits == ()
    assert len(result.fetch_errors) >= 2
    assert took < 1.0
    assert pygit2.option(Option.GET_SERVER_TIMEOUT) == 0  # restored after the watcher


# -- metrics and reports ---------------------------------------------------------------------


def test_metrics_file_and_reports_per_commit(remote, tmp_path):
    weird = 'odd "node"\\x\ny'
    nodes = (("web", "ok"), ("db", "failed"), ("cache", "unchanged"), (weird, "ok"))
    shas = [git(remote.dev, "rev-parse", "HEAD")]

    async def scenario() -> WatchResult:
        deploy = FakeDeploy(nodes=nodes)
        stop = asyncio.Event()
        task = asyncio.create_task(watch(settings(remote, tmp_path), deploy, stop=stop))
        await until(lambda: len(deploy.finished) == 1)
        shas.append(await remote.apush("second"))
        await until(lambda: len(deploy.finished) == 2)
        stop.set()
        return await task

    before = time.time()
    result = run(scenario)
    text = (tmp_path / "metrics" / "waggle.prom").read_text()
    metrics = parse_metrics(text)
    assert metrics[("waggle_watch_deploys_total", ())] == 2
    assert metrics[("waggle_watch_deploy_failures_total", ())] == 2  # db failed each time
    assert metrics[("waggle_watch_fetch_errors_total", ())] == 0
    assert metrics[("waggle_watch_refused_total", ())] == 0
    assert metrics[("waggle_watch_last_deploy_success", ())] == 0
    assert metrics[("waggle_watch_last_commit_info", (("commit", shas[1]),))] == 1
    assert not any(
        k[0] == "waggle_watch_last_commit_info" and k[1][0][1] == shas[0] for k in metrics
    )
    stamp = metrics[("waggle_watch_last_deploy_timestamp_seconds", ())]
    assert before <= stamp <= time.time()
    assert before <= metrics[("waggle_watch_last_fetch_timestamp_seconds", ())] <= time.time()
    statuses = {k[1]: v for k, v in metrics.items() if k[0] == "waggle_watch_node_status"}
    assert statuses == {
        (("node", "web"), ("status", "ok")): 1,
        (("node", "db"), ("status", "failed")): 1,
        (("node", "cache"), ("status", "unchanged")): 1,
        (("node", weird), ("status", "ok")): 1,
    }
    assert "\\n" in text and '\\"' in text
    assert not list((tmp_path / "metrics").glob("*.tmp"))  # written atomically, no leftovers

    dirs = sorted((tmp_path / "reports").iterdir())
    assert len(dirs) == 2
    for directory, sha, record in zip(dirs, shas, result.deployed, strict=True):
        assert directory.name.endswith("-" + sha[:12])
        assert re.fullmatch(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{12}", directory.name)
        assert record.report_dir == directory
        assert {p.name for p in directory.iterdir()} == {"junit.xml", "report.md", "report.json"}
        assert sha in (directory / "report.json").read_text()


def test_metrics_before_any_deploy_have_counters_only(remote, tmp_path):
    remote.bare.rename(remote.bare.with_name("gone.git"))

    async def scenario() -> WatchResult:
        return await watch(settings(remote, tmp_path, once=True), FakeDeploy())

    result = run(scenario)
    assert result.commits == () and len(result.fetch_errors) == 1
    metrics = parse_metrics((tmp_path / "metrics" / "waggle.prom").read_text())
    assert {k[0] for k in metrics} == {
        "waggle_watch_deploys_total",
        "waggle_watch_deploy_failures_total",
        "waggle_watch_fetch_errors_total",
        "waggle_watch_refused_total",
    }
    assert metrics[("waggle_watch_fetch_errors_total", ())] == 1


# -- small pieces ------------------------------------------------------------------------------


def test_settings_are_checked(tmp_path):
    with pytest.raises(UsageError):
        WatchSettings(repo=tmp_path, interval=0)
    with pytest.raises(UsageError):
        WatchSettings(repo=tmp_path, fetch_timeout=-1)
    assert WatchSettings(repo=tmp_path, ref="refs/heads/prod").tracking_ref == (
        "refs/remotes/origin/prod"
    )


def run_tuple(scenario):
    return asyncio.run(asyncio.wait_for(scenario(), timeout=30))


# -- waggle watch's deploys (runner.app.watch, the CLI) ----------------------------------------

ROLLOUT_YAML = """rollout:
  waves: [1, 50%, 100%]
  max_failures: 1
  confirm_timeout: 45
  health_checks: false
"""


@dataclass
class Applied:
    """Stands in for `run.apply` in `runner.app.watch`: records each request."""

    requests: list[ApplyRequest] = field(default_factory=list)
    nodes: tuple[NodeResult, ...] = ()

    async def __call__(self, request: ApplyRequest) -> RunSummary:
        self.requests.append(request)
        return RunSummary("watch", "switch", "h", None, 0.0, 0.0, (Stage.ACTIVATE,), self.nodes)


def watch_once(clone: Path, template: ApplyRequest, **kw: object) -> watch_app.WatchOutcome:
    request = WatchRequest(repo=clone, apply=template, once=True, **kw)  # type: ignore[arg-type]
    return asyncio.run(asyncio.wait_for(watch_app.run_watch(request), timeout=30))


def test_watch_deploys_with_the_rollout_of_the_deployed_commits_waggle_yaml(
    remote, tmp_path, monkeypatch
):
    applied = Applied()
    monkeypatch.setattr(watch_app, "apply", applied)
    remote.push("rollout", {"waggle.yaml": ROLLOUT_YAML})
    # The clone's own work tree (still at the first commit) is not what is deployed.
    (remote.clone / "waggle.yaml").write_text("rollout:\n  waves: [2]\n  max_failures: 3\n")
    template = ApplyRequest(hive=HiveRef(cwd=tmp_path), deploy=DeploySettings(parallel=4))
    assert watch_once(remote.clone, template).result.ok
    deploy = applied.requests[-1].deploy
    assert (deploy.waves, deploy.max_failures, deploy.confirm_timeout, deploy.health_checks) == (
        ("1", "50%", "100%"),
        "1",
        45.0,
        False,
    )
    assert deploy.goal is Goal.SWITCH and deploy.parallel == 4
    # Flags given on the command line win, as in `waggle ci` (even at their defaults).
    flags = replace(
        template,
        deploy=DeploySettings(waves=("1", "100%"), max_failures="0", confirm_timeout=30.0),
    )
    given = {"max_failures_given": True, "confirm_timeout_given": True}
    assert watch_once(remote.clone, flags, **given).result.ok
    deploy = applied.requests[-1].deploy
    assert (deploy.waves, deploy.max_failures, deploy.confirm_timeout) == (("1", "100%"), "0", 30.0)
    assert deploy.health_checks is False  # no --no-health-checks: the file's


def test_a_bad_rollout_section_fails_that_commits_deploy_and_the_watcher_goes_on(
    remote, tmp_path, monkeypatch
):
    applied = Applied()
    monkeypatch.setattr(watch_app, "apply", applied)
    bad = remote.push("bad rollout", {"waggle.yaml": "rollout:\n  confirm_timeout: -5\n"})
    reports = tmp_path / "reports"

    async def scenario() -> watch_app.WatchOutcome:
        request = WatchRequest(
            repo=remote.clone, apply=ApplyRequest(), interval=TICK, reports_dir=reports
        )
        task = asyncio.create_task(watch_app.run_watch(request))
        await until(lambda: any(reports.rglob("error.txt")))
        assert applied.requests == []  # nothing of the bad commit was applied
        await remote.apush("fixed", {"waggle.yaml": "rollout:\n  confirm_timeout: 5\n"})
        await until(lambda: len(applied.requests) == 1)
        signal.raise_signal(signal.SIGTERM)  # the watcher stops as under systemd
        return await task

    outcome = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert outcome.stopped_by == signal.SIGTERM
    first, second = outcome.result.deployed
    assert first.commit == bad and not first.ok
    assert first.error == (
        f"ConfigError: waggle.yaml in commit {bad[:12]}: setting 'rollout.confirm_timeout' "
        "must be a number of seconds, more than 0 (got -5)"
    )
    assert second.ok and applied.requests[0].deploy.confirm_timeout == 5.0


def test_watch_never_reads_a_waggle_yaml_outside_the_commits_tree(remote, tmp_path, monkeypatch):
    applied = Applied()
    monkeypatch.setattr(watch_app, "apply", applied)
    outside = tmp_path / "tmp"  # where the commit's tree is checked out (no .git in it)
    outside.mkdir()
    (outside / "waggle.yaml").write_text("rollout:\n  waves: [1]\n  no_such_key: 1\n")
    monkeypatch.setattr(tempfile, "tempdir", str(outside))
    assert watch_once(remote.clone, ApplyRequest()).result.ok
    assert applied.requests[0].deploy == replace(ApplyRequest().deploy, goal=Goal.SWITCH)


def test_watch_debug_prints_internal_errors_tracebacks(remote, monkeypatch, capsys):
    failed = StageResult(
        Stage.ACTIVATE,
        Status.FAILED,
        0.1,
        "internal error: RuntimeError: boom",
        "Traceback (most recent call last):\nRuntimeError: boom",
    )
    monkeypatch.setattr(watch_app, "apply", Applied(nodes=(NodeResult("web", (failed,)),)))
    argv = ["watch", "--once", "--repo", str(remote.clone)]
    assert cli.run(argv) == EXIT_NODES_FAILED
    assert "Traceback" not in capsys.readouterr().err
    assert cli.run([*argv, "--debug"]) == EXIT_NODES_FAILED
    err = capsys.readouterr().err
    assert "waggle: node web, stage activate:" in err
    assert "waggle: Traceback (most recent call last):" in err


def test_rollout_flags_given_to_waggle_watch_win_over_the_commits_file(remote, monkeypatch):
    applied = Applied()
    monkeypatch.setattr(watch_app, "apply", applied)
    remote.push("rollout", {"waggle.yaml": ROLLOUT_YAML})
    argv = ["watch", "--once", "--repo", str(remote.clone)]
    assert cli.run([*argv, "--max-failures", "0", "--confirm-timeout", "30"]) == 0
    assert cli.run(argv) == 0
    given, not_given = (r.deploy for r in applied.requests)
    assert (given.max_failures, given.confirm_timeout, given.waves) == (
        "0",
        30.0,
        ("1", "50%", "100%"),
    )
    assert (not_given.max_failures, not_given.confirm_timeout) == ("1", 45.0)
