"""What a git change touched: commits, changed paths, ignored paths, checkouts (pygit2).

Everything here is plain pygit2 and blocking; async callers wrap it in
`asyncio.to_thread`. No `git` program is needed: fetches (for shallow CI
clones) go through libgit2, and trees are written out blob by blob.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pygit2
from pygit2.enums import DeltaStatus, DiffFind

from runner.errors import UsageError

# A fetch depth that asks the server for the whole history (libgit2's
# GIT_FETCH_DEPTH_UNSHALLOW): the last step of deepening a shallow clone.
UNSHALLOW = 2147483647
DEEPEN_STEPS: tuple[int, ...] = (50, 200, UNSHALLOW)

_ZERO = re.compile(r"0{40}|0{64}")
_HEX = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")


class GitError(UsageError):
    """The repository cannot be opened or a revision cannot be read (exit 2)."""


def open_repo(path: Path | str) -> pygit2.Repository:
    """The repository holding `path`, found by walking upwards."""
    try:
        found = pygit2.discover_repository(str(path))
    except pygit2.GitError as e:  # e.g. "not owned by current user"
        raise GitError(f"{path}: {e}") from e
    if found is None:
        raise GitError(f"{path} is not inside a git repository")
    try:
        return pygit2.Repository(found)
    except pygit2.GitError as e:
        raise GitError(f"{path}: cannot open the git repository: {e}") from e


def is_zero(rev: str | None) -> bool:
    """An empty or all-zero revision: CI's way of saying "no previous commit"."""
    return rev is None or not rev.strip() or bool(_ZERO.fullmatch(rev.strip()))


def resolve(repo: pygit2.Repository, rev: str) -> pygit2.Commit | None:
    """The commit `rev` names (SHA, branch, tag, `HEAD~1`, `origin/main`), or None.

    All-zero and empty revisions give None. A bare branch name that exists only
    as a remote-tracking branch (as in CI clones) resolves to `origin/<name>`.
    """
    if is_zero(rev):
        return None
    rev = rev.strip()
    candidates = [rev]
    if not rev.startswith("refs/") and "~" not in rev and "^" not in rev:
        candidates += [f"refs/remotes/{name}/{rev}" for name in repo.remotes.names()]
    for candidate in candidates:
        try:
            obj = repo.revparse_single(candidate)
        except (KeyError, ValueError, pygit2.GitError):
            continue
        try:
            commit = obj.peel(pygit2.Commit)
        except (ValueError, pygit2.GitError):
            continue
        if isinstance(commit, pygit2.Commit):
            return commit
    return None


@dataclass(frozen=True)
class Fetched:
    """The outcome of `ensure_commit`: the commit (or None) and what was tried."""

    commit: pygit2.Commit | None
    notes: tuple[str, ...]


def ensure_commit(
    repo: pygit2.Repository,
    rev: str,
    *,
    remote: str = "origin",
    depths: Sequence[int] = DEEPEN_STEPS,
    callbacks: pygit2.RemoteCallbacks | None = None,
) -> Fetched:
    """Resolve `rev`, fetching it first when a shallow clone lacks it.

    Order: the local repository; a fetch of the SHA itself (servers that allow
    reachable SHAs in wants: GitHub; git with uploadpack.allowReachableSHA1InWant);
    then deepening the configured refspecs step by step (`depths`, the last
    one un-shallows). Bounded: at most 1 + len(depths) fetches.
    """
    notes: list[str] = []
    if is_zero(rev):
        return Fetched(None, ("base revision is empty or all zeros (a new branch)",))
    found = resolve(repo, rev)
    if found is not None:
        return Fetched(found, ())
    try:
        origin = repo.remotes[remote]
    except (KeyError, IndexError):
        notes.append(f"{rev} is not in the repository and there is no remote {remote!r}")
        return Fetched(None, tuple(notes))
    if _HEX.fullmatch(rev.strip()):
        try:
            origin.fetch([rev.strip()], depth=1, callbacks=callbacks)
            found = resolve(repo, rev)
        except pygit2.GitError as e:
            notes.append(f"fetching {rev} by SHA from {remote} failed: {e}")
        if found is not None:
            notes.append(f"fetched {rev[:12]} by SHA from {remote}")
            return Fetched(found, tuple(notes))
    for depth in depths:
        what = "full history" if depth >= UNSHALLOW else f"depth {depth}"
        try:
            origin.fetch(depth=depth, callbacks=callbacks)
        except pygit2.GitError as e:
            notes.append(f"fetching {what} from {remote} failed: {e}")
            continue
        found = resolve(repo, rev)
        if found is not None:
            notes.append(f"found {rev} after fetching {what} from {remote}")
            return Fetched(found, tuple(notes))
        if not repo.is_shallow:
            break
    notes.append(f"{rev} is not in the repository, even after fetching from {remote}")
    return Fetched(None, tuple(notes))


# -- changed paths -------------------------------------------------------------


@dataclass(frozen=True)
class PathChange:
    status: str  # "added" | "modified" | "deleted" | "renamed" | "copied" | "typechange"
    old_path: str | None
    new_path: str | None

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for p in (self.old_path, self.new_path) if p))

    def describe(self) -> str:
        if self.status == "renamed":
            return f"renamed {self.old_path} -> {self.new_path}"
        return f"{self.status} {self.new_path or self.old_path}"


_STATUS = {
    DeltaStatus.ADDED: "added",
    DeltaStatus.DELETED: "deleted",
    DeltaStatus.MODIFIED: "modified",
    DeltaStatus.RENAMED: "renamed",
    DeltaStatus.COPIED: "copied",
    DeltaStatus.TYPECHANGE: "typechange",
}


def changed_paths(
    repo: pygit2.Repository, base: pygit2.Commit, head: pygit2.Commit
) -> list[PathChange]:
    """Paths that differ between the two commits' trees, renames detected.

    Only trees are compared, so this works in shallow clones as long as both
    commits are present.
    """
    diff = repo.diff(base, head)
    diff.find_similar(flags=DiffFind.FIND_RENAMES)
    out: list[PathChange] = []
    for d in diff.deltas:
        status = _STATUS.get(d.status, "modified")
        old = None if status == "added" else d.old_file.path
        new = None if status == "deleted" else d.new_file.path
        out.append(PathChange(status, old, new))
    return sorted(out, key=lambda c: c.new_path or c.old_path or "")


# -- ignored paths ---------------------------------------------------------------


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A compiled regex for a path glob matched against the whole path.

    `*` and `?` stay within one path segment, `**` crosses segments: `**/x`
    matches `x` at any depth (including the top), `a/**` everything below
    `a`, `a/**/b` zero or more directories in between. `[...]` is a class.
    As in .gitignore, a pattern without a `/` matches the name at any depth
    (`*.md` is `**/*.md`), and a leading `/` anchors it to the top (`/*.md`).
    """
    p = pattern.strip()
    if p.startswith("/"):
        p = p.lstrip("/")
    elif "/" not in p:
        p = "**/" + p
    out: list[str] = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if p.startswith("**", i):
            j = i + 2
            at_start = i == 0 or p[i - 1] == "/"
            if at_start and j < n and p[j] == "/":
                out.append("(?:.*/)?")  # **/ : zero or more directories
                i = j + 1
                continue
            out.append(".*")
            i = j
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            close = p.find("]", i + 2 if p.startswith("[!", i) or p.startswith("[]", i) else i + 1)
            if close == -1:
                out.append(re.escape(c))
            else:
                body = p[i + 1 : close]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = close + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def is_ignored(path: str, patterns: Iterable[str]) -> bool:
    return any(glob_regex(p).fullmatch(path) for p in patterns if p.strip())


def change_is_ignored(change: PathChange, patterns: Iterable[str]) -> bool:
    """A change is ignored when every path it touches (old and new) is ignored."""
    pats = tuple(patterns)
    return all(is_ignored(p, pats) for p in change.paths)


# -- writing a tree out -----------------------------------------------------------


def checkout_tree(repo: pygit2.Repository, commit: pygit2.Commit, dest: Path) -> Path:
    """Write the commit's tree (files, exec bits, symlinks) into `dest`.

    Submodules become empty directories (their commits are not in this repository).
    """
    dest.mkdir(parents=True, exist_ok=True)
    _write_tree(repo, commit.tree, dest)
    return dest


def _write_tree(repo: pygit2.Repository, tree: pygit2.Tree, dest: Path) -> None:
    for entry in tree:
        name = entry.name
        if name is None or name in (".", "..") or "/" in name:
            continue
        target = dest / name
        mode = entry.filemode
        if mode == pygit2.GIT_FILEMODE_TREE:
            target.mkdir(exist_ok=True)
            sub = repo[entry.id]
            assert isinstance(sub, pygit2.Tree)
            _write_tree(repo, sub, target)
        elif mode == pygit2.GIT_FILEMODE_COMMIT:
            target.mkdir(exist_ok=True)
        else:
            blob = repo[entry.id]
            assert isinstance(blob, pygit2.Blob)
            if mode == pygit2.GIT_FILEMODE_LINK:
                os.symlink(os.fsdecode(blob.data), target)
            else:
                target.write_bytes(blob.data)
                if mode == pygit2.GIT_FILEMODE_BLOB_EXECUTABLE:
                    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
