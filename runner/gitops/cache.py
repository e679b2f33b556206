"""On-disk cache of one side's evaluation (node names, drvPaths, outPaths and, when asked
for, each node's HostAccess).

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
from typing import Any, ClassVar

from runner.hive.model import NodeConfig

CACHE_FORMAT = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class HostAccess:
    """How Waggle reaches a node's host and becomes root there: the deployment settings a
    pull request must not choose (see runner.gitops.trust)."""

    target_host: str | None
    target_port: int | None
    target_user: str | None
    ssh_options: tuple[str, ...]
    privilege_escalation_command: tuple[str, ...]

    # deployment option name -> field, in the order reports name them
    OPTIONS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("targetHost", "target_host"),
        ("targetPort", "target_port"),
        ("targetUser", "target_user"),
        ("sshOptions", "ssh_options"),
        ("privilegeEscalationCommand", "privilege_escalation_command"),
    )

    @classmethod
    def of(cls, config: NodeConfig) -> HostAccess:
        return cls(
            config.target_host,
            config.target_port,
            config.target_user,
            config.ssh_options,
            config.privilege_escalation_command,
        )

    def differences(self, other: HostAccess) -> tuple[str, ...]:
        """The deployment options (`targetHost`, ...) whose values differ."""
        return tuple(o for o, f in self.OPTIONS if getattr(self, f) != getattr(other, f))

    def to_json(self) -> dict[str, Any]:
        return {o: _plain(getattr(self, f)) for o, f in self.OPTIONS}

    @classmethod
    def from_json(cls, data: Any) -> HostAccess:
        port = data["targetPort"]
        return cls(
            target_host=None if data["targetHost"] is None else str(data["targetHost"]),
            target_port=None if port is None else int(port),
            target_user=None if data["targetUser"] is None else str(data["targetUser"]),
            ssh_options=tuple(str(o) for o in data["sshOptions"]),
            privilege_escalation_command=tuple(str(a) for a in data["privilegeEscalationCommand"]),
        )


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class SideNode:
    """One node's evaluation on one side of a plan; `access` only when it was asked for
    (None with `access_error` when the node's deployment settings do not evaluate)."""

    drv_path: str | None
    out_path: str | None
    error: str | None = None
    detail: str = ""
    access: HostAccess | None = None
    access_error: str | None = None


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
                n: {
                    "drv": v.drv_path,
                    "out": v.out_path,
                    "error": v.error,
                    "detail": v.detail,
                    "access": None if v.access is None else v.access.to_json(),
                    "access_error": v.access_error,
                }
                for n, v in self.nodes.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> SideEval | None:
        try:
            if data.get("format") != CACHE_FORMAT:
                return None
            nodes = {
                str(n): SideNode(
                    v["drv"],
                    v["out"],
                    v.get("error"),
                    v.get("detail", ""),
                    None if v.get("access") is None else HostAccess.from_json(v["access"]),
                    v.get("access_error"),
                )
                for n, v in data["nodes"].items()
            }
            return cls(tuple(str(n) for n in data["names"]), nodes)
        except (AttributeError, KeyError, TypeError, ValueError):
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
