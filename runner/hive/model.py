"""The node model: typed, validated deployment settings read from the hive."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from typing_extensions import override

from runner.errors import HiveError

_UNIX_NAME = re.compile(r"^[a-z_][-a-z0-9_]*\$?$")
_PERMISSIONS = re.compile(r"^[0-7]{3,4}$")


class UploadAt(StrEnum):
    PRE_ACTIVATION = "pre-activation"
    POST_ACTIVATION = "post-activation"


@dataclass(frozen=True)
class KeySource:
    """Exactly one of text, key_file and key_command is set."""

    text: str | None = None
    key_file: str | None = None
    key_command: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        if self.text is not None:
            return "text"
        if self.key_file is not None:
            return "keyFile"
        return "keyCommand"

    @override
    def __repr__(self) -> str:  # never show key contents
        return f"KeySource({self.kind})"


@dataclass(frozen=True)
class Key:
    attr: str
    name: str
    source: KeySource
    dest_dir: str
    path: str
    user: str
    group: str
    permissions: str
    upload_at: UploadAt


@dataclass(frozen=True)
class NodeConfig:
    """A node's `deployment.*` settings."""

    name: str
    target_host: str | None
    target_port: int | None
    target_user: str | None
    allow_local_deployment: bool
    build_on_target: bool
    tags: tuple[str, ...]
    keys: tuple[Key, ...]
    replace_unknown_profiles: bool
    privilege_escalation_command: tuple[str, ...]
    ssh_options: tuple[str, ...]

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> NodeConfig:
        where = f"node {name}"
        try:
            keys = tuple(
                _key(name, attr, value) for attr, value in sorted(data.get("keys", {}).items())
            )
            _check_one_key_per_file(name, keys)
            port = data.get("targetPort")
            return cls(
                name=name,
                target_host=data.get("targetHost"),
                target_port=int(port) if port is not None else None,
                target_user=data.get("targetUser"),
                allow_local_deployment=bool(data.get("allowLocalDeployment", False)),
                build_on_target=bool(data.get("buildOnTarget", False)),
                tags=tuple(data.get("tags", ())),
                keys=keys,
                replace_unknown_profiles=bool(data.get("replaceUnknownProfiles", True)),
                privilege_escalation_command=tuple(
                    data.get("privilegeEscalationCommand", ("sudo", "-H", "--"))
                ),
                ssh_options=tuple(data.get("sshOptions", ())),
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise HiveError(f"{where}: unreadable deployment settings: {e}") from e


def _normalised(path: str) -> str:
    """ "/run//keys/./x" -> "/run/keys/x" (as modules.nix compares key paths)."""
    return "/" + "/".join(c for c in path.split("/") if c not in ("", "."))


def _check_one_key_per_file(node: str, keys: tuple[Key, ...]) -> None:
    """Two keys written to one file: each upload would silently replace the other."""
    seen: dict[str, str] = {}
    for key in keys:  # sorted by attribute name
        path = _normalised(key.path)
        if path in seen:
            raise HiveError(
                f"node {node}: deployment.keys.{seen[path]} and deployment.keys.{key.attr}"
                f" are both written to {path}"
            )
        seen[path] = key.attr


def _key(node: str, attr: str, data: dict[str, Any]) -> Key:
    where = f"node {node}: deployment.keys.{attr}"
    if attr in ("", ".", "..") or "/" in attr:
        raise HiveError(f"{where}: a key's attribute name must be a single path component")
    name = data.get("name", attr)
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name:
        raise HiveError(f"{where}: name {name!r} must be a single path component")
    text, key_file, key_command = data.get("text"), data.get("keyFile"), data.get("keyCommand")
    given = [s for s in ("text", "keyFile", "keyCommand") if data.get(s) is not None]
    if len(given) != 1:
        found = ", ".join(given) if given else "none"
        raise HiveError(
            f"{where}: exactly one of text, keyFile and keyCommand must be set (set: {found})"
        )
    if key_command is not None and (
        not isinstance(key_command, list)
        or not key_command
        or not all(isinstance(a, str) for a in key_command)
    ):
        raise HiveError(f"{where}: keyCommand must be a non-empty list of strings")
    dest_dir = str(data.get("destDir", "/run/keys"))
    if not dest_dir.startswith("/"):
        raise HiveError(f"{where}: destDir {dest_dir!r} must be an absolute path")
    user, group = str(data.get("user", "root")), str(data.get("group", "root"))
    for field, value in (("user", user), ("group", group)):
        if not _UNIX_NAME.match(value):
            raise HiveError(f"{where}: {field} {value!r} is not a valid user or group name")
    permissions = str(data.get("permissions", "0600"))
    if not _PERMISSIONS.match(permissions):
        raise HiveError(f"{where}: permissions {permissions!r} must be an octal mode like 0600")
    try:
        upload_at = UploadAt(data.get("uploadAt", "pre-activation"))
    except ValueError as e:
        raise HiveError(f"{where}: uploadAt must be pre-activation or post-activation") from e
    return Key(
        attr=attr,
        name=name,
        source=KeySource(
            text=text,
            key_file=key_file,
            key_command=tuple(key_command) if key_command is not None else None,
        ),
        dest_dir=dest_dir,
        path=str(data.get("path", f"{dest_dir.rstrip('/')}/{name}")),
        user=user,
        group=group,
        permissions=permissions,
        upload_at=upload_at,
    )


@dataclass(frozen=True)
class MetaConfig:
    name: str
    description: str
    machines_file: str | None
    allow_apply_all: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MetaConfig:
        return cls(
            name=str(data.get("name", "hive")),
            description=str(data.get("description", "")),
            machines_file=data.get("machinesFile"),
            allow_apply_all=bool(data.get("allowApplyAll", True)),
        )
