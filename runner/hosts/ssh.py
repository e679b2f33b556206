"""Hosts over SSH with asyncssh: one connection per host for the whole run.

The user's ssh_config (Host aliases, HostName, Port, User, IdentityFile,
ProxyJump, UserKnownHostsFile, ...), ssh-agent and known_hosts are honoured
as asyncssh reads them. Host key checking is never turned off.
`deployment.sshOptions` are translated into an ssh_config snippet that takes
precedence over the user's files (see `translate_ssh_options`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from runner.errors import WaggleError
from runner.hosts import HostError, LineCallback, RemoteResult, command_line

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


class SshOptionError(WaggleError):
    """deployment.sshOptions holds something that cannot be parsed."""


def translate_ssh_options(options: Sequence[str]) -> tuple[list[str], list[str]]:
    """deployment.sshOptions -> (ssh_config lines, options ignored).

    `-o Key=Value` / `-oKey=Value` / `-o 'Key Value'`, `-p`, `-l`, `-i`, `-J`,
    `-F FILE` (an extra config file, returned as `Include FILE`), `-A` and `-C`
    are understood. `StrictHostKeyChecking` and ControlMaster-style options
    are ignored: asyncssh always checks host keys and multiplexes itself.
    """
    lines: list[str] = []
    ignored: list[str] = []
    i = 0
    while i < len(options):
        opt = options[i]
        value: str | None = None
        if opt in _FLAG_KEYWORDS or opt in ("-o", "-F"):
            if i + 1 >= len(options):
                raise SshOptionError(f"deployment.sshOptions: {opt} needs a value")
            value = options[i + 1]
            i += 2
        else:
            i += 1
        if opt in _FLAG_KEYWORDS:
            assert value is not None
            lines.append(f"{_FLAG_KEYWORDS[opt]} {value}")
        elif opt == "-F":
            assert value is not None
            lines.append(f"Include {value}")
        elif opt in _SWITCH_KEYWORDS:
            key, v = _SWITCH_KEYWORDS[opt]
            lines.append(f"{key} {v}")
        elif opt == "-o" or opt.startswith("-o"):
            text = value if opt == "-o" else opt[2:]
            assert text is not None
            key, _, val = text.replace("=", " ", 1).partition(" ")
            if key.lower() in SUPPORTED_KEYWORDS and val.strip():
                lines.append(f"{key} {val.strip()}")
            else:
                ignored.append(f"-o {text}")
        else:
            ignored.append(opt)
    return lines, ignored


@dataclass(frozen=True)
class SshSettings:
    """Run-wide SSH settings."""

    config_files: tuple[str, ...] | None = None  # None: asyncssh's default (~/.ssh/config)
    connect_timeout: float = 30.0
    keepalive_interval: float = 10.0
    keepalive_count_max: int = 3


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


@dataclass
class SshHost:
    """A node's host over one asyncssh connection, reopened if it drops."""

    target: SshTarget
    settings: SshSettings = field(default_factory=SshSettings)
    name: str = ""
    _conn: asyncssh.SSHClientConnection | None = None
    _snippet: str | None = None
    ignored_options: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.target.node

    def _config(self) -> list[str] | tuple[()]:
        lines, self.ignored_options = translate_ssh_options(self.target.ssh_options)
        if self.ignored_options:
            log.warning(
                "node %s: deployment.sshOptions ignored: %s",
                self.target.node,
                " ".join(self.ignored_options),
            )
        user_files = list(self.settings.config_files or ())
        if self.settings.config_files is None:
            default = Path.home() / ".ssh" / "config"
            user_files = [str(default)] if default.exists() else []
        if not lines:
            return user_files if user_files or self.settings.config_files is not None else ()
        if self._snippet is None:
            fd, path = tempfile.mkstemp(prefix="waggle-ssh-", suffix=".conf")
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"{line}\n" for line in lines))
            self._snippet = path
        return [self._snippet, *user_files]

    async def connect(self) -> asyncssh.SSHClientConnection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        kwargs: dict[str, Any] = {
            "config": self._config(),
            # AES-GCM runs in OpenSSL; chacha20-poly1305 (asyncssh's first
            # choice) is much slower per byte from Python. Closures are big.
            "encryption_algs": PREFERRED_CIPHERS,
            "connect_timeout": self.settings.connect_timeout,
            "keepalive_interval": self.settings.keepalive_interval,
            "keepalive_count_max": self.settings.keepalive_count_max,
        }
        if self.target.port is not None:
            kwargs["port"] = self.target.port
        if self.target.user is not None:
            kwargs["username"] = self.target.user
        try:
            self._conn = await asyncio.wait_for(
                asyncssh.connect(self.target.host, **kwargs), self.settings.connect_timeout + 5
            )
        except (OSError, asyncssh.Error, TimeoutError) as e:
            raise HostUnreachableError(self.target, e) from e
        return self._conn

    async def reconnect(self) -> None:
        await self.close()
        await self.connect()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)
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
    ) -> RemoteResult:
        return await self._run(argv, chunks, timeout, privileged, None)

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
            try:
                async for chunk in chunks:
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
            except (BrokenPipeError, ConnectionError, asyncssh.Error):
                pass
            with contextlib.suppress(Exception):
                proc.stdin.write_eof()
            await readers
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
            await self.close()
            return result(None, lost=True)
        if code is None:  # asyncssh reports a cut connection as no exit status
            await self.close()
            return result(None, lost=True)
        return result(code)

    async def write_file(
        self, path: str, data: bytes, *, mode: int, timeout: float | None = None
    ) -> None:
        """Write `path` with `mode`: over SFTP as root, else through escalation on stdin."""
        if self.target.prefix:
            script = f'umask 077; cat > "$1" && chmod {mode:o} "$1"'
            done = await self.run(
                ["sh", "-c", script, "sh", path], input_data=data, timeout=timeout
            )
            if not done.ok:
                raise RemoteError(self.target, f"writing {path}: {done.describe()}")
            return
        conn = await self.connect()

        async def sftp_write() -> None:
            async with conn.start_sftp_client() as sftp:
                attrs = asyncssh.SFTPAttrs(permissions=mode)
                async with sftp.open(path, "wb", attrs) as f:
                    await f.write(data)
                await sftp.chmod(path, mode)

        try:
            await asyncio.wait_for(sftp_write(), timeout)
        except (asyncssh.Error, OSError, TimeoutError) as e:
            raise RemoteError(
                self.target, f"writing {path} over SFTP: {e or type(e).__name__}"
            ) from e


class HostUnreachableError(HostError):
    def __init__(self, target: SshTarget, cause: BaseException) -> None:
        reason = str(cause) or type(cause).__name__
        if isinstance(cause, TimeoutError):
            reason = "connection timed out"
        super().__init__(f"cannot connect to {target.describe()}: {reason}")


class RemoteError(HostError):
    def __init__(self, target: SshTarget, message: str) -> None:
        super().__init__(f"{target.describe()}: {message}")
