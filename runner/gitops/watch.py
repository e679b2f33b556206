"""`waggle watch`: pull-based GitOps from one runner machine.

The watcher polls one branch of one remote and deploys each new head of it:

- **fetch**: `remote.fetch()` through pygit2 (libgit2; no `git` program needed) of just the
  watched branch into `refs/remotes/<remote>/<ref>`. Credentials: the ssh-agent for ssh URLs
  (`ssh://`, `user@host:path`), `WAGGLE_GIT_USERNAME` / `WAGGLE_GIT_TOKEN` from the
  environment for http(s) URLs, nothing for local paths, `file://` and `git://`. SSH host keys
  are checked by libgit2 against `~/.ssh/known_hosts`. A fetch runs in a daemon thread and is
  bounded by `fetch_timeout` (and libgit2's server timeouts); a fetch that fails or times out is
  logged, counted and retried at the next interval: it never ends the watcher.
- **latest wins**: the commit deployed is the head of the ref when the deploy starts. Commits
  that arrive during a deploy are seen at the next fetch, so only the newest of them is
  deployed (one further deploy, not one per commit).
- **never two deploys at once**: the loop is sequential (fetch, maybe deploy, sleep) and the
  deploy is additionally guarded by an `asyncio.Lock`; across processes, an advisory
  `flock` on `<git dir>/waggle-watch.lock` keeps a second watcher off the same clone.
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

Per deployed commit the watcher writes `junit.xml`, `report.md` and `report.json` (the run's
usual reports) into `reports_dir/<UTC timestamp>-<short sha>/` and rewrites a Prometheus
textfile (node_exporter's textfile collector format, written atomically) with the last commit,
its result, the per-node status and counters. Every event is one log line on the `waggle`
logger.

The watcher never deploys by itself: the caller passes a `Deploy` function that gets a commit
SHA and a directory holding that commit's tree (a fresh temporary checkout, removed after the
deploy) and returns the run's `RunSummary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pygit2
from pygit2.enums import CredentialType, Option
from typing_extensions import override

from runner.errors import UsageError
from runner.gitops.changes import GitError, checkout_tree, open_repo
from runner.report import NODE_STATUSES, node_status, one_line
from runner.report.jsonreport import write_json
from runner.report.junit import write_junit
from runner.report.markdown import write_markdown
from runner.results import RunSummary

log = logging.getLogger("waggle")

Deploy = Callable[[str, Path], Awaitable[RunSummary]]
"""Deploy the commit (SHA) whose tree is in the directory; return the run's summary."""

USERNAME_ENV = "WAGGLE_GIT_USERNAME"
TOKEN_ENV = "WAGGLE_GIT_TOKEN"
LOCK_NAME = "waggle-watch.lock"
HISTORY = 1000  # deploy records and fetch error messages kept in the WatchResult
CREDENTIAL_ATTEMPTS = 3  # libgit2 asks again after a rejected credential; stop after this
SHORT = 12  # characters of a SHA in log lines and report directory names


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
        return f"refs/remotes/{self.remote}/{self.branch}"


def branch_name(ref: str) -> str:
    ref = ref.strip()
    return ref.removeprefix("refs/heads/")


@dataclass(frozen=True)
class DeployRecord:
    """One deploy: the commit, when, how long, and the summary (None if the deploy raised)."""

    commit: str
    started_at: float
    seconds: float
    summary: RunSummary | None
    error: str = ""
    report_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.summary is not None and self.summary.ok


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


# -- credentials and fetching -------------------------------------------------------------

_SCP_LIKE = re.compile(r"^(?:[^@/:]+@)?[^/:]+:(?!//)")


def url_kind(url: str) -> str:
    """ "ssh", "http" or "none" (local paths, file://, git://): which credentials a URL needs."""
    lowered = url.strip().lower()
    if lowered.startswith(("ssh://", "git+ssh://", "ssh+git://")):
        return "ssh"
    if lowered.startswith(("https://", "http://")):
        return "http"
    if "://" in lowered:
        return "none"
    if _SCP_LIKE.match(url.strip()) and not re.match(r"^[A-Za-z]:[\\/]", url.strip()):
        return "ssh"  # user@host:path, as git understands it
    return "none"


class FetchAbortedError(Exception):
    """Raised from a libgit2 callback to end a fetch that took too long."""


class WatchCallbacks(pygit2.RemoteCallbacks):
    """Credentials by URL kind, and a way to abort a running fetch."""

    def __init__(self, kind: str, env: dict[str, str] | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.env = dict(os.environ) if env is None else env
        self.abort = threading.Event()
        self.attempts = 0

    @override
    def credentials(
        self, url: str, username_from_url: str | None, allowed_types: CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.Keypair:
        self._check_abort()
        self.attempts += 1
        if self.attempts > CREDENTIAL_ATTEMPTS:
            raise GitError(f"{url}: authentication failed {CREDENTIAL_ATTEMPTS} times")
        if self.kind == "ssh" and allowed_types & CredentialType.SSH_KEY:
            return pygit2.KeypairFromAgent(username_from_url or "git")
        if allowed_types & CredentialType.USERPASS_PLAINTEXT:
            token = self.env.get(TOKEN_ENV)
            if token:
                user = self.env.get(USERNAME_ENV) or username_from_url or "x-access-token"
                return pygit2.UserPass(user, token)
            raise GitError(f"{url} asks for a password: set {TOKEN_ENV} (and {USERNAME_ENV})")
        if allowed_types & CredentialType.USERNAME:
            return pygit2.Username(username_from_url or self.env.get(USERNAME_ENV) or "git")
        raise GitError(f"{url}: no credentials for this kind of URL")

    @override
    def sideband_progress(self, string: str) -> None:
        self._check_abort()

    @override
    def transfer_progress(self, stats: pygit2.remotes.TransferProgress) -> None:
        self._check_abort()

    def _check_abort(self) -> None:
        if self.abort.is_set():
            raise FetchAbortedError("fetch timed out")


@contextlib.contextmanager
def server_timeouts(seconds: float) -> Iterator[None]:
    """libgit2's connect and read timeouts set to `seconds` while the watcher runs, the old
    values restored after (they are process-wide). Ignored where libgit2 lacks them."""
    millis = max(1, int(seconds * 1000))
    saved: list[tuple[Option, int]] = []
    try:
        for get, put in (
            (Option.GET_SERVER_CONNECT_TIMEOUT, Option.SET_SERVER_CONNECT_TIMEOUT),
            (Option.GET_SERVER_TIMEOUT, Option.SET_SERVER_TIMEOUT),
        ):
            with contextlib.suppress(Exception):
                old = int(pygit2.option(get))
                pygit2.option(put, millis)
                saved.append((put, old))
        yield
    finally:
        for put, old in saved:
            with contextlib.suppress(Exception):
                pygit2.option(put, old)


def fetch_head(settings: WatchSettings, callbacks: WatchCallbacks | None = None) -> str:
    """Fetch the watched branch and return the SHA of refs/remotes/<remote>/<branch>.

    Blocking; raises `GitError` (or `FetchAbortedError`) on failure.
    """
    repo = open_repo(settings.repo)
    try:
        remote = repo.remotes[settings.remote]
    except (KeyError, IndexError) as e:
        raise GitError(f"{settings.repo}: no remote {settings.remote!r}") from e
    if callbacks is None:
        callbacks = WatchCallbacks(url_kind(remote.url or ""))
    spec = f"+refs/heads/{settings.branch}:{settings.tracking_ref}"
    try:
        remote.fetch([spec], callbacks=callbacks)
    except FetchAbortedError:
        raise
    except (pygit2.GitError, OSError, ValueError) as e:
        raise GitError(f"fetching {settings.branch} from {settings.remote} failed: {e}") from e
    try:
        ref = repo.references[settings.tracking_ref]
        return str(ref.peel(pygit2.Commit).id)
    except (KeyError, ValueError, pygit2.GitError) as e:
        raise GitError(f"{settings.tracking_ref} is missing after the fetch: {e}") from e


# -- Prometheus textfile ---------------------------------------------------------------------


def escape_label(value: str) -> str:
    """A label value escaped as the text exposition format asks (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class Metrics:
    deploys_total: int = 0
    deploy_failures_total: int = 0
    fetch_errors_total: int = 0
    refused_total: int = 0
    last_fetch_timestamp: float | None = None
    last: DeployRecord | None = None

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        metric(
            "waggle_watch_deploys_total",
            "counter",
            "Deploys finished by this watcher.",
            [("", self.deploys_total)],
        )
        metric(
            "waggle_watch_deploy_failures_total",
            "counter",
            "Deploys that failed (a node failed or the deploy raised).",
            [("", self.deploy_failures_total)],
        )
        metric(
            "waggle_watch_fetch_errors_total",
            "counter",
            "Fetches that failed or timed out.",
            [("", self.fetch_errors_total)],
        )
        metric(
            "waggle_watch_refused_total",
            "counter",
            "New heads refused as not descending from the deployed commit.",
            [("", self.refused_total)],
        )
        if self.last_fetch_timestamp is not None:
            metric(
                "waggle_watch_last_fetch_timestamp_seconds",
                "gauge",
                "When the last successful fetch ended (epoch seconds).",
                [("", self.last_fetch_timestamp)],
            )
        last = self.last
        if last is not None:
            metric(
                "waggle_watch_last_deploy_timestamp_seconds",
                "gauge",
                "When the last deploy ended (epoch seconds).",
                [("", last.started_at + last.seconds)],
            )
            metric(
                "waggle_watch_last_deploy_duration_seconds",
                "gauge",
                "How long the last deploy took.",
                [("", last.seconds)],
            )
            metric(
                "waggle_watch_last_commit_info",
                "gauge",
                "The commit deployed last.",
                [(f'{{commit="{escape_label(last.commit)}"}}', 1)],
            )
            metric(
                "waggle_watch_last_deploy_success",
                "gauge",
                "1 if every node of the last deploy succeeded, else 0.",
                [("", 1 if last.ok else 0)],
            )
            nodes = last.summary.nodes if last.summary is not None else ()
            samples = []
            for node in nodes:
                status = node_status(node)
                assert status in NODE_STATUSES
                labels = f'{{node="{escape_label(node.name)}",status="{status}"}}'
                samples.append((labels, 1.0))
            metric(
                "waggle_watch_node_status",
                "gauge",
                "The status of each node in the last deploy (ok, failed, unchanged, skipped).",
                samples,
            )
        return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename, so
    a reader (node_exporter) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- reports ---------------------------------------------------------------------------------


def report_dir_for(reports_dir: Path, commit: str, started_at: float) -> Path:
    """A new directory `<UTC time, ms>-<short sha>` (with "-2", "-3" if it already exists),
    e.g. `20250101T120000.123Z-1a2b3c4d5e6f`; names sort in deploy order."""
    when = datetime.fromtimestamp(started_at, tz=UTC)
    stamp = when.strftime("%Y%m%dT%H%M%S") + f".{when.microsecond // 1000:03d}Z"  # sorts by time
    base = f"{stamp}-{commit[:SHORT]}"
    reports_dir.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = reports_dir / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def write_reports(directory: Path, record: DeployRecord) -> None:
    if record.summary is not None:
        write_junit(record.summary, directory / "junit.xml")
        write_markdown(record.summary, directory / "report.md")
        write_json(record.summary, directory / "report.json")
    if record.error:
        (directory / "error.txt").write_text(record.error + "\n", encoding="utf-8")


# -- the lock against a second watcher ---------------------------------------------------------


@contextlib.contextmanager
def watcher_lock(settings: WatchSettings) -> Iterator[None]:
    """An exclusive `flock` on <git dir>/waggle-watch.lock for the watcher's lifetime."""
    repo = open_repo(settings.repo)
    path = Path(repo.path) / LOCK_NAME
    with open(path, "a+", encoding="utf-8") as handle:  # closing it releases the lock
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(f"another waggle watch is running on {settings.repo} ({path})") from e
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


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
            _number(s.interval),
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
        callbacks: WatchCallbacks | None = None
        try:
            repo = open_repo(s.repo)
            url = repo.remotes[s.remote].url or ""
            callbacks = WatchCallbacks(url_kind(url))
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
                result = fetch_head(s, cb)
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
            self._fetch_failed(f"fetch timed out after {_number(s.fetch_timeout)} s")
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
            "watch: fetch failed (retrying in %s s): %s", _number(self.settings.interval), message
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
            and not await asyncio.to_thread(self._descends, head, last)
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

    def _descends(self, head: str, last: str) -> bool:
        repo = open_repo(self.settings.repo)
        try:
            return bool(repo.descendant_of(head, last))
        except (KeyError, ValueError, pygit2.GitError):
            return False

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
            record = self._report(record)
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
                await asyncio.to_thread(self._checkout, head, tmp)
            except Exception as e:  # noqa: BLE001 - reported as the deploy's failure
                return None, one_line(f"checkout of {head[:SHORT]} failed: {e}", 2000)
            try:
                return await self.deploy(head, tmp), ""
            except Exception as e:  # noqa: BLE001 - a bad commit must not end the watcher
                return None, one_line(f"{type(e).__name__}: {e}", 2000)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    def _checkout(self, head: str, dest: Path) -> None:
        repo = open_repo(self.settings.repo)
        commit = repo.get(head)
        if not isinstance(commit, pygit2.Commit):
            raise GitError(f"commit {head} is not in {self.settings.repo}")
        checkout_tree(repo, commit, dest)

    def _report(self, record: DeployRecord) -> DeployRecord:
        reports_dir = self.settings.reports_dir
        if reports_dir is None:
            return record
        try:
            directory = report_dir_for(reports_dir, record.commit, record.started_at)
            write_reports(directory, record)
        except OSError as e:
            self.log.error("watch: cannot write the reports of %s: %s", record.commit[:SHORT], e)
            return record
        return DeployRecord(
            record.commit,
            record.started_at,
            record.seconds,
            record.summary,
            record.error,
            directory,
        )

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
    with watcher_lock(settings), server_timeouts(settings.fetch_timeout):
        watcher = Watcher(settings, deploy, stop or asyncio.Event(), logger)
        return await watcher.run()
