"""The watcher's git access (runner.gitops.watch_git): URL kinds, credentials, commits, lock."""

from __future__ import annotations

import pygit2
import pytest
from pygit2.enums import CredentialType

from runner.errors import UsageError
from runner.gitops.changes import GitError
from runner.gitops.watch_git import (
    TOKEN_ENV,
    USERNAME_ENV,
    WatchCallbacks,
    branch_name,
    checkout_commit,
    descends,
    tracking_ref,
    url_kind,
    watcher_lock,
)
from tests.test_gitops_watch import git


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("ssh://git@example.org/fleet.git", "ssh"),
        ("git@github.com:org/fleet.git", "ssh"),
        ("example.org:fleet.git", "ssh"),
        ("https://github.com/org/fleet.git", "http"),
        ("http://127.0.0.1:8080/fleet.git", "http"),
        ("/srv/git/fleet.git", "none"),
        ("../fleet.git", "none"),
        ("file:///srv/git/fleet.git", "none"),
        ("git://127.0.0.1/fleet.git", "none"),
    ],
)
def test_url_kind(url, kind):
    assert url_kind(url) == kind


def test_credentials_by_url_kind():
    token = WatchCallbacks("http", {TOKEN_ENV: "s3cret", USERNAME_ENV: "bot"})
    cred = token.credentials("https://x/y.git", None, CredentialType.USERPASS_PLAINTEXT)
    assert isinstance(cred, pygit2.UserPass)
    assert cred.credential_tuple == ("bot", "s3cret")
    default_user = WatchCallbacks("http", {TOKEN_ENV: "t"})
    cred = default_user.credentials("https://x/y.git", None, CredentialType.USERPASS_PLAINTEXT)
    assert isinstance(cred, pygit2.UserPass) and cred.credential_tuple[0] == "x-access-token"
    ssh = WatchCallbacks("ssh", {})
    cred = ssh.credentials("ssh://deploy@x/y.git", "deploy", CredentialType.SSH_KEY)
    assert isinstance(cred, pygit2.KeypairFromAgent)
    with pytest.raises(GitError, match=TOKEN_ENV):
        WatchCallbacks("http", {}).credentials("https://x", None, CredentialType.USERPASS_PLAINTEXT)
    with pytest.raises(GitError, match="authentication failed"):
        for _ in range(5):
            ssh.credentials("ssh://x/y.git", None, CredentialType.SSH_KEY)


def test_branch_names_and_tracking_refs():
    assert branch_name(" refs/heads/prod ") == "prod" and branch_name("main") == "main"
    assert tracking_ref("origin", "prod") == "refs/remotes/origin/prod"


def test_descends_checkout_and_lock(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "f").write_text("1\n")
    git(repo, "add", "f")
    git(repo, "commit", "-q", "-m", "one")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "f").write_text("2\n")
    git(repo, "commit", "-q", "-am", "two")
    second = git(repo, "rev-parse", "HEAD")
    assert descends(repo, second, first) and not descends(repo, first, second)
    assert not descends(repo, second, "0" * 40)  # unknown: not a descendant
    checkout_commit(repo, first, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "1\n"
    with pytest.raises(GitError, match="is not in"):
        checkout_commit(repo, "1" * 40, tmp_path / "none")
    busy = pytest.raises(UsageError, match="another waggle watch is running")
    with watcher_lock(repo), busy, watcher_lock(repo):
        pass
    with watcher_lock(repo):  # released on exit
        pass
