"""The git side of `waggle watch`: credentials, fetching one branch, the clone lock, checkouts.

- **fetch**: `remote.fetch()` through pygit2 (libgit2; no `git` program needed) of just the
  watched branch into `refs/remotes/<remote>/<branch>`. Credentials: the ssh-agent for ssh
  URLs (`ssh://`, `user@host:path`), `WAGGLE_GIT_USERNAME` / `WAGGLE_GIT_TOKEN` from the
  environment for http(s) URLs, nothing for local paths, `file://` and `git://`. SSH host keys
  are checked by libgit2 against `~/.ssh/known_hosts`. A fetch is blocking; the watcher runs it
  in a thread and ends it through `WatchCallbacks.abort` when it takes too long, and libgit2's
  server timeouts (`server_timeouts`) bound each connect and read.
- **the lock**: an advisory `flock` on `<git dir>/waggle-watch.lock` keeps a second watcher
  off the same clone.

Everything here is blocking (pygit2); the loop (`runner.gitops.watch`) calls it in threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pygit2
from pygit2.enums import CredentialType, Option
from typing_extensions import override

from runner.errors import UsageError
from runner.gitops.changes import GitError, checkout_tree, open_repo

USERNAME_ENV = "WAGGLE_GIT_USERNAME"
TOKEN_ENV = "WAGGLE_GIT_TOKEN"
LOCK_NAME = "waggle-watch.lock"
CREDENTIAL_ATTEMPTS = 3  # libgit2 asks again after a rejected credential; stop after this


def branch_name(ref: str) -> str:
    """The branch of a ref as given to --ref: "main" or "refs/heads/main" -> "main"."""
    ref = ref.strip()
    return ref.removeprefix("refs/heads/")


def tracking_ref(remote: str, branch: str) -> str:
    """The remote-tracking ref a fetch of `branch` updates: refs/remotes/<remote>/<branch>."""
    return f"refs/remotes/{remote}/{branch}"


# -- credentials ---------------------------------------------------------------------------

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


def callbacks_for(repo_path: Path, remote: str) -> WatchCallbacks:
    """Callbacks with the credentials `remote`'s URL needs. Raises GitError, KeyError or
    IndexError when the clone or the remote cannot be read."""
    repo = open_repo(repo_path)
    return WatchCallbacks(url_kind(repo.remotes[remote].url or ""))


# -- fetching --------------------------------------------------------------------------------


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


def fetch_head(
    repo_path: Path, remote_name: str, branch: str, callbacks: WatchCallbacks | None = None
) -> str:
    """Fetch `branch` and return the SHA of refs/remotes/<remote>/<branch>.

    Blocking; raises `GitError` (or `FetchAbortedError`) on failure.
    """
    repo = open_repo(repo_path)
    try:
        remote = repo.remotes[remote_name]
    except (KeyError, IndexError) as e:
        raise GitError(f"{repo_path}: no remote {remote_name!r}") from e
    if callbacks is None:
        callbacks = WatchCallbacks(url_kind(remote.url or ""))
    tracking = tracking_ref(remote_name, branch)
    spec = f"+refs/heads/{branch}:{tracking}"
    try:
        remote.fetch([spec], callbacks=callbacks)
    except FetchAbortedError:
        raise
    except (pygit2.GitError, OSError, ValueError) as e:
        raise GitError(f"fetching {branch} from {remote_name} failed: {e}") from e
    try:
        ref = repo.references[tracking]
        return str(ref.peel(pygit2.Commit).id)
    except (KeyError, ValueError, pygit2.GitError) as e:
        raise GitError(f"{tracking} is missing after the fetch: {e}") from e


# -- commits ---------------------------------------------------------------------------------


def descends(repo_path: Path, head: str, last: str) -> bool:
    """Whether `head` is a descendant of `last` (False when either is unknown)."""
    repo = open_repo(repo_path)
    try:
        return bool(repo.descendant_of(head, last))
    except (KeyError, ValueError, pygit2.GitError):
        return False


def checkout_commit(repo_path: Path, head: str, dest: Path) -> None:
    """Write the tree of commit `head` to `dest` (the clone's work tree is not touched)."""
    repo = open_repo(repo_path)
    commit = repo.get(head)
    if not isinstance(commit, pygit2.Commit):
        raise GitError(f"commit {head} is not in {repo_path}")
    checkout_tree(repo, commit, dest)


# -- the lock against a second watcher ---------------------------------------------------------


@contextlib.contextmanager
def watcher_lock(repo_path: Path) -> Iterator[None]:
    """An exclusive `flock` on <git dir>/waggle-watch.lock for the watcher's lifetime."""
    repo = open_repo(repo_path)
    path = Path(repo.path) / LOCK_NAME
    with open(path, "a+", encoding="utf-8") as handle:  # closing it releases the lock
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(f"another waggle watch is running on {repo_path} ({path})") from e
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
