"""`waggle watch`: deploy each new head of a git ref, one deploy at a time, latest wins."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from runner.app.requests import HiveRef, Reports, WatchRequest
from runner.app.run import apply
from runner.errors import UsageError
from runner.gitops.changes import GitError, open_repo
from runner.gitops.config import load_config
from runner.gitops.watch import WatchResult, WatchSettings, watch
from runner.goals import Goal
from runner.hive.discovery import locate
from runner.results import RunSummary


@dataclass(frozen=True)
class WatchOutcome:
    result: WatchResult
    stopped_by: int | None  # the signal that stopped the watcher, if one did


def hive_in_clone(repo: Path, hive_arg: str | None, cwd: Path) -> str | None:
    """`-f` of `waggle watch` as a path inside the clone (each deploy reads it from the
    fetched commit's tree); None: found in the tree as usual. UsageError naming the file
    and the repository when it is not inside the clone."""
    if hive_arg is None:
        return None
    try:
        workdir = open_repo(repo).workdir
    except GitError:
        workdir = None  # watch itself reports a bad --repo
    root = Path(workdir).resolve() if workdir else repo.resolve()
    path = (cwd / hive_arg).resolve()
    if not path.is_relative_to(root):
        what = (
            f"is a flake reference, not a path inside the repository {root}"
            if ":" in hive_arg and not path.exists()
            else f"({path}) is outside the repository {root}"
        )
        raise UsageError(
            f"watch: -f {hive_arg} {what} (--repo): watch deploys the hive of each fetched "
            "commit, so -f must name a file or directory inside the clone"
        )
    rel = path.relative_to(root).as_posix()
    return rel if rel != "." else ""


async def run_watch(
    request: WatchRequest, on_deploy: Callable[[RunSummary], None] | None = None
) -> WatchOutcome:
    """Follow the ref until SIGTERM/SIGINT (which let the deploy in flight finish), or
    for one cycle with `once`. Each deploy is `apply switch` of that commit's hive, with
    the `rollout:` of its waggle.yaml where no flag was given (a bad one fails that
    commit's deploy: the ConfigError names the setting and the file)."""
    settings = WatchSettings(
        repo=request.repo.resolve(),
        remote=request.remote,
        ref=request.ref,
        interval=request.interval,
        reports_dir=request.reports_dir,
        metrics_file=request.metrics_file,
        allow_non_descendant=request.allow_non_descendant,
        once=request.once,
        fetch_timeout=request.fetch_timeout,
    )
    template = request.apply
    rel = hive_in_clone(request.repo, template.hive.config, template.hive.cwd)

    async def deploy_commit(sha: str, tree: Path) -> RunSummary:
        config = str(tree / rel) if rel else str(locate(None, tree).ref)
        # A commit merged on the watched ref is trusted, as in ci's push mode: its
        # waggle.yaml (searched as ci does, never outside the tree) sets the rollout.
        settings = load_config(None, search_from=tree, tree=tree, at=f"in commit {sha[:12]}")
        deploy = settings.rollout.over(
            template.deploy,
            max_failures_given=request.max_failures_given,
            confirm_timeout_given=request.confirm_timeout_given,
        )
        each = replace(
            template,
            hive=HiveRef(config=config, cwd=tree, flags=template.hive.flags),
            deploy=replace(deploy, goal=Goal.SWITCH),
            changes=None,
            reports=Reports(),  # watch writes its own per commit
            command="watch",
        )
        summary = replace(await apply(each), commit=sha)
        if on_deploy is not None:
            on_deploy(summary)
        return summary

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        result = await watch(settings, deploy_commit, stop=stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return WatchOutcome(result, received[-1] if received else None)
