"""`waggle watch`: pull-based GitOps from one runner machine (the loop).

The watcher polls one branch of one remote and deploys each new head of it:

- **fetch**: one branch of one remote (`runner.gitops.watch_git`: libgit2, credentials by URL
  kind), in a daemon thread bounded by `fetch_timeout` (and libgit2's server timeouts); a
  fetch that fails or times out is logged, counted and retried at the next interval: it never
  ends the watcher.
- **latest wins**: the commit deployed is the head of the ref when the deploy starts. Commits
  that arrive during a deploy are seen at the next fetch, so only the newest of them is
  deployed (one further deploy, not one per commit).
- **never two deploys at once**: the loop is sequential (fetch, maybe deploy, sleep) and the
  deploy is additionally guarded by an `asyncio.Lock`; across processes, an advisory
  `flock` on `<git dir>/waggle-watch.lock` (`watch_git.watcher_lock`) keeps a second watcher
  off the same clone.
- **force pushes**: a new head that is not a descendant of the last deployed commit is refused
  (one log line and `waggle_watch_refused_total`, once per refused commit) unless
  `allow_non_descendant` is set.
- **stop**: when the `stop` event is set (the CLI sets it on SIGTERM/SIGINT) a running deploy
  is allowed to finish (activations are never cancelled half-way), then the watcher returns;
  while sleeping or fetching it returns at once. Cancelling `watch()` itself also waits for the
  deploy in flight before the cancellation goes on.
- **stateless**: the last deployed commit is not persisted. The first cycle after a start
  deploys the current head; hosts that already run that system are detected as unchanged and
  not re-activated, so re-deploying the same commit is cheap. A deploy that failed is not
  retried for the same commit (a new commit, or a restart, deploys again).

Per deployed commit the watcher writes the run's usual reports (`runner.gitops.watch_reports`)
and rewrites a Prometheus textfile (`runner.gitops.metrics`) with the last commit, its result,
the per-node status and counters. Every event is one log line on the `waggle` logger.

The watcher never deploys by itself: the caller passes a `Deploy` function that gets a commit
SHA and a directory holding that commit's tree (a fresh temporary checkout, removed after the
deploy) and returns the run's `RunSummary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import UsageError
from runner.gitops.changes import GitError, open_repo
from runner.gitops.metrics import Metrics, format_number, write_atomic
from runner.gitops.watch_git import (
    FetchAbortedError,
    branch_name,
    callbacks_for,
    checkout_commit,
    descends,
    fetch_head,
    server_timeouts,
    tracking_ref,
    watcher_lock,
)
from runner.gitops.watch_reports import SHORT, DeployRecord, report
from runner.report import NODE_STATUSES, node_status, one_line
from runner.results import RunSummary

log = logging.getLogger("waggle")

Deploy = Callable[[str, Path], Awaitable[RunSummary]]
"""Deploy the commit (SHA) whose tree is in the directory; return the run's summary."""

HISTORY = 1000  # deploy records and fetch error messages kept in the WatchResult


@dataclass(frozen=True)
class WatchSettings:
    repo: Path  # a local clone that the watcher fetches into (its work tree is not touched)
    remote: str = "origin"
    ref: str = "main"  # a branch name ("main" or "refs/heads/main")
    interval: float = 60.0  # seconds from the start of one fetch to the next
    reports_dir: Path | None = None
    metrics_file: Path | None = None
    allow_non_descendant: bool = False
    once: bool = False  # one fetch (and deploy if needed), then return
    fetch_timeout: float = 120.0

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise UsageError(f"--interval must be positive, not {self.interval}")
        if not self.fetch_timeout > 0:
            raise UsageError(f"--fetch-timeout must be positive, not {self.fetch_timeout}")
        if not self.remote.strip():
            raise UsageError("--remote must not be empty")
        if not branch_name(self.ref):
            raise UsageError(f"--ref {self.ref!r} is not a branch name")

    @property
    def branch(self) -> str:
        return branch_name(self.ref)

    @property
    def tracking_ref(self) -> str:
        """The remote-tracking ref the fetch updates: refs/remotes/<remote>/<branch>."""
        return tracking_ref(self.remote, self.branch)


@dataclass(frozen=True)
class WatchResult:
    deployed: tuple[DeployRecord, ...]  # in order (the last HISTORY of them)
    refused: tuple[str, ...]  # commits refused as not descending from the deployed one
    fetch_errors: tuple[str, ...]  # messages (the last HISTORY of them)

    @property
    def commits(self) -> tuple[str, ...]:
        return tuple(d.commit for d in self.deployed)

    @property
    def ok(self) -> bool:
        """No failed deploy, no refused commit, no fetch error."""
        return all(d.ok for d in self.deployed) and not self.refused and not self.fetch_errors


# -- the watcher -------------------------------------------------------------------------------


@dataclass
class _State:
    last_commit: str | None = None
    refused_head: str | None = None  # the head we last refused (logged once)
    deployed: deque[DeployRecord] = field(default_factory=lambda: deque(maxlen=HISTORY))
    refused: list[str] = field(default_factory=list)
    fetch_errors: deque[str] = field(default_factory=lambda: deque(maxlen=HISTORY))
    metrics: Metrics = field(default_factory=Metrics)
    fetch_thread: threading.Thread | None = None


class Watcher:
    def __init__(
        self,
        settings: WatchSettings,
        deploy: Deploy,
        stop: asyncio.Event,
        logger: logging.Logger,
    ) -> None:
        self.settings = settings
        self.deploy = deploy
        self.stop = stop
        self.log = logger
        self.state = _State()
        self.lock = asyncio.Lock()  # one deploy at a time, whoever calls

    async def run(self) -> WatchResult:
        s = self.settings
        self.log.info(
            "watch: watching %s/%s in %s every %s s",
            s.remote,
            s.branch,
            s.repo,
            format_number(s.interval),
        )
        self._write_metrics()
        while not self.stop.is_set():
            started = time.monotonic()
            head = await self._fetch()
            if head is not None and not self.stop.is_set():
                await self._consider(head)
            self._write_metrics()
            if s.once or self.stop.is_set():
                break
            remaining = s.interval - (time.monotonic() - started)
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=remaining)
        if self.stop.is_set():
            self.log.info("watch: stopping")
        return WatchResult(
            tuple(self.state.deployed), tuple(self.state.refused), tuple(self.state.fetch_errors)
        )

    # fetch -------------------------------------------------------------------------------

    async def _fetch(self) -> str | None:
        """The head of the watched branch after a fetch, or None (error logged, or stopping)."""
        s = self.settings
        st = self.state
        if st.fetch_thread is not None and st.fetch_thread.is_alive():
            self._fetch_failed("the previous fetch is still running (timed out); not fetching")
            return None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        try:
            callbacks = callbacks_for(s.repo, s.remote)
        except (GitError, KeyError, IndexError) as e:
            self._fetch_failed(f"cannot read remote {s.remote!r} of {s.repo}: {e}")
            return None
        cb = callbacks

        def settle(result: str | None, error: Exception | None) -> None:
            if done.done():
                return  # timed out or stopping: nobody waits for this fetch any more
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result or "")

        def work() -> None:
            result: str | None = None
            error: Exception | None = None
            try:
                result = fetch_head(s.repo, s.remote, s.branch, cb)
            except Exception as e:  # noqa: BLE001 - handed to the loop, never lost in the thread
                error = e
            with contextlib.suppress(RuntimeError):  # the loop is closed: the watcher is gone
                loop.call_soon_threadsafe(settle, result, error)

        # A daemon thread, not the default executor: a hung fetch must not keep the process
        # from exiting (asyncio.run waits for executor threads).
        thread = threading.Thread(target=work, name="waggle-watch-fetch", daemon=True)
        st.fetch_thread = thread
        thread.start()
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        waiting: set[asyncio.Future[Any]] = {done, stopping}
        try:
            finished, _ = await asyncio.wait(
                waiting, timeout=s.fetch_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        if done not in finished:
            cb.abort.set()
            if not done.done():
                done.cancel()
            if self.stop.is_set():
                return None
            self._fetch_failed(f"fetch timed out after {format_number(s.fetch_timeout)} s")
            return None
        try:
            head = done.result()
        except (GitError, FetchAbortedError, OSError) as e:
            self._fetch_failed(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - an unexpected libgit2 error: logged, retried
            self._fetch_failed(f"{type(e).__name__}: {e}")
            return None
        st.metrics.last_fetch_timestamp = time.time()
        if head in (st.last_commit, st.refused_head):
            self.log.debug("watch: fetched %s/%s: %s, unchanged", s.remote, s.branch, head[:SHORT])
        else:
            self.log.info(
                "watch: fetched %s/%s: new commit %s (deployed: %s)",
                s.remote,
                s.branch,
                head[:SHORT],
                (st.last_commit or "none")[:SHORT],
            )
        return head

    def _fetch_failed(self, message: str) -> None:
        message = one_line(message)
        self.state.fetch_errors.append(message)
        self.state.metrics.fetch_errors_total += 1
        self.log.warning(
            "watch: fetch failed (retrying in %s s): %s",
            format_number(self.settings.interval),
            message,
        )

    # deploy ------------------------------------------------------------------------------

    async def _consider(self, head: str) -> None:
        st = self.state
        if head == st.last_commit:
            return
        last = st.last_commit
        if (
            last is not None
            and not self.settings.allow_non_descendant
            and not await asyncio.to_thread(descends, self.settings.repo, head, last)
        ):
            if st.refused_head != head:
                st.refused_head = head
                st.refused.append(head)
                st.metrics.refused_total += 1
                self.log.error(
                    "watch: refused %s: not a descendant of the deployed %s (force push?);"
                    " allow it with --allow-non-descendant",
                    head[:SHORT],
                    last[:SHORT],
                )
            return
        await self._deploy(head)

    async def _deploy(self, head: str) -> None:
        async with self.lock:
            st = self.state
            st.refused_head = None
            started_at = time.time()
            t0 = time.monotonic()
            self.log.info("watch: deploy of %s started", head[:SHORT])
            task = asyncio.ensure_future(self._deploy_in_checkout(head))
            cancelled = await self._wait_for_deploy(task, head)
            summary, error = task.result()
            record = DeployRecord(head, started_at, time.monotonic() - t0, summary, error)
            record = report(record, self.settings.reports_dir, self.log)
            st.last_commit = head
            st.deployed.append(record)
            m = st.metrics
            m.deploys_total += 1
            m.deploy_failures_total += 0 if record.ok else 1
            m.last = record
            self._write_metrics()
            self._log_finished(record)
            if cancelled:
                raise asyncio.CancelledError

    async def _wait_for_deploy(self, task: asyncio.Future[Any], head: str) -> bool:
        """Wait until the deploy is done, whatever happens meanwhile: a stop request is
        logged once, a cancellation of the watcher is held back until the deploy is done (the
        return value says whether one came). Activations are never cancelled half-way."""
        cancelled = False
        stopping: asyncio.Future[Any] | None = None
        try:
            while not task.done():
                if stopping is None and not self.stop.is_set():
                    stopping = asyncio.ensure_future(self.stop.wait())
                waiting: set[asyncio.Future[Any]] = {task} if stopping is None else {task, stopping}
                try:
                    # wait() never cancels what it waits for
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    if not cancelled:
                        self.log.info(
                            "watch: cancelled; waiting for the deploy of %s", head[:SHORT]
                        )
                    cancelled = True
                    continue
                if stopping is not None and stopping.done() and not task.done():
                    self.log.info(
                        "watch: stop requested; waiting for the deploy of %s", head[:SHORT]
                    )
                    stopping = None
        finally:
            if stopping is not None:
                stopping.cancel()
        return cancelled

    async def _deploy_in_checkout(self, head: str) -> tuple[RunSummary | None, str]:
        tmp = Path(tempfile.mkdtemp(prefix=f"waggle-watch-{head[:SHORT]}-"))
        try:
            try:
                await asyncio.to_thread(checkout_commit, self.settings.repo, head, tmp)
            except Exception as e:  # noqa: BLE001 - reported as the deploy's failure
                return None, one_line(f"checkout of {head[:SHORT]} failed: {e}", 2000)
            try:
                return await self.deploy(head, tmp), ""
            except Exception as e:  # noqa: BLE001 - a bad commit must not end the watcher
                return None, one_line(f"{type(e).__name__}: {e}", 2000)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    def _log_finished(self, record: DeployRecord) -> None:
        where = f"; reports in {record.report_dir}" if record.report_dir else ""
        if record.summary is None:
            self.log.error(
                "watch: deploy of %s failed after %.1f s: %s%s",
                record.commit[:SHORT],
                record.seconds,
                record.error,
                where,
            )
            return
        counts = dict.fromkeys(NODE_STATUSES, 0)
        for node in record.summary.nodes:
            counts[node_status(node)] += 1
        text = ", ".join(f"{n} {status}" for status, n in counts.items() if n) or "no nodes"
        level = logging.INFO if record.ok else logging.ERROR
        self.log.log(
            level,
            "watch: deploy of %s %s in %.1f s: %s%s",
            record.commit[:SHORT],
            "finished" if record.ok else "failed",
            record.seconds,
            text,
            where,
        )

    def _write_metrics(self) -> None:
        path = self.settings.metrics_file
        if path is None:
            return
        try:
            write_atomic(path, self.state.metrics.render())
        except OSError as e:
            self.log.error("watch: cannot write the metrics file %s: %s", path, e)


async def watch(
    settings: WatchSettings,
    deploy: Deploy,
    *,
    stop: asyncio.Event | None = None,
    log: logging.Logger | None = None,
) -> WatchResult:
    """Poll `settings.remote`/`settings.ref` and deploy each new head until `stop` is set
    (or after one cycle with `settings.once`). See the module docstring for the rules.

    Raises `UsageError`/`GitError` (exit 2) before the first fetch when the clone cannot be
    opened, has no such remote, or another watcher holds the clone's lock.
    """
    logger = log or logging.getLogger("waggle")
    repo = open_repo(settings.repo)
    if settings.remote not in repo.remotes.names():
        raise UsageError(f"{settings.repo} has no remote {settings.remote!r}")
    with watcher_lock(settings.repo), server_timeouts(settings.fetch_timeout):
        watcher = Watcher(settings, deploy, stop or asyncio.Event(), logger)
        return await watcher.run()
