"""A fleet of test hosts on this machine: one OpenSSH sshd per host, each in its own namespace.

Every host is `unshare --mount --uts --propagation private` with per-host directories bound
over `/nix`, `/run`, `/etc`, `/root` and `/usr/local/sbin`, a per-host file over
`/proc/sys/kernel/random/boot_id`, its own hostname, and `sshd -D` listening on
`127.0.0.N:22`. So each host has its own Nix store, profiles, /run/current-system, users and
boot id, all inspectable from outside under the host's directory (`TestHost.path`).

Needs root. Usable from pytest fixtures, benchmarks and demo scripts (no pytest import here):

    with Fleet.start(tmp_path, 3) as fleet:
        subprocess.run(["ssh", "-F", fleet.ssh_config, "host1", "true"], check=True)

Also a small CLI: `python -m tests.fleet start --count N --dir D` / `stop --dir D`.

Layout of a fleet directory D:
    D/client_key[.pub]   the one client key of the fleet (authorized on every host)
    D/authorized_keys    the client public key, sshd's AuthorizedKeysFile on every host
    D/known_hosts        every host's key under its address (and its name)
    D/ssh_config         a `Host <name>` block per host, for `ssh -F`
    D/fleet.json         hosts, addresses and PIDs (for `stop --dir D` from another process)
    D/hosts/<name>/      the host's directory H:
        nix/ run/ etc/ root/   bound over /nix, /run, /etc, /root (etc/ a copy of /etc, or
                               with etc="overlay" the upper layer of an overlay on /etc)
        sbin/reboot            bound over /usr/local/sbin: the simulated `reboot`
        boot_id                bound over /proc/sys/kernel/random/boot_id
        reboot-delay           seconds until sshd is back after `reboot`, or "never"
        sshd_config ssh_host_ed25519_key[.pub] boot.sh sshd.log reboot.log

Simulated reboot (`reboot` over ssh): the script detaches (setsid), kills every process in
the host's mount namespace (sshd's listener first, then sessions), empties /run (a tmpfs on a
real machine), points /run/current-system and /run/booted-system at the system profile if
there is one, waits `reboot-delay` seconds, writes a new boot id and execs sshd again (inside
the same namespace, so the mounts stay). With "never" it exits instead and the host stays down
until `Fleet.start_host`. The new sshd's PID is in H/run/sshd.pid (`Fleet.sshd_pid`).

Changing a host after the start: `configure_sshd` (more sshd_config lines, e.g. `LogLevel
DEBUG1` or `AllowUsers`; restarts the host), `listen_also` (an extra loopback address and port
such as [::1]:2222, with its known_hosts entry), `add_user` (a non-root login user, optionally
with passwordless sudo logged to the host's /run/sudo.log; its key goes to the host's own
/etc/ssh/authorized_keys.d/<user>, sshd's second AuthorizedKeysFile, so the fleet directory
needs no special mode), `share` (a directory of this machine below a per-host mount, e.g. a
pyenv Python under /root, made visible inside the host).

Processes of a host are found by namespace, not by remembered PIDs: a process belongs to host
H when its mount namespace shows H/nix at /nix (`/proc/PID/root/nix` is H/nix).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import ClassVar, Literal, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SSHD = "/usr/sbin/sshd"
SSH_PORT = 22
DEFAULT_REBOOT_DELAY = 1.0
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

# Host-absolute mount point -> directory (or file) under the host's directory.
MOUNTS: Mapping[str, str] = {
    "/nix": "nix",
    "/run": "run",
    "/etc": "etc",
    "/root": "root",
    "/usr/local/sbin": "sbin",
    "/proc/sys/kernel/random/boot_id": "boot_id",
}

EtcMode = Literal["copy", "overlay"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*\Z")
# The environment sshd starts with (sessions get sshd's own defaults, not this).
_SSHD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class FleetError(Exception):
    """A test host could not be started, reached or stopped."""


@dataclass(frozen=True)
class TestHost:
    """One test host: `root` is its directory H on this machine, `pid` the sshd it booted with.

    After a simulated reboot sshd has a new PID; `sshd_pid()` reads the current one.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class

    name: str
    address: str
    root: Path
    pid: int
    etc: EtcMode = "copy"

    @property
    def port(self) -> int:
        return SSH_PORT

    @property
    def target(self) -> str:
        """`root@127.0.0.N`, as an ssh destination."""
        return f"root@{self.address}"

    def path(self, p: str | PurePosixPath) -> Path:
        """The path on this machine of host-absolute path `p` (no symlinks followed).

        `/run/x` -> H/run/x, `/nix/store/...` -> H/nix/store/..., `/etc`, `/root` and
        `/usr/local/sbin` likewise; anything else is shared with this machine and maps to itself.
        Use `resolve` to follow links the way the host would (`/run/current-system`).
        With etc="overlay", `/etc/x` maps to H/etc/x if the host changed it, to a path that
        does not exist if the host deleted it, else to this machine's /etc/x.
        """
        pure = PurePosixPath(p)
        if not pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"not a normalised absolute path: {p}")
        for mount, local in MOUNTS.items():
            mp = PurePosixPath(mount)
            if pure == mp or mp in pure.parents:
                if mount == "/etc" and self.etc == "overlay":
                    return _overlay_path(self.root / local, pure.relative_to(mp))
                return self.root / local / pure.relative_to(mp)
        return Path(pure)

    def readlink(self, p: str | PurePosixPath) -> str:
        """The target of the host's symlink `p`, as the host sees it (e.g. a store path)."""
        return os.readlink(self.path(p))

    def resolve(self, p: str | PurePosixPath) -> Path:
        """Follow symlinks in `p` as the host would; return the resulting path on this machine."""
        todo = list(PurePosixPath(p).parts[1:])
        current = PurePosixPath("/")
        hops = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                current = current.parent
                continue
            candidate = current / part
            local = self.path(candidate)
            if local.is_symlink():
                hops += 1
                if hops > 40:
                    raise FleetError(f"{self.name}: too many levels of symlinks in {p}")
                target = PurePosixPath(os.readlink(local))
                if target.is_absolute():
                    current = PurePosixPath("/")
                todo[:0] = list(target.parts[1:] if target.is_absolute() else target.parts)
            else:
                current = candidate
        return self.path(current)

    def boot_id(self) -> str:
        """The boot id the host reports in /proc/sys/kernel/random/boot_id."""
        return (self.root / "boot_id").read_text().strip()

    def sshd_pid(self) -> int | None:
        """The PID of the host's running sshd listener (from H/run/sshd.pid), if any."""
        try:
            pid = int((self.root / "run" / "sshd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self.pid_is_mine(pid) else None

    def processes(self) -> list[int]:
        """PIDs of every live process in this host's mount namespace."""
        return _host_processes([self]).get(self.name, [])

    def pid_is_mine(self, pid: int) -> bool:
        """Whether process `pid` lives in this host's mount namespace."""
        try:
            return os.path.samestat(os.stat(f"/proc/{pid}/root/nix"), os.stat(self.root / "nix"))
        except OSError:
            return False

    def accepts(self, timeout: float = 0.5) -> bool:
        """Whether sshd answers on the host's address with an SSH banner right now."""
        return _banner(self.address, SSH_PORT, timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.root / "sshd.log").read_text(errors="replace")
        except OSError:
            return "(no sshd log)"
        return "\n".join(text.splitlines()[-lines:]) or "(sshd log is empty)"


@dataclass(frozen=True)
class FleetEnv:
    """What a client (Waggle) needs to reach the fleet."""

    ssh_config: Path
    known_hosts: Path
    client_key: Path
    addresses: Mapping[str, str]  # host name -> 127.0.0.N

    def ssh_argv(self, name: str, command: str) -> list[str]:
        """`ssh -F ssh_config NAME -- COMMAND` (COMMAND is one shell string)."""
        return ["ssh", "-F", str(self.ssh_config), name, "--", command]


class Fleet:
    """A running fleet of test hosts. Use `Fleet.start(...)`, as a context manager."""

    def __init__(self, directory: Path, hosts: Sequence[TestHost]) -> None:
        self.directory = directory
        self._hosts: dict[str, TestHost] = {h.name: h for h in hosts}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._namespaces: dict[str, set[tuple[int, int]]] = {}  # host -> every one it ran in

    # -- paths --------------------------------------------------------------------------
    @property
    def client_key(self) -> Path:
        return self.directory / "client_key"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.directory / "ssh_config"

    @property
    def authorized_keys(self) -> Path:
        return self.directory / "authorized_keys"

    def env(self) -> FleetEnv:
        return FleetEnv(
            ssh_config=self.ssh_config,
            known_hosts=self.known_hosts,
            client_key=self.client_key,
            addresses={h.name: h.address for h in self.hosts},
        )

    # -- hosts --------------------------------------------------------------------------
    @property
    def hosts(self) -> list[TestHost]:
        return list(self._hosts.values())

    @property
    def names(self) -> list[str]:
        return list(self._hosts)

    def host(self, name: str) -> TestHost:
        try:
            return self._hosts[name]
        except KeyError:
            raise FleetError(f"no host named {name!r} in this fleet") from None

    def __getitem__(self, name: str) -> TestHost:
        return self.host(name)

    def __iter__(self) -> Iterator[TestHost]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self._hosts)

    def sshd_pid(self, name: str) -> int | None:
        return self.host(name).sshd_pid()

    def set_reboot_delay(self, name: str, seconds: float | None) -> None:
        """Seconds until sshd is back after `reboot` on host `name`; None: never comes back."""
        text = "never" if seconds is None else f"{float(seconds)}"
        (self.host(name).root / "reboot-delay").write_text(text + "\n")

    # -- changing a host --------------------------------------------------------------------
    def configure_sshd(self, name: str, *lines: str) -> TestHost:
        """Append `lines` to host `name`'s sshd_config and restart the host (`start_host`).

        The host keeps its directories (/run too); its sessions are ended. Later simulated
        reboots start sshd with the changed config as well.
        """
        config = self.host(name).root / "sshd_config"
        with config.open("a") as f:
            f.write("".join(f"{line}\n" for line in lines))
        return self.start_host(name)

    def listen_also(self, name: str, address: str, port: int) -> None:
        """Host `name`'s sshd also listens on loopback `address`:`port` (e.g. "::1", 2222).

        known_hosts gets the host's key under `[address]:port` (or `address` for port 22),
        as OpenSSH and asyncssh look it up. Restarts the host (`configure_sshd`).
        """
        ip = ipaddress.ip_address(address)
        if not ip.is_loopback:
            raise ValueError(f"{address} is not a loopback address")
        if not 1 <= port <= 65535:
            raise ValueError(f"bad port {port}")
        host = self.host(name)
        key = " ".join((host.root / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        pattern = address if port == SSH_PORT else f"[{address}]:{port}"
        with self.known_hosts.open("a") as f:
            f.write(f"{pattern} {key}\n")
        listen = f"[{address}]:{port}" if ip.version == 6 else f"{address}:{port}"
        self.configure_sshd(name, f"ListenAddress {listen}")
        _poll(
            lambda: _banner(address, port, 0.2),
            START_TIMEOUT,
            f"{name} did not accept SSH on {listen}",
        )

    def share(self, name: str, path: str | Path) -> None:
        """Show this machine's directory `path` at the same place inside host `name`.

        For what a command on the host needs from below the per-host mounts, e.g. a Python
        installed under /root (pyenv) that a venv on the shared filesystem points at. The
        host gets a symlink at `path` to this process's view of it, /proc/PID/root/`path`
        (bind-mounting from another mount namespace does not work here), so it works while this
        process lives. Refuses when something else already is at `path` on the host.
        """
        local = Path(path)
        if not local.is_absolute() or ".." in local.parts or not local.is_dir():
            raise ValueError(f"not a normalised absolute path of a directory: {path}")
        host = self.host(name)
        link = host.path(PurePosixPath(local))
        if link == local:
            return  # not below a per-host mount: the host sees it anyway
        source = f"/proc/{os.getpid()}/root{local}"
        if link.is_symlink() and os.readlink(link) == source:
            return
        if link.exists() or link.is_symlink():
            raise FleetError(f"{name} already has {local}; not replacing it")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)

    def add_user(self, name: str, user: str, *, sudo: bool) -> None:
        """Create login user `user` on host `name`; the fleet's client key logs in as it.

        The user lives in the host's own /etc (home "/", nothing created on this machine);
        its authorized key is the host's /etc/ssh/authorized_keys.d/<user> (sshd's second
        AuthorizedKeysFile, readable by the user whatever the fleet directory's mode). With
        `sudo`: passwordless sudo for everything (/etc/sudoers.d/<user>), each command logged
        to the host's /run/sudo.log, and the host's name in its /etc/hosts (sudo resolves it;
        it must never ask a DNS server). Idempotent.
        """
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", user) or user == "root":
            raise ValueError(f"bad user name {user!r}")
        host = self.host(name)
        q = shlex.quote
        key = self.authorized_keys.read_text()
        lines = [
            "set -e",
            f"id -u {q(user)} >/dev/null 2>&1 || useradd -M -d / -s /bin/sh -p '*' {q(user)}",
            "mkdir -p /etc/ssh/authorized_keys.d",
            "chmod 0755 /etc/ssh/authorized_keys.d",
            f"cat > /etc/ssh/authorized_keys.d/{q(user)}",
            f"chmod 0644 /etc/ssh/authorized_keys.d/{q(user)}",
        ]
        if sudo:
            rules = (
                f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n"
                f"Defaults:{user} logfile=/run/sudo.log, loglinelen=0\n"
            )
            lines += [
                f"printf %s {q(rules)} > /etc/sudoers.d/{q(user)}",
                f"chmod 0440 /etc/sudoers.d/{q(user)}",
                f"visudo -c -q -f /etc/sudoers.d/{q(user)}",
                (
                    f"awk -v n={q(host.name)} '{{for (i = 2; i <= NF; i++) if ($i == n) f = 1}}"
                    f" END {{exit !f}}' /etc/hosts"
                    f" || echo {q(f'127.0.0.1 {host.name}')} >> /etc/hosts"
                ),
            ]
        done = self.run(name, "\n".join(lines), stdin=key.encode())
        if done.returncode != 0:
            raise FleetError(
                f"adding user {user} on {name} failed (exit {done.returncode}):"
                f" {done.stderr.decode(errors='replace').strip()}"
            )

    # -- running commands (OpenSSH client) ------------------------------------------------
    def ssh_argv(self, name: str, command: str) -> list[str]:
        return self.env().ssh_argv(self.host(name).name, command)

    def run(
        self, name: str, command: str, *, stdin: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """Run shell `command` on host `name` as root with `ssh -F ssh_config`; no check."""
        return subprocess.run(
            self.ssh_argv(name, command),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        directory: Path,
        count: int,
        *,
        first_octet: int = 2,
        names: Sequence[str] | None = None,
        timeout: float = START_TIMEOUT,
        stop_at_exit: bool = True,
        etc: EtcMode = "copy",
    ) -> Fleet:
        """Start `count` hosts on 127.0.0.<first_octet>, <first_octet + 1>, ... port 22.

        Names default to host1..hostN. Each host's /etc is a copy of this machine's (`cp -a`,
        about 0.9 s of disk work per host here) or, with etc="overlay", an overlay whose upper
        layer H/etc holds only what the host changed (instant; see `TestHost.path`).
        Returns once every host answers with an SSH banner; raises FleetError (naming the
        host, with its sshd log tail) otherwise, after stopping whatever it started. With `stop_at_exit`, the fleet is stopped at interpreter exit if
        nobody stopped it before.
        """
        _check_can_run()
        names = list(names) if names is not None else [f"host{i}" for i in range(1, count + 1)]
        if len(names) != count:
            raise ValueError(f"{count} hosts but {len(names)} names")
        if len(set(names)) != count:
            raise ValueError("host names must be unique")
        for name in names:
            if not _NAME.match(name):
                raise ValueError(f"bad host name {name!r}")
        addresses = [_address(first_octet + i) for i in range(count)]
        busy = [a for a in addresses if not _port_free(a)]
        if busy:
            raise FleetError(f"port {SSH_PORT} already in use on {', '.join(busy)}")

        if etc not in ("copy", "overlay"):
            raise ValueError(f"etc must be 'copy' or 'overlay', not {etc!r}")
        directory = Path(directory).resolve()
        _check_directory(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "hosts").exists():
            raise FleetError(f"{directory} already holds a fleet (hosts/ exists)")

        client = _write_keypair(directory / "client_key", "waggle-test-fleet")
        (directory / "authorized_keys").write_text(client + "\n")
        roots = [directory / "hosts" / name for name in names]
        with ThreadPoolExecutor(max_workers=min(8, count) or 1) as pool:
            host_keys = list(
                pool.map(
                    _prepare_host_dir, roots, names, [directory] * count, addresses, [etc] * count
                )
            )
        known = [f"{a},{n} {k}" for a, n, k in zip(addresses, names, host_keys, strict=True)]
        (directory / "known_hosts").write_text("".join(line + "\n" for line in known))
        (directory / "ssh_config").write_text(
            "".join(
                _ssh_config_block(directory, n, a) for n, a in zip(names, addresses, strict=True)
            )
        )

        fleet = cls(directory, [])
        procs = {name: _spawn(root) for name, root in zip(names, roots, strict=True)}
        fleet._procs = procs
        pending = [
            TestHost(name=n, address=a, root=r, pid=procs[n].pid, etc=etc)
            for n, a, r in zip(names, addresses, roots, strict=True)
        ]
        fleet._hosts = {h.name: h for h in pending}
        try:
            _wait_up(pending, procs, timeout)
        except BaseException:
            fleet.stop()
            raise
        fleet._remember_namespaces()
        fleet._save()
        if stop_at_exit:
            atexit.register(fleet.stop)
        return fleet

    @classmethod
    def load(cls, directory: Path) -> Fleet:
        """The fleet described by D/fleet.json (started by another process, e.g. the CLI)."""
        directory = Path(directory).resolve()
        data = json.loads((directory / "fleet.json").read_text())
        hosts = [
            TestHost(
                name=h["name"],
                address=h["address"],
                root=Path(h["root"]),
                pid=h["pid"],
                etc=h.get("etc", "copy"),
            )
            for h in data["hosts"]
        ]
        return cls(directory, hosts)

    def stop(self) -> None:
        """Kill every process of every host (by namespace) and wait until they are gone."""
        atexit.unregister(self.stop)
        _kill_hosts(self.hosts, {ns for seen in self._namespaces.values() for ns in seen})
        self._namespaces.clear()
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()

    def stop_host(self, name: str) -> None:
        """Kill host `name`'s sshd, its sessions and anything else in its namespace."""
        host = self.host(name)
        others = [h for h in self.hosts if h.name != name]
        _kill_hosts([host], self._namespaces.pop(name, set()), spare=others)
        # Emptied namespaces are gone, and the kernel reuses their numbers: forgetting them
        # keeps a later stop from taking another host's new namespace for this one's.
        proc = self._procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def start_host(
        self, name: str, *, new_boot: bool = False, timeout: float = START_TIMEOUT
    ) -> TestHost:
        """(Re)start host `name` with the same keys and directories in a fresh namespace.

        Whatever still runs of it is killed first. With `new_boot`, it comes up as after a
        reboot: empty /run, current-system from the system profile, a new boot id.
        """
        old = self.host(name)
        self.stop_host(name)
        if new_boot:
            _fresh_boot(old.root)
        proc = _spawn(old.root)
        self._procs[name] = proc
        host = TestHost(
            name=old.name, address=old.address, root=old.root, pid=proc.pid, etc=old.etc
        )
        self._hosts[name] = host
        _wait_up([host], {name: proc}, timeout)
        self._remember_namespaces()
        self._save()
        return host

    def _remember_namespaces(self) -> None:
        """Every mount namespace a host of this fleet ran in, for `stop` to empty."""
        for host in self.hosts:
            if (ns := _mount_namespace(host.pid)) is not None:
                self._namespaces.setdefault(host.name, set()).add(ns)

    def wait_until_up(self, name: str, timeout: float = START_TIMEOUT) -> float:
        """Wait until host `name` answers with an SSH banner; return the seconds waited."""
        host = self.host(name)
        return _poll(lambda: host.accepts(), timeout, f"{name} ({host.address}) did not come up")

    def wait_until_down(self, name: str, timeout: float = START_TIMEOUT) -> float:
        """Wait until host `name` refuses connections; return the seconds waited."""
        host = self.host(name)
        return _poll(lambda: not host.accepts(), timeout, f"{name} ({host.address}) stays up")

    def _save(self) -> None:
        data = {
            "hosts": [
                {
                    "name": h.name,
                    "address": h.address,
                    "root": str(h.root),
                    "pid": h.pid,
                    "etc": h.etc,
                }
                for h in self.hosts
            ],
            "ssh_config": str(self.ssh_config),
            "known_hosts": str(self.known_hosts),
            "client_key": str(self.client_key),
        }
        (self.directory / "fleet.json").write_text(json.dumps(data, indent=2) + "\n")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def free_first_octet(count: int, start: int = 2) -> int:
    """The first N >= start such that port 22 is free on 127.0.0.N .. 127.0.0.(N+count-1)."""
    n = start
    while n + count - 1 < 255:
        busy = [i for i in range(count) if not _port_free(_address(n + i))]
        if not busy:
            return n
        n += busy[-1] + 1
    raise FleetError(f"no block of {count} free addresses in 127.0.0.{start}-254")


def processes_in_namespace_of(pid: int) -> list[int]:
    """PIDs of every live process in the mount namespace of process `pid`."""
    try:
        target = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.path.samestat(os.stat(f"/proc/{entry.name}/ns/mnt"), target):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# -- internals ---------------------------------------------------------------------------


def _banner(address: str, port: int, timeout: float) -> bool:
    """Whether an SSH server answers on address:port with its banner right now."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _address(octet: int) -> str:
    if not 1 <= octet <= 254:
        raise ValueError(f"127.0.0.{octet} is not a usable test host address")
    return str(ipaddress.IPv4Address("127.0.0.0") + octet)


def _port_free(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, SSH_PORT))
        except OSError:
            return False
    return True


def _check_can_run() -> None:
    if os.geteuid() != 0:
        raise FleetError("a test fleet needs root (mount namespaces, port 22)")
    for tool in (SSHD, "/usr/bin/unshare", "/usr/bin/setsid"):
        if not os.access(tool, os.X_OK):
            raise FleetError(f"{tool} is missing")
    for mount in MOUNTS:
        if not os.path.exists(mount):
            raise FleetError(f"{mount} does not exist on this machine (needed as a mount point)")


def _check_directory(directory: Path) -> None:
    # Bound over inside the namespace, H must stay reachable at the same path there.
    for mount in MOUNTS:
        if directory == Path(mount) or Path(mount) in directory.parents:
            raise FleetError(f"a fleet directory cannot live under {mount}: {directory}")
    if re.search(r"[\s,:'\"\\]", str(directory)):
        raise FleetError(
            f"a fleet directory needs a plain path (no spaces, ',' or ':'): {directory}"
        )


def _write_keypair(path: Path, comment: str) -> str:
    """Write a fresh ed25519 key pair (OpenSSH format, private 0600); return the public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    line = public.decode()
    path.with_name(path.name + ".pub").write_text(f"{line} {comment}\n")
    return line


def _prepare_host_dir(root: Path, name: str, directory: Path, address: str, etc: EtcMode) -> str:
    """Create H with its mount sources, config and scripts; return its public host key."""
    for sub in ("nix", "run", "root", "sbin", "etc"):
        (root / sub).mkdir(parents=True)
    (root / "root").chmod(0o700)
    (root / "run" / "sshd").mkdir(mode=0o755)
    if etc == "copy":
        subprocess.run(["cp", "-a", "/etc/.", f"{root / 'etc'}/"], check=True)
    else:
        (root / "etc-work").mkdir()
    (root / "etc" / "hostname").write_text(name + "\n")
    # No network here: a host must never try a binary cache.
    nix_conf = root / "etc" / "nix" / "nix.conf"
    nix_conf.parent.mkdir(parents=True, exist_ok=True)
    machine_conf = Path("/etc/nix/nix.conf")
    base = machine_conf.read_text() if etc == "overlay" and machine_conf.is_file() else ""
    with nix_conf.open("a") as f:
        f.write(base + "\n# test fleet: no network\nsubstituters =\n")
    (root / "boot_id").write_text(f"{uuid.uuid4()}\n")
    (root / "reboot-delay").write_text(f"{DEFAULT_REBOOT_DELAY}\n")
    host_key = _write_keypair(root / "ssh_host_ed25519_key", f"root@{name}")
    (root / "sshd_config").write_text(_sshd_config(root, address, directory / "authorized_keys"))
    _write_script(root / "boot.sh", _boot_script(root, name, etc))
    _write_script(root / "sbin" / "reboot", _reboot_script(root, name))
    return host_key


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _sshd_config(root: Path, address: str, authorized_keys: Path) -> str:
    return f"""\
# test fleet host (tests/fleet.py)
ListenAddress {address}
Port {SSH_PORT}
HostKey {root / "ssh_host_ed25519_key"}
AuthorizedKeysFile {authorized_keys} /etc/ssh/authorized_keys.d/%u
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile /run/sshd.pid
MaxSessions 100
MaxStartups 100:30:200
PrintMotd no
PrintLastLog no
X11Forwarding no
UseDNS no
Subsystem sftp internal-sftp
"""


def _ssh_config_block(directory: Path, name: str, address: str) -> str:
    return f"""\
Host {name}
    HostName {address}
    Port {SSH_PORT}
    User root
    IdentityFile "{directory / "client_key"}"
    IdentitiesOnly yes
    UserKnownHostsFile "{directory / "known_hosts"}"
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10

"""


def _boot_script(root: Path, name: str, etc: EtcMode) -> str:
    h = shlex.quote(str(root))
    overlay = 'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$H/etc,workdir=$H/etc-work" /etc'
    binds = "\n".join(
        overlay if mount == "/etc" and etc == "overlay" else f'mount --bind "$H/{local}" {mount}'
        for mount, local in MOUNTS.items()
    )
    return f"""\
#!/bin/sh
# Boots test host {name} (tests/fleet.py). Run only as
#   unshare --mount --uts --propagation private /bin/sh {h}/boot.sh
set -eu
H={h}
if [ /proc/$$/ns/mnt -ef /proc/$PPID/ns/mnt ]; then
    echo "boot.sh: not in a mount namespace of its own; refusing to mount" >&2
    exit 1
fi
{binds}
hostname {shlex.quote(name)}
exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \\
    {SSHD} -D -e -f "$H/sshd_config" </dev/null
"""


def _reboot_script(root: Path, name: str) -> str:
    h = shlex.quote(str(root))
    return f"""\
#!/bin/sh
# Simulated reboot of test host {name} (tests/fleet.py). Bound over /usr/local/sbin/reboot.
# Seconds until sshd is back: $H/reboot-delay (a number, or "never").
H={h}
if ! [ /nix -ef "$H/nix" ]; then
    echo "reboot: not inside test host {name}; refusing" >&2
    exit 1
fi
if [ "${{1-}}" != --detached ]; then
    setsid -f "$H/sbin/reboot" --detached </dev/null >>"$H/reboot.log" 2>&1
    exit 0
fi
trap '' HUP
sleep 0.2  # let the caller's `reboot` return first
echo "$(date +%T.%N) going down"
# Every process in this mount namespace except this script's own process group.
kill_host() {{
    for _ in $(seq 100); do
        found=
        for d in /proc/[0-9]*; do
            [ "$d/ns/mnt" -ef /proc/$$/ns/mnt ] || continue
            read -r stat 2>/dev/null <"$d/stat" || continue
            set -- ${{stat##*) }}
            [ "$3" = "$$" ] && continue
            kill -KILL "${{d#/proc/}}" 2>/dev/null && found=1
        done
        [ -n "$found" ] || return 0
        sleep 0.05
    done
}}
if read -r listener 2>/dev/null </run/sshd.pid; then
    kill -KILL "$listener" 2>/dev/null
fi
kill_host
# /run is a tmpfs on a real machine: empty after a boot.
find /run -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +
mkdir -p /run/sshd
if [ -e /nix/var/nix/profiles/system ]; then
    system=$(readlink -f /nix/var/nix/profiles/system)
    ln -sfn "$system" /run/booted-system
    ln -sfn "$system" /run/current-system
fi
delay=$(cat "$H/reboot-delay" 2>/dev/null || echo {DEFAULT_REBOOT_DELAY})
if [ "$delay" = never ]; then
    echo "$(date +%T.%N) stays down"
    exit 0
fi
sleep "$delay"
cat /proc/sys/kernel/random/uuid >/proc/sys/kernel/random/boot_id
echo "$(date +%T.%N) up again, boot id $(cat /proc/sys/kernel/random/boot_id)"
exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \\
    {SSHD} -D -e -f "$H/sshd_config" </dev/null >>"$H/sshd.log" 2>&1
"""


def _overlay_path(upper: Path, rel: PurePosixPath) -> Path:
    """Where overlay path `rel` (below /etc) is on this machine: upper layer, or /etc."""
    for depth in range(1, len(rel.parts) + 1):
        part = upper.joinpath(*rel.parts[:depth])
        try:
            st = part.lstat()
        except FileNotFoundError:
            break  # not in the upper layer: the lower one shows through
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return upper.parent / "etc-deleted" / rel  # a whiteout: the host deleted it
        if not stat.S_ISDIR(st.st_mode) or depth == len(rel.parts):
            return upper / rel
    else:
        return upper / rel  # "/etc" itself
    return Path("/etc") / rel


def _fresh_boot(root: Path) -> None:
    """What a reboot does to a stopped host's state: empty /run, links, new boot id."""
    run = root / "run"
    for entry in run.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            subprocess.run(["rm", "-rf", "--", str(entry)], check=True)
        else:
            entry.unlink()
    (run / "sshd").mkdir(mode=0o755)
    profile = root / "nix" / "var" / "nix" / "profiles" / "system"
    if profile.is_symlink():
        host = TestHost(name=root.name, address="", root=root, pid=0)
        target = host.resolve("/nix/var/nix/profiles/system").relative_to(root / "nix")
        system = str(PurePosixPath("/nix") / target)
        for link in ("booted-system", "current-system"):
            (run / link).symlink_to(system)
    (root / "boot_id").write_text(f"{uuid.uuid4()}\n")


def _spawn(root: Path) -> subprocess.Popen[bytes]:
    with (root / "sshd.log").open("ab") as log:
        return subprocess.Popen(
            [
                "/usr/bin/unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "/bin/sh",
                str(root / "boot.sh"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_SSHD_ENV,
            start_new_session=True,
        )


def _wait_up(
    hosts: Sequence[TestHost], procs: Mapping[str, subprocess.Popen[bytes]], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    pending = list(hosts)
    while pending:
        still = []
        for host in pending:
            code = procs[host.name].poll()
            if code is not None:
                raise FleetError(
                    f"sshd of test host {host.name} ({host.address}) exited with status {code};"
                    f" {host.root / 'sshd.log'} ends:\n{host.log_tail()}"
                )
            if not host.accepts(timeout=0.2):
                still.append(host)
        pending = still
        if pending and time.monotonic() > deadline:
            host = pending[0]
            raise FleetError(
                f"test host {host.name} ({host.address}) did not accept SSH within {timeout} s"
                f" ({len(pending)} hosts pending); {host.root / 'sshd.log'} ends:\n"
                f"{host.log_tail()}"
            )
        if pending:
            time.sleep(0.02)
    for host in hosts:
        if not host.pid_is_mine(host.pid):
            raise FleetError(f"sshd of {host.name} is not in the host's namespace")


def _host_processes(hosts: Iterable[TestHost]) -> dict[str, list[int]]:
    """Live PIDs per host, found by mount namespace.

    A process is host H's when its /nix is H/nix, or its root is H/run/sshd (sshd's chrooted
    privilege-separation children), or it shares a mount namespace with such a process.
    """
    marks: dict[tuple[int, int], str] = {}  # (dev, ino) of H/nix and H/run/sshd -> host
    for host in hosts:
        for sub in ("nix", "run/sshd"):
            with contextlib.suppress(OSError):
                st = os.stat(host.root / sub)
                marks[(st.st_dev, st.st_ino)] = host.name
    own = os.stat("/proc/self/ns/mnt")
    owner: dict[tuple[int, int], str] = {}  # mount namespace -> host
    unknown: list[tuple[int, tuple[int, int]]] = []
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            ns = os.stat(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue  # gone, or a zombie
        if os.path.samestat(ns, own):
            continue
        key = (ns.st_dev, ns.st_ino)
        name, seen_other = None, False
        # Every process is probed, not only the first of its namespace: the kernel reuses a
        # dead namespace's number, even while this loop runs.
        for probe in (f"/proc/{pid}/root/nix", f"/proc/{pid}/root"):
            try:
                st = os.stat(probe)
            except OSError:
                continue
            name = marks.get((st.st_dev, st.st_ino))
            if name is not None:
                owner[key] = name
                break
            seen_other = True
        if name is not None:
            found.setdefault(name, []).append(pid)
        elif not seen_other:
            unknown.append((pid, key))  # cannot tell: its namespace's owner decides
    for pid, key in unknown:
        if key in owner:
            found.setdefault(owner[key], []).append(pid)
    return found


def _mount_namespace(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _in_namespaces(namespaces: set[tuple[int, int]]) -> list[int]:
    """Live processes in any of these mount namespaces (however they got there)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _mount_namespace(int(entry.name)) in namespaces:
            pids.append(int(entry.name))
    return pids


def _elsewhere(pid: int, own_nix: set[tuple[int, int]]) -> bool:
    """Whether process `pid` sees a /nix that is not one of `own_nix` (another host's, or
    this machine's): then it is not a host's stray, whatever its namespace's number.

    The kernel reuses the number of a namespace that died: Nix itself unshares a mount
    namespace (to remount the store), and may get the number of the namespace being emptied.
    """
    try:
        st = os.stat(f"/proc/{pid}/root/nix")
    except OSError:
        return False  # cannot tell (exiting, or no /nix there): a stray
    return (st.st_dev, st.st_ino) not in own_nix


def _kill_hosts(
    hosts: Sequence[TestHost],
    seen: Iterable[tuple[int, int]] = (),
    spare: Sequence[TestHost] = (),
) -> None:
    """SIGKILL every process of the hosts until none is left.

    Besides the processes `_host_processes` recognises, anything that is (or later appears)
    in a mount namespace seen for these hosts is killed too: a process forked while the
    others die (an sshd child for a connection arriving during the stop) must not outlive it.
    Namespaces the `spare` hosts live in now are never touched, nor processes whose /nix is
    not one of these hosts': a remembered namespace number may have been reused by the
    kernel (see `_elsewhere`).
    """
    deadline = time.monotonic() + STOP_TIMEOUT
    namespaces: set[tuple[int, int]] = set(seen)
    for host in hosts:  # the namespace the host was started in, even if nothing is left there
        if (ns := _mount_namespace(host.pid)) is not None:
            namespaces.add(ns)
    spared = {
        ns
        for pids in _host_processes(spare).values()
        for pid in pids
        if (ns := _mount_namespace(pid)) is not None
    }
    namespaces -= spared
    own_nix = set()
    for host in hosts:
        with contextlib.suppress(OSError):
            st = os.stat(host.root / "nix")
            own_nix.add((st.st_dev, st.st_ino))
    while True:
        found = _host_processes(hosts)
        for pids in found.values():
            namespaces |= {ns for pid in pids if (ns := _mount_namespace(pid)) is not None}
        strays = [
            pid
            for pid in _in_namespaces(namespaces)
            if pid != os.getpid() and not _elsewhere(pid, own_nix)
        ]
        if not found and not strays:
            return
        if time.monotonic() > deadline:
            raise FleetError(f"processes of test hosts survive SIGKILL: {found} {strays}")
        for pid in {*(p for pids in found.values() for p in pids), *strays}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _poll(check: Callable[[], bool], timeout: float, message: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise FleetError(f"{message} within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


# -- CLI ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fleet", description=(__doc__ or "").split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a fleet; prints the ssh_config path")
    start.add_argument("--count", type=int, required=True)
    start.add_argument("--dir", type=Path, required=True)
    start.add_argument("--first-octet", type=int, default=2)
    start.add_argument("--names", help="comma-separated host names (default host1..hostN)")
    start.add_argument("--etc", choices=["copy", "overlay"], default="copy", help="per-host /etc")
    stop = sub.add_parser("stop", help="stop the fleet in --dir")
    stop.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            names = args.names.split(",") if args.names else None
            began = time.monotonic()
            fleet = Fleet.start(
                args.dir,
                args.count,
                first_octet=args.first_octet,
                names=names,
                stop_at_exit=False,
                etc=args.etc,
            )
            print(
                f"{len(fleet)} hosts up in {time.monotonic() - began:.2f} s:"
                f" {fleet.hosts[0].address} .. {fleet.hosts[-1].address}",
                file=sys.stderr,
            )
            print(fleet.ssh_config)
        else:
            began = time.monotonic()
            Fleet.load(args.dir).stop()
            print(f"stopped in {time.monotonic() - began:.2f} s", file=sys.stderr)
    except (FleetError, ValueError, OSError) as e:
        print(f"fleet: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
