"""The git commit a hive comes from, for reports (pygit2; None outside a repository)."""

from __future__ import annotations

from pathlib import Path

import pygit2


def head_commit(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        found = pygit2.discover_repository(str(path))
        if found is None:
            return None
        repo = pygit2.Repository(found)
        if repo.head_is_unborn:
            return None
        return str(repo.head.target)
    except (pygit2.GitError, KeyError, ValueError):
        return None
