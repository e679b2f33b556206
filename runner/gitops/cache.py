"""On-disk cache of one side's evaluation (node names, drvPaths, outPaths).

A file per (tree, Nix version, what was asked): `<tree id>-<nix version>-<key>.json` in
the cache directory, where `key` hashes the hive's path in the tree, the selection, the
Nix flags and NIX_PATH. The tree id covers every file of the commit, so a hit means the
same inputs from the repository; inputs from outside it (NIX_PATH, --impure reads) are in
the key only as far as they are named. The directory can be a CI cache directory: files
are written atomically and never change once written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class SideNode:
    """One node's evaluation on one side of a plan."""

    drv_path: str | None
    out_path: str | None
    error: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class SideEval:
    """One side (base or head) of a plan: the selected nodes and their evaluation."""

    names: tuple[str, ...]  # the selected nodes, sorted
    nodes: dict[str, SideNode]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "names": list(self.names),
            "nodes": {
                n: {"drv": v.drv_path, "out": v.out_path, "error": v.error, "detail": v.detail}
                for n, v in self.nodes.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> SideEval | None:
        try:
            if data.get("format") != CACHE_FORMAT:
                return None
            nodes = {
                str(n): SideNode(v["drv"], v["out"], v.get("error"), v.get("detail", ""))
                for n, v in data["nodes"].items()
            }
            return cls(tuple(str(n) for n in data["names"]), nodes)
        except (AttributeError, KeyError, TypeError):
            return None


def cache_key(*parts: Any) -> str:
    raw = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def cache_file(directory: Path, tree_id: str, nix_version: str, key: str) -> Path:
    return directory / f"{tree_id}-{_UNSAFE.sub('_', nix_version)}-{key}.json"


def load(path: Path) -> SideEval | None:
    """The cached side, or None when missing or unreadable (a miss, never an error)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return SideEval.from_json(data)


def store(path: Path, side: SideEval) -> None:
    """Write atomically; a cache that cannot be written is skipped silently."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(side.to_json(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
