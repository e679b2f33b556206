"""Change detection: revisions, changed paths, ignore globs, checkouts, fetches (pygit2)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from runner.gitops.changes import (
    GitError,
    PathChange,
    change_is_ignored,
    changed_paths,
    checkout_tree,
    ensure_commit,
    is_ignored,
    is_zero,
    open_repo,
    resolve,
)
from runner.gitops.plan import DEFAULT_IGNORE
from tests.test_gitops_plan import commit, git, git_daemon


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("**/*.md", "README.md", True),
        ("**/*.md", "a/b/c.md", True),
        ("**/*.md", "a/b/c.nix", False),
        ("docs/**", "docs/a/b.txt", True),
        ("docs/**", "docsx/b.txt", False),
        ("docs/**", "a/docs/b.txt", False),
        (".github/**", ".github/workflows/ci.yml", True),
        ("*.md", "a/b.md", True),  # no slash: any depth, as in .gitignore
        ("/*.md", "a/b.md", False),  # leading slash: top level only
        ("/*.md", "b.md", True),
        ("hosts/*.nix", "hosts/a.nix", True),
        ("hosts/*.nix", "hosts/x/a.nix", False),  # * stays in one segment
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/?.nix", "a/x.nix", True),
        ("a/?.nix", "a/xy.nix", False),
        ("a/[bc].nix", "a/c.nix", True),
        ("a/[!bc].nix", "a/c.nix", False),
        ("a+b(c).nix", "a+b(c).nix", True),  # regex characters are literal
    ],
)
def test_glob(pattern, path, expected):
    assert is_ignored(path, [pattern]) is expected


def test_rename_is_ignored_only_when_both_sides_are():
    assert change_is_ignored(PathChange("renamed", "docs/a.md", "notes/a.md"), DEFAULT_IGNORE)
    assert not change_is_ignored(PathChange("renamed", "docs/a.nix", "hosts/a.nix"), DEFAULT_IGNORE)
    assert not change_is_ignored(PathChange("modified", "x", "x"), ())


@pytest.fixture
def small(tmp_path) -> tuple[Path, list[str]]:
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "b").mkdir()
    (repo / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(repo / "run.sh", 0o755)
    os.symlink("b/c.nix", repo / "link.nix")
    shas = [commit(repo, "one", {"a.nix": "a\n" * 20, "b/c.nix": "c\n"})]
    git(repo, "tag", "-a", "-m", "v1", "v1")
    shas.append(commit(repo, "two", {"a.nix": None, "moved.nix": "a\n" * 20, "new.nix": "n\n"}))
    shas.append(commit(repo, "three", {"b/c.nix": "c2\n", "new.nix": None}))
    return repo, shas


def sha_of(repo, rev: str) -> str | None:
    found = resolve(repo, rev)
    return None if found is None else str(found.id)


def test_resolve_revisions(small):
    repo_dir, shas = small
    repo = open_repo(repo_dir / "b")  # discovered upwards
    assert sha_of(repo, "HEAD") == shas[2]
    assert sha_of(repo, "HEAD~1") == shas[1]
    assert sha_of(repo, "main~2") == shas[0]
    assert sha_of(repo, "v1") == shas[0]  # annotated tag peeled to its commit
    assert sha_of(repo, shas[1][:10]) == shas[1]
    assert resolve(repo, "0" * 40) is None and is_zero("") and is_zero(None)
    assert resolve(repo, "no-such-branch") is None
    git(repo_dir, "update-ref", "refs/remotes/origin/release", shas[1])
    git(repo_dir, "remote", "add", "origin", "/nonexistent")
    assert sha_of(repo, "release") == shas[1]  # remote-tracking fallback
    assert sha_of(repo, "origin/release") == shas[1]


def test_open_repo_outside_a_repository(tmp_path):
    with pytest.raises(GitError, match="not inside a git repository"):
        open_repo(tmp_path)


def test_changed_paths_with_rename(small):
    repo_dir, shas = small
    repo = open_repo(repo_dir)
    first, second, third = (resolve(repo, s) for s in shas)
    assert first and second and third
    assert [c.describe() for c in changed_paths(repo, first, second)] == [
        "renamed a.nix -> moved.nix",
        "added new.nix",
    ]
    assert [c.describe() for c in changed_paths(repo, second, third)] == [
        "modified b/c.nix",
        "deleted new.nix",
    ]


def test_checkout_tree_keeps_modes_and_symlinks(small, tmp_path):
    repo_dir, shas = small
    repo = open_repo(repo_dir)
    first = resolve(repo, shas[0])
    assert first is not None
    out = checkout_tree(repo, first, tmp_path / "out")
    assert (out / "a.nix").read_text() == "a\n" * 20
    assert (out / "b" / "c.nix").read_text() == "c\n"
    assert os.readlink(out / "link.nix") == "b/c.nix"
    assert (out / "run.sh").stat().st_mode & stat.S_IXUSR
    assert not (out / "a.nix").stat().st_mode & stat.S_IXUSR
    assert not (out / ".git").exists()


def test_ensure_commit_fetches_by_sha_when_the_server_allows(small, tmp_path):
    repo_dir, shas = small
    served = tmp_path / "served"
    served.mkdir()
    git(served, "clone", "-q", "--bare", str(repo_dir), "r.git")
    git(served / "r.git", "config", "uploadpack.allowReachableSHA1InWant", "true")
    with git_daemon(served) as url:
        clone = tmp_path / "clone"
        git(tmp_path, "clone", "-q", "--depth", "1", f"{url}/r.git", str(clone))
        repo = open_repo(clone)
        assert repo.get(shas[0]) is None
        fetched = ensure_commit(repo, shas[0])
        assert fetched.commit is not None and str(fetched.commit.id) == shas[0]
        assert any("by SHA" in n for n in fetched.notes)
        assert repo.is_shallow  # one commit fetched, history not deepened
        # An unknown SHA: every step is tried, bounded, then None with the reason.
        missing = ensure_commit(repo, "1" * 40)
        assert missing.commit is None
        assert "even after fetching" in missing.notes[-1]
        assert not repo.is_shallow  # the last step un-shallowed the clone


def test_ensure_commit_without_remote(small):
    repo_dir, _ = small
    fetched = ensure_commit(open_repo(repo_dir), "2" * 40)
    assert fetched.commit is None and "no remote" in fetched.notes[0]
    assert ensure_commit(open_repo(repo_dir), "0" * 40).commit is None
