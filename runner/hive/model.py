"""The node model: typed, validated deployment settings read from the hive."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from typing_extensions import override

from runner.errors import HiveError

_UNIX_NAME = re.compile(r"^[a-z_][-a-z0-9_]*\$?$")
_PERMISSIONS = re.compile(r"^[0-7]{3,4}$")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")  # or an IPv4 address
_URL_PATH = re.compile(r"/[^\s\x00-\x1f\x7f#]*")


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
class CmdCheck:
    """`deployment.healthChecks.cmd` entry: argv run on the node; exit status 0 passes."""

    description: str
    cmd: tuple[str, ...]
    period: float = 2  # seconds between tries
    timeout: float = 5  # seconds the check may take in all to pass


@dataclass(frozen=True)
class HttpCheck:
    """`deployment.healthChecks.http` entry: a GET from the deployer; a 2xx answer passes."""

    description: str
    port: int
    scheme: str = "http"
    host: str | None = None  # None: the node's targetHost
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    period: float = 2
    timeout: float = 5
    insecure_ssl: bool = False

    def url(self, default_host: str) -> str:
        """The URL asked, with `default_host` when `host` is None (an IPv6 address bracketed)."""
        host = self.host if self.host is not None else default_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}{self.path}"


@dataclass(frozen=True)
class HealthChecks:
    """A node's `deployment.healthChecks`; false (and `empty`) when it has none."""

    cmd: tuple[CmdCheck, ...] = ()
    http: tuple[HttpCheck, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.cmd and not self.http

    def __bool__(self) -> bool:
        return not self.empty

    def __len__(self) -> int:
        return len(self.cmd) + len(self.http)

    def __iter__(self) -> Iterator[CmdCheck | HttpCheck]:
        """Every check, cmd checks first, each list in the hive's order."""
        yield from self.cmd
        yield from self.http


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
    health_checks: HealthChecks = HealthChecks()

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
                health_checks=_health_checks(name, data.get("healthChecks")),
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


def _health_checks(node: str, data: object) -> HealthChecks:
    where = f"node {node}: deployment.healthChecks"
    if data is None:
        return HealthChecks()
    if not isinstance(data, dict):
        raise HiveError(f"{where} must be an attribute set with cmd and http lists")
    unknown = sorted(set(data) - {"cmd", "http"})
    if unknown:
        raise HiveError(f"{where}: unknown option {unknown[0]} (there are cmd and http)")
    cmd, http = data.get("cmd") or [], data.get("http") or []
    for kind, entries in (("cmd", cmd), ("http", http)):
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise HiveError(f"{where}.{kind} must be a list of attribute sets")
    return HealthChecks(
        cmd=tuple(_cmd_check(f"{where}.cmd[{i}]", e) for i, e in enumerate(cmd)),
        http=tuple(_http_check(f"{where}.http[{i}]", e) for i, e in enumerate(http)),
    )


def _is_host(host: str) -> bool:
    """A host name, an IPv4 address or an IPv6 address (bare or in brackets)."""
    if _HOST_NAME.fullmatch(host):
        return True
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(bare).version == 6
    except ValueError:
        return False


def _check_description(where: str, data: dict[str, Any], allowed: set[str]) -> tuple[str, str]:
    """(the check's description, `where` with it) after refusing unknown attributes."""
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise HiveError(f"{where}: description must be a non-empty string")
    described = f"{where} ({' '.join(description.split())!r})"
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise HiveError(f"{described}: unknown option {unknown[0]}")
    return description, described


def _seconds(where: str, data: dict[str, Any], option: str, default: float) -> float:
    value = data.get(option, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HiveError(f"{where}: {option} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise HiveError(f"{where}: {option} must be more than 0 seconds, not {value!r}")
    return float(value)


def _cmd_check(where: str, data: dict[str, Any]) -> CmdCheck:
    description, where = _check_description(
        where, data, {"description", "cmd", "period", "timeout"}
    )
    cmd = data.get("cmd")
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise HiveError(f"{where}: cmd must be a non-empty list of strings")
    if not cmd[0]:
        raise HiveError(f"{where}: cmd must start with a program, not an empty string")
    return CmdCheck(
        description=description,
        cmd=tuple(cmd),
        period=_seconds(where, data, "period", 2),
        timeout=_seconds(where, data, "timeout", 5),
    )


def _http_check(where: str, data: dict[str, Any]) -> HttpCheck:
    description, where = _check_description(
        where,
        data,
        {"description", "scheme", "host", "port", "path", "headers"}
        | {"period", "timeout", "insecureSSL"},
    )
    scheme = data.get("scheme", "http")
    if scheme not in ("http", "https"):
        raise HiveError(f"{where}: scheme must be http or https, not {scheme!r}")
    host = data.get("host")
    if host is not None and (not isinstance(host, str) or not _is_host(host)):
        raise HiveError(f"{where}: host {host!r} is not a host name or address")
    port = data.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise HiveError(f"{where}: port must be a number from 1 to 65535, not {port!r}")
    path = data.get("path", "/")
    if not isinstance(path, str) or not _URL_PATH.fullmatch(path):
        raise HiveError(
            f"{where}: path {path!r} must start with / and hold no spaces or control characters"
        )
    headers = data.get("headers") or {}
    if not isinstance(headers, dict):
        raise HiveError(f"{where}: headers must be an attribute set of strings")
    for key, value in headers.items():
        if not isinstance(key, str) or not _HEADER_NAME.fullmatch(key):
            raise HiveError(f"{where}: headers: {key!r} is not a valid header name")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise HiveError(f"{where}: headers.{key} must be one line of text")
    insecure = data.get("insecureSSL", False)
    if not isinstance(insecure, bool):
        raise HiveError(f"{where}: insecureSSL must be true or false, not {insecure!r}")
    return HttpCheck(
        description=description,
        port=port,
        scheme=scheme,
        host=host,
        path=path,
        headers=tuple(sorted(headers.items())),
        period=_seconds(where, data, "period", 2),
        timeout=_seconds(where, data, "timeout", 5),
        insecure_ssl=insecure,
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
