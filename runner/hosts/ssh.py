"""Hosts over SSH with asyncssh: one connection per host for the whole run.

The user's ssh_config (Host aliases, HostName, Port, User, IdentityFile,
ProxyJump, UserKnownHostsFile, ...), then the system-wide /etc/ssh/ssh_config,
and ssh-agent are honoured as asyncssh reads them; `--ssh-config FILE` replaces
both files, as `ssh -F` does. `deployment.sshOptions` are translated into an
ssh_config snippet that takes precedence over those files (see
`translate_ssh_options`).

Host keys are always checked, and Waggle, not asyncssh, decides against what:
the known_hosts files that ssh_config names for the host (UserKnownHostsFile,
default ~/.ssh/known_hosts and ~/.ssh/known_hosts2; GlobalKnownHostsFile,
default /etc/ssh/ssh_known_hosts and /etc/ssh/ssh_known_hosts2) plus every
`--known-hosts FILE`, loaded here and handed to asyncssh for the target and for
each ProxyJump hop (which Waggle opens itself for that reason). `none` in a
config file means "no file of that kind", as in OpenSSH, never "trust any key";
in sshOptions it is refused, as is any option holding a newline, CR or NUL.
OpenSSH time values (`90s`, `1m`, `1h30m`) are accepted for ConnectTimeout and
ServerAliveInterval, in sshOptions and in config files.

A connection costs no parsing once one to the same host was made: what asyncssh read from
ssh_config is kept per (host, port, user, config files as they are now: name, mtime, size,
inode; the sshOptions snippet by content), the trusted keys per known_hosts files (same
stamps), so a file that changes is read again (`clear_caches` forgets both).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import re
import shlex
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import asyncssh
from asyncssh.config import SSHClientConfig, SSHConfig

from runner.hive.model import NodeConfig
from runner.hosts import HostError, LineCallback, RemoteResult, command_line
from runner.scripts import write_file_argv

log = logging.getLogger("waggle")

PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

# Options of `ssh` that map onto ssh_config keywords asyncssh understands.
_FLAG_KEYWORDS = {"-p": "Port", "-l": "User", "-i": "IdentityFile", "-J": "ProxyJump"}
_SWITCH_KEYWORDS = {"-A": ("ForwardAgent", "yes"), "-C": ("Compression", "yes")}
_VALUE_FLAGS = (*_FLAG_KEYWORDS, "-o", "-F")
# ssh_config keywords asyncssh reads (asyncssh/config.py); others are reported as ignored.
SUPPORTED_KEYWORDS = frozenset(
    k.lower()
    for k in (
        "AddressFamily",
        "BindAddress",
        "CASignatureAlgorithms",
        "CertificateFile",
        "ChallengeResponseAuthentication",
        "Ciphers",
        "Compression",
        "ConnectTimeout",
        "EnableSSHKeySign",
        "ForwardAgent",
        "ForwardX11Trusted",
        "GlobalKnownHostsFile",
        "GSSAPIAuthentication",
        "GSSAPIDelegateCredentials",
        "GSSAPIKeyExchange",
        "HostbasedAuthentication",
        "HostKeyAlgorithms",
        "HostKeyAlias",
        "HostName",
        "IdentitiesOnly",
        "IdentityAgent",
        "IdentityFile",
        "KbdInteractiveAuthentication",
        "KexAlgorithms",
        "MACs",
        "PasswordAuthentication",
        "PKCS11Provider",
        "PreferredAuthentications",
        "Port",
        "ProxyCommand",
        "ProxyJump",
        "PubkeyAuthentication",
        "RekeyLimit",
        "RemoteCommand",
        "RequestTTY",
        "SendEnv",
        "ServerAliveCountMax",
        "ServerAliveInterval",
        "SetEnv",
        "TCPKeepAlive",
        "User",
        "UserKnownHostsFile",
    )
)


# Keywords whose value is an OpenSSH time (convtime): 90, 90s, 1m30s, 1h, 2d, 1w.
TIME_KEYWORDS = {"connecttimeout": "ConnectTimeout", "serveraliveinterval": "ServerAliveInterval"}
_KNOWN_HOSTS_KEYWORDS = frozenset({"userknownhostsfile", "globalknownhostsfile"})
_TIME_PART = re.compile(r"([0-9]+)([smhdw]?)", re.IGNORECASE)
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_CONTROL = {"\n": "\\n", "\r": "\\r", "\0": "\\0"}
_OPTION = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)\s*(?:=\s*|\s+)(.*?)\s*\Z", re.DOTALL)
# User known-hosts files when ssh_config names none (OpenSSH's defaults).
USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
MAX_JUMPS = 8
CACHE_ENTRIES = 512  # parsed configs and known_hosts sets kept (then all are forgotten)

Stamp = tuple[int, int, int] | None  # (mtime_ns, size, inode) of a file; None: not there
_PARSED: dict[tuple[object, ...], asyncssh.SSHClientConnectionOptions] = {}
_KNOWN: dict[tuple[tuple[str, Stamp], ...], asyncssh.SSHKnownHosts] = {}


def clear_caches() -> None:
    """Forget every parsed ssh_config and known_hosts file (see the module doc)."""
    _PARSED.clear()
    _KNOWN.clear()


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _remember(cache: dict[Any, Any], key: object, value: object) -> None:
    if len(cache) >= CACHE_ENTRIES:
        cache.clear()
    cache[key] = value


class SshOptionError(HostError):
    """An SSH setting of a node (deployment.sshOptions, an ssh_config or known_hosts file)
    cannot be used; the node fails, the run goes on."""


def openssh_seconds(text: str) -> int | None:
    """An OpenSSH time value in seconds (`90`, `90s`, `1m30s`, `1h`, `2d`, `1w`), or None."""
    pos, total = 0, 0
    while pos < len(text):
        part = _TIME_PART.match(text, pos)
        if part is None:
            return None
        total += int(part.group(1)) * _TIME_UNITS[part.group(2).lower()]
        pos = part.end()
    return total if text else None


def _show(text: str) -> str:
    """`text` for a one-line message: control characters escaped, quoted if it has spaces."""
    for char, escaped in _CONTROL.items():
        text = text.replace(char, escaped)
    return shlex.quote(text) if re.search(r"\s", text) else text


def translate_ssh_options(
    options: Sequence[str], node: str | None = None
) -> tuple[list[str], list[str]]:
    """deployment.sshOptions -> (ssh_config lines, options ignored).

    `-o Key=Value` / `-oKey=Value` / `-o 'Key Value'`, `-p`, `-l`, `-i`, `-J`,
    `-F FILE` (an extra config file, returned as `Include FILE`), each also in
    the attached form (`-p2222`, `-i~/k`), `-A` and `-C` are understood; `~`
    in `-i` and `-F` is expanded, as ssh does. ConnectTimeout and
    ServerAliveInterval take OpenSSH time values and are written in seconds.
    `StrictHostKeyChecking` and ControlMaster-style options are ignored:
    Waggle always checks host keys and asyncssh multiplexes itself.

    Raises SshOptionError (naming `node` and the option) for a missing or bad
    value, for `none` as a known-hosts file (it cannot switch checking off),
    and for any newline, CR or NUL, which would inject ssh_config lines.
    """
    where = f"node {node}: deployment.sshOptions" if node else "deployment.sshOptions"

    def bad(shown: str, why: str) -> SshOptionError:
        return SshOptionError(f"{where}: {shown}: {why}")

    lines: list[str] = []
    ignored: list[str] = []
    i = 0
    while i < len(options):
        opt = options[i]
        flag, value = opt, None
        if opt in _VALUE_FLAGS:
            if i + 1 >= len(options):
                raise SshOptionError(f"{where}: {opt} needs a value")
            value = options[i + 1]
            shown = f"{opt} {_show(value)}"
            i += 2
        else:
            if opt[:2] in _VALUE_FLAGS and len(opt) > 2:
                flag, value = opt[:2], opt[2:]
            shown = _show(opt)
            i += 1
        if any(char in opt + (value or "") for char in _CONTROL):
            raise bad(shown, "newlines, carriage returns and NUL are not allowed")
        if value is not None and not value.strip():
            raise bad(shown, "empty value")
        if flag == "-p":
            assert value is not None
            if not (value.isdigit() and 1 <= int(value) <= 65535):
                raise bad(shown, "not a port number")
            lines.append(f"Port {int(value)}")
        elif flag in ("-l", "-J"):
            assert value is not None
            if re.search(r"\s", value):
                raise bad(shown, "no spaces allowed")
            lines.append(f"{_FLAG_KEYWORDS[flag]} {value}")
        elif flag in ("-i", "-F"):
            assert value is not None
            keyword = "IdentityFile" if flag == "-i" else "Include"
            lines.append(f"{keyword} {shlex.quote(os.path.expanduser(value))}")
        elif flag in _SWITCH_KEYWORDS:
            key, v = _SWITCH_KEYWORDS[flag]
            lines.append(f"{key} {v}")
        elif flag == "-o":
            assert value is not None
            try:
                line = _translate_o(value)
            except ValueError as e:
                raise bad(shown, str(e)) from None
            if line is None:
                ignored.append(f"-o {value}")
            else:
                lines.append(line)
        else:
            ignored.append(opt)
    return lines, ignored


def _translate_o(text: str) -> str | None:
    """One `-o` option as an ssh_config line; None when asyncssh would not read it.

    Raises ValueError saying what is wrong with the value.
    """
    match = _OPTION.match(text)
    if match is None:
        return None
    key, value = match.groups()
    lower = key.lower()
    if lower not in SUPPORTED_KEYWORDS or not value:
        return None
    if lower in _KNOWN_HOSTS_KEYWORDS and any(v.lower() == "none" for v in value.split()):
        raise ValueError(
            f"{key} none is refused: host keys are always checked"
            " (name a known_hosts file here, or use --known-hosts)"
        )
    if lower in TIME_KEYWORDS:
        seconds = openssh_seconds(value)
        if seconds is None:
            raise ValueError("not an OpenSSH time (e.g. 30, 90s, 1m30s)")
        value = str(seconds)
    if lower == "serveralivecountmax" and not (value.isdigit() and int(value) > 0):
        raise ValueError("not a whole number above 0")
    return f"{key} {value}"


def _accept_openssh_times() -> None:
    """Let asyncssh's ssh_config reader take OpenSSH time values (it wants plain integers).

    asyncssh (config.py) parses ConnectTimeout and ServerAliveInterval with int(); OpenSSH
    with convtime, so `ServerAliveInterval 1m` in a config file that OpenSSH reads fine
    would fail every connection. The handler keeps asyncssh's rules otherwise: the first
    value seen wins, and a bad value is its ConfigParseError naming the file and line.
    """

    def set_time(config: SSHConfig, option: str, args: list[str]) -> None:
        value = args.pop(0)
        seconds = openssh_seconds(value)
        if seconds is None:
            config._error(f"Invalid {option} time value: {value}")
        options = config._options
        if option not in options:
            options[option] = seconds

    for lower, option in TIME_KEYWORDS.items():
        SSHClientConfig._handlers[lower] = (option, set_time)


_accept_openssh_times()


@dataclass(frozen=True)
class SshSettings:
    """Run-wide SSH settings."""

    # None: ~/.ssh/config, then `system_config` (as ssh does); else exactly these (as ssh -F).
    config_files: tuple[str, ...] | None = None
    connect_timeout: float = 30.0
    keepalive_interval: float = 10.0
    keepalive_count_max: int = 3
    # --known-hosts FILE: trusted for every host, besides the files ssh_config names.
    known_hosts_files: tuple[str, ...] = ()
    system_config: str | None = "/etc/ssh/ssh_config"
    # The GlobalKnownHostsFile when ssh_config names none (OpenSSH's default).
    system_known_hosts: tuple[str, ...] = (
        "/etc/ssh/ssh_known_hosts",
        "/etc/ssh/ssh_known_hosts2",
    )


@dataclass(frozen=True)
class SshTarget:
    node: str
    host: str
    port: int | None = None
    user: str | None = "root"
    ssh_options: tuple[str, ...] = ()
    escalation: tuple[str, ...] = ()  # used when user is not root

    @property
    def prefix(self) -> tuple[str, ...]:
        return () if self.user == "root" else self.escalation

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{host}{port}"


@dataclass(frozen=True)
class _Timeouts:
    connect: float
    keepalive: float
    keepalive_count: int


@dataclass
class SshHost:
    """A node's host over one asyncssh connection, reopened if it drops."""

    target: SshTarget
    settings: SshSettings = field(default_factory=SshSettings)
    name: str = ""
    duplex: ClassVar[bool] = True  # run_fed's input may wait for its output (hosts.duplex)
    _conn: asyncssh.SSHClientConnection | None = None
    _jumps: list[asyncssh.SSHClientConnection] = field(default_factory=list)
    _snippet: str | None = None
    ignored_options: list[str] = field(default_factory=list)
    _connecting: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.name = self.target.node

    def _config_files(self) -> list[str]:
        """The ssh_config files without the sshOptions snippet (what jump hosts read)."""
        if self.settings.config_files is not None:
            return list(self.settings.config_files)
        candidates = [Path.home() / ".ssh" / "config"]
        if self.settings.system_config:
            candidates.append(Path(self.settings.system_config))
        return [str(p) for p in candidates if p.is_file()]

    def _config(self) -> tuple[list[str], list[str]]:
        """(the target's ssh_config files, the sshOptions lines at their head)."""
        lines, self.ignored_options = translate_ssh_options(
            self.target.ssh_options, self.target.node
        )
        if self.ignored_options:
            log.warning(
                "node %s: deployment.sshOptions ignored: %s",
                self.target.node,
                " ".join(self.ignored_options),
            )
        files = self._config_files()
        if not lines:
            return files, lines
        if self._snippet is None:
            fd, path = tempfile.mkstemp(prefix="waggle-ssh-", suffix=".conf")
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"{line}\n" for line in lines))
            self._snippet = path
        return [self._snippet, *files], lines

    def _timeouts(self, lines: Sequence[str]) -> _Timeouts:
        """The run-wide timeouts, unless the node's sshOptions set their own."""
        own: dict[str, str] = {}
        for line in lines:
            key, _, value = line.partition(" ")
            own.setdefault(key.lower(), value)  # the first one counts, as in ssh_config
        s = self.settings
        connect = float(own.get("connecttimeout", 0)) or s.connect_timeout
        keepalive = float(own.get("serveraliveinterval", s.keepalive_interval))
        count = int(own.get("serveralivecountmax", s.keepalive_count_max))
        return _Timeouts(connect, keepalive, count)

    def _option_error(self, error: ValueError) -> SshOptionError:
        text = " ".join(str(error).split()) or type(error).__name__
        if self._snippet is not None:
            text = re.sub(rf"{re.escape(self._snippet)} line \d+", "deployment.sshOptions", text)
        return SshOptionError(f"node {self.target.node}: ssh settings: {text}")

    def _known_hosts(self, config: SSHConfig) -> asyncssh.SSHKnownHosts:
        """The keys trusted for this connection, from real files only (see the module doc);
        the same files, unchanged, give the same parsed set (no reading, no parsing)."""
        user = _file_names(config.get("UserKnownHostsFile"), USER_KNOWN_HOSTS)
        system = _file_names(config.get("GlobalKnownHostsFile"), self.settings.system_known_hosts)
        paths = [_expand_path(n) for n in (*user, *system, *self.settings.known_hosts_files)]
        key = tuple((path, _stamp(path)) for path in paths)
        cached = _KNOWN.get(key)
        if cached is not None:
            return cached
        known = asyncssh.SSHKnownHosts()
        for path in paths:
            try:
                text = Path(path).read_text(encoding="utf-8", errors="replace")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue  # as OpenSSH: a known_hosts file that is not there trusts nothing
            except OSError as e:
                raise SshOptionError(
                    f"node {self.target.node}: known_hosts file {path}: {e.strerror or e}"
                ) from e
            if not text.strip():
                continue
            try:
                known.load(text)
            except ValueError as e:
                raise SshOptionError(
                    f"node {self.target.node}: known_hosts file {path}: {e}"
                ) from e
        _remember(_KNOWN, key, known)
        return known

    async def _parsed(
        self, host: str, port: int | None, user: str | None, config: list[str]
    ) -> asyncssh.SSHClientConnectionOptions:
        """asyncssh's view of ssh_config for this host (its known-hosts files, ProxyJump,
        IdentityFile, ...), parsed once per host and config files as they are now."""
        files = tuple(
            ("sshOptions", Path(name).read_text())
            if name == self._snippet
            else (name, _stamp(name))
            for name in config
        )
        key = (host, port, user, files)
        cached = _PARSED.get(key)
        if cached is not None:
            return cached
        construct = asyncssh.SSHClientConnectionOptions.construct
        try:
            options: asyncssh.SSHClientConnectionOptions = await construct(
                config=config,
                host=host,
                port=port if port is not None else (),
                username=user if user is not None else (),
            )
        except ValueError as e:  # asyncssh's ConfigParseError and bad option values
            raise self._option_error(e) from e
        _remember(_PARSED, key, options)
        return options

    async def _dial(
        self,
        host: str,
        port: int | None,
        user: str | None,
        config: list[str],
        timeouts: _Timeouts,
        *,
        tunnel: asyncssh.SSHClientConnection | None,
        depth: int,
    ) -> asyncssh.SSHClientConnection:
        """One SSH connection with Waggle's known hosts; its ProxyJump hops opened first."""
        # The host's own view of ssh_config: its known-hosts files and ProxyJump.
        options = await self._parsed(host, port, user, config)
        known = self._known_hosts(options.config)
        jump = tunnel
        if jump is None and isinstance(options.tunnel, str):
            jump = await self._open_jumps(options.tunnel, depth)
        kwargs: dict[str, Any] = {
            # ssh_config as parsed above; None: asyncssh reads no file again.
            "options": options,
            "config": None,
            # Explicit, so that no ssh_config line can turn host key checking off.
            "known_hosts": known,
            # Explicit too (None: none): asyncssh would open a ProxyJump itself.
            "tunnel": jump,
            # AES-GCM runs in OpenSSL; chacha20-poly1305 (asyncssh's first
            # choice) is much slower per byte from Python. Closures are big.
            "encryption_algs": PREFERRED_CIPHERS,
            "connect_timeout": timeouts.connect,
            "keepalive_interval": timeouts.keepalive,
            "keepalive_count_max": timeouts.keepalive_count,
        }
        if port is not None:
            kwargs["port"] = port
        if user is not None:
            kwargs["username"] = user
        try:
            return await asyncio.wait_for(asyncssh.connect(host, **kwargs), timeouts.connect + 5)
        except ValueError as e:
            raise self._option_error(e) from e

    async def _open_jumps(self, spec: str, depth: int) -> asyncssh.SSHClientConnection | None:
        """Open the ProxyJump hops `spec` (`[user@]host[:port],...`); the last one."""
        if spec.lower() == "none":
            return None
        if depth >= MAX_JUMPS:
            raise SshOptionError(
                f"node {self.target.node}: more than {MAX_JUMPS} ProxyJump hops"
                " (does ssh_config make a loop?)"
            )
        s = self.settings
        timeouts = _Timeouts(s.connect_timeout, s.keepalive_interval, s.keepalive_count_max)
        conn: asyncssh.SSHClientConnection | None = None
        for hop in spec.split(","):
            user, host, port = _jump_hop(hop, self.target.node)
            try:
                conn = await self._dial(
                    host, port, user, self._config_files(), timeouts, tunnel=conn, depth=depth + 1
                )
            except (OSError, asyncssh.Error, TimeoutError) as e:
                raise HostUnreachableError(self.target, e, via=hop) from e
            self._jumps.append(conn)
        return conn

    async def connect(self) -> asyncssh.SSHClientConnection:
        async with self._connecting:  # one dial at a time (the host lock's channel runs beside)
            return await self._connect()

    async def _connect(self) -> asyncssh.SSHClientConnection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        await self._close_connections()
        config, lines = self._config()
        try:
            self._conn = await self._dial(
                self.target.host,
                self.target.port,
                self.target.user,
                config,
                self._timeouts(lines),
                tunnel=None,
                depth=0,
            )
        except HostError:
            await self._close_connections()
            raise
        except (OSError, asyncssh.Error, TimeoutError) as e:
            await self._close_connections()
            raise HostUnreachableError(self.target, e) from e
        return self._conn

    async def reconnect(self) -> None:
        await self.close()
        await self.connect()

    async def _close_connections(self) -> None:
        """Close the connection, then its jump hops (last hop first)."""
        conns = [self._conn, *reversed(self._jumps)]
        self._conn, self._jumps = None, []
        for conn in conns:
            if conn is not None:
                conn.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.wait_closed(), 5)

    async def close(self) -> None:
        await self._close_connections()
        if self._snippet is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._snippet)
            self._snippet = None

    def _cmd(self, argv: Sequence[str], privileged: bool) -> str:
        return command_line(argv, self.target.prefix if privileged else ())

    async def run(
        self,
        argv: Sequence[str],
        *,
        input_data: bytes | None = None,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult:
        async def feed() -> AsyncIterator[bytes]:
            if input_data:
                yield input_data

        return await self._run(argv, feed(), timeout, privileged, on_line)

    async def run_fed(
        self,
        argv: Sequence[str],
        chunks: AsyncIterator[bytes],
        *,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult:
        return await self._run(argv, chunks, timeout, privileged, on_line)

    async def _run(
        self,
        argv: Sequence[str],
        chunks: AsyncIterator[bytes],
        timeout: float | None,
        privileged: bool,
        on_line: LineCallback | None,
    ) -> RemoteResult:
        start = time.monotonic()
        out: list[bytes] = []
        err: list[bytes] = []
        conn = await self.connect()
        proc: asyncssh.SSHClientProcess[bytes] | None = None

        async def pump_out(
            stream: asyncssh.SSHReader[bytes], sink: list[bytes], lines: bool
        ) -> None:
            buffer = b""
            while True:
                data = await stream.read(65536)
                if not data:
                    break
                sink.append(data)
                if lines and on_line is not None:
                    buffer += data
                    *complete, buffer = buffer.split(b"\n")
                    for line in complete:
                        on_line(line.decode(errors="replace"))
            if lines and on_line is not None and buffer:
                on_line(buffer.decode(errors="replace"))

        async def session() -> int | None:
            nonlocal proc
            proc = await conn.create_process(self._cmd(argv, privileged), encoding=None)
            readers = asyncio.gather(
                pump_out(proc.stdout, out, True), pump_out(proc.stderr, err, False)
            )
            await _feed_until_output_ends(proc.stdin, chunks, readers)
            completed = await proc.wait()
            return completed.exit_status

        def result(
            code: int | None, *, timed_out: bool = False, lost: bool = False
        ) -> RemoteResult:
            return RemoteResult(
                tuple(argv),
                code,
                b"".join(out).decode(errors="replace"),
                b"".join(err).decode(errors="replace"),
                time.monotonic() - start,
                timed_out,
                lost,
            )

        try:
            code = await asyncio.wait_for(session(), timeout)
        except TimeoutError:
            if proc is not None:
                proc.close()
            return result(None, timed_out=True)
        except (asyncssh.Error, ConnectionError, OSError):
            if self._conn is conn:  # not a newer connection another command opened meanwhile
                await self.close()
            return result(None, lost=True)
        if code is None:  # asyncssh reports a cut connection as no exit status
            if self._conn is conn:
                await self.close()
            return result(None, lost=True)
        return result(code)

    async def write_file(
        self, path: str, data: bytes, *, mode: int, timeout: float | None = None
    ) -> None:
        """Write `path` with `mode` over an exec channel, the content on stdin.

        As root and through escalation alike: no SFTP subsystem is needed (NixOS hosts
        with `services.openssh.allowSFTP = false`). runner/scripts/write-file.sh writes a
        new temporary file next to `path` and renames it over `path`, so a symlink at
        `path` is replaced, never followed.
        """
        done = await self.run(write_file_argv(path, mode), input_data=data, timeout=timeout)
        if not done.ok:
            raise RemoteError(self.target, f"writing {path}: {done.describe()}")


async def _feed_until_output_ends(
    stdin: asyncssh.SSHWriter[bytes], chunks: AsyncIterator[bytes], readers: asyncio.Future[Any]
) -> None:
    """Feed `chunks` to a remote command's stdin, then EOF; wait for its output to end.

    The output ending (the command or the connection is gone) ends the feeding too: a feed
    that only sends now and then (the host lock's heartbeat) need not be waited for.
    """

    async def feed() -> None:
        try:
            async for chunk in chunks:
                stdin.write(chunk)
                await stdin.drain()
        except (BrokenPipeError, ConnectionError, asyncssh.Error):
            pass
        with contextlib.suppress(Exception):
            stdin.write_eof()

    feeding = asyncio.ensure_future(feed())
    either: set[asyncio.Future[Any]] = {feeding, readers}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if feeding.done():
            feeding.result()  # the feed's own error, if any
            await readers
    finally:
        feeding.cancel()


class HostUnreachableError(HostError):
    def __init__(self, target: SshTarget, cause: BaseException, *, via: str = "") -> None:
        reason = str(cause) or type(cause).__name__
        if isinstance(cause, TimeoutError):
            reason = "connection timed out"
        hop = f" via jump host {via}" if via else ""
        super().__init__(f"cannot connect to {target.describe()}{hop}: {reason}")


def _file_names(value: object, default: Sequence[str]) -> list[str]:
    """A known-hosts keyword's files: `default` when unset, none for `none` ([])."""
    if value is None:
        return list(default)
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, list | tuple) else []


def _expand_path(name: str) -> str:
    """`~`, `%d` (home), `%u` (local user) and `%%` in a known_hosts path, as OpenSSH does."""
    home = os.path.expanduser("~")

    def token(m: re.Match[str]) -> str:
        if m.group(1) == "d":
            return home
        if m.group(1) == "u":
            return getpass.getuser()
        return "%" if m.group(1) == "%" else m.group(0)

    return os.path.expanduser(re.sub(r"%(.)", token, name))


def _jump_hop(hop: str, node: str) -> tuple[str | None, str, int | None]:
    """`[ssh://][user@]host[:port]` (host may be `[v6]`) -> (user, host, port)."""
    text = hop.strip().removeprefix("ssh://")
    user, _, host = text.rpartition("@")
    port: str | None = None
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":") or None
    elif host.count(":") == 1:
        host, port = host.split(":")
    if not host or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise SshOptionError(f"node {node}: ProxyJump {_show(hop)}: not [user@]host[:port]")
    return user or None, host, int(port) if port is not None else None


class RemoteError(HostError):
    def __init__(self, target: SshTarget, message: str) -> None:
        super().__init__(f"{target.describe()}: {message}")


def ssh_host_for(config: NodeConfig, settings: SshSettings) -> SshHost:
    """The SshHost that reaches a node: its targetHost, port, user, sshOptions, escalation."""
    if config.target_host is None:
        raise ValueError(f"node {config.name} has no targetHost")
    return SshHost(
        SshTarget(
            node=config.name,
            host=config.target_host,
            port=config.target_port,
            user=config.target_user,
            ssh_options=config.ssh_options,
            escalation=config.privilege_escalation_command,
        ),
        settings,
    )
