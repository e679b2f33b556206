"""An in-process SSH server (asyncssh) for fast tests that need neither root nor sshd.

    async with FakeHost.start(tmp_path) as host:
        async with asyncssh.connect(**host.connect_options()) as conn:
            done = await conn.run("echo hi")

The server listens on 127.0.0.1 (an ephemeral port) with a fresh ed25519 host key, accepts
only the fresh client key it wrote (no passwords, no keyboard-interactive), and writes a
known_hosts line `[127.0.0.1]:PORT KEY` so clients check the host key as they would for a
real host. Each command is run locally with `/bin/sh -c` in `host.root` (the working
directory and HOME) with a small fixed environment, as the user running the tests; stdin,
stdout, stderr and the exit status are forwarded. Every command line is recorded in
`host.commands`, in arrival order. SFTP is served chrooted at `host.root` (so an upload to
`/run/keys/k` lands in `host.root/run/keys/k`; `host.path("/run/keys/k")` says where).

Failure injection: `host.drop_connections()` cuts every open connection (abruptly, like a
network failure, or with an SSH disconnect); `host.drop_on(text)` cuts a connection when a
command containing `text` arrives (the command is recorded, not run); `host.fail_auth = True`
rejects the client key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import asyncssh
from typing_extensions import override

ADDRESS = "127.0.0.1"
DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SHELL": "/bin/sh",
}
_CHUNK = 65536


class FakeHost:
    """A running fake SSH host. Create it with `FakeHost.start(directory)`."""

    def __init__(self, directory: Path, *, name: str, env: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        self.name = name
        self.address = ADDRESS
        self.root = directory / "root"
        self.known_hosts = directory / "known_hosts"
        self.client_key = directory / "client_key"
        self.ssh_config = directory / "ssh_config"
        self.commands: list[str] = []
        self.connection_count = 0
        self.fail_auth = False
        self._env = {**DEFAULT_ENV, "HOME": str(self.root), **(env or {})}
        self._drop_on: list[str] = []
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._children: set[asyncio.subprocess.Process] = set()
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.port = 0
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._client = asyncssh.generate_private_key("ssh-ed25519")

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        directory: Path,
        *,
        name: str = "fake",
        env: Mapping[str, str] | None = None,
    ) -> AsyncIterator[FakeHost]:
        """Serve until the `async with` block ends. `env` adds to the commands' environment."""
        directory.mkdir(parents=True, exist_ok=True)
        host = cls(directory, name=name, env=env)
        host.root.mkdir(exist_ok=True)
        await host._listen()
        try:
            yield host
        finally:
            await host.close()

    # -- what clients need ----------------------------------------------------------------
    @property
    def client_public_key(self) -> str:
        return self._client.export_public_key().decode().strip()

    def connect_options(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for `asyncssh.connect` reaching this host, host key checked."""
        options: dict[str, Any] = {
            "host": self.address,
            "port": self.port,
            "username": "root",
            "known_hosts": str(self.known_hosts),
            "client_keys": [str(self.client_key)],
            "agent_path": None,
            "config": [],
        }
        options.update(overrides)
        return options

    def path(self, p: str | PurePosixPath) -> Path:
        """Where SFTP path `p` (absolute, as the client sees it) is on this machine."""
        pure = PurePosixPath(p)
        if not pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"not a normalised absolute path: {p}")
        return self.root.joinpath(*pure.parts[1:])

    # -- failure injection ----------------------------------------------------------------
    def drop_connections(self, *, abrupt: bool = True) -> int:
        """Cut every open connection; return how many. Abrupt: TCP close, no SSH disconnect."""
        connections = list(self._connections)
        for conn in connections:
            if abrupt:
                conn.abort()
            else:
                conn.disconnect(asyncssh.DISC_BY_APPLICATION, "fake host drops the connection")
        for child in list(self._children):
            _kill_group(child)
        return len(connections)

    def drop_on(self, text: str) -> None:
        """Cut the connection (instead of running) when a command containing `text` arrives."""
        self._drop_on.append(text)

    # -- serving --------------------------------------------------------------------------
    async def _listen(self) -> None:
        self.host_key.write_private_key(str(self.directory / "host_key"))
        self._client.write_private_key(str(self.client_key))
        os.chmod(self.client_key, 0o600)
        self._client.write_public_key(str(self.client_key) + ".pub")
        root = str(self.root).encode()
        self._acceptor = await asyncssh.listen(
            self.address,
            0,
            server_factory=lambda: _Server(self),
            server_host_keys=[self.host_key],
            process_factory=self._handle,
            sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=root),
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            kbdint_auth=False,
            password_auth=False,
        )
        self.port = self._acceptor.get_port()
        public = self.host_key.export_public_key().decode().strip()
        self.known_hosts.write_text(f"[{self.address}]:{self.port} {public}\n")
        self.ssh_config.write_text(
            f"Host {self.name}\n"
            f"    HostName {self.address}\n"
            f"    Port {self.port}\n"
            "    User root\n"
            f'    IdentityFile "{self.client_key}"\n'
            "    IdentitiesOnly yes\n"
            f'    UserKnownHostsFile "{self.known_hosts}"\n'
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"
        )

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        self.drop_connections()
        for child in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                await child.wait()

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command
        if command is None:
            process.stderr.write(b"fake host: interactive shells are not supported\n")
            process.exit(1)
            return
        self.commands.append(command)
        if any(text in command for text in self._drop_on):
            process.get_extra_info("connection").abort()
            return
        try:
            child = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                command,
                cwd=self.root,
                env=self._env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            process.stderr.write(f"fake host: {e}\n".encode())
            process.exit(127)
            return
        self._children.add(child)
        assert child.stdin and child.stdout and child.stderr
        feeder = asyncio.create_task(_feed(process, child.stdin))
        try:
            await asyncio.gather(
                _pump(child.stdout, process.stdout), _pump(child.stderr, process.stderr)
            )
            status = await child.wait()
        except (asyncssh.Error, OSError, asyncio.CancelledError):
            _kill_group(child)
            await child.wait()
            raise
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
            self._children.discard(child)
        if status < 0:
            process.exit_with_signal(signal.Signals(-status).name.removeprefix("SIG"))
        else:
            process.exit(status)


class _Server(asyncssh.SSHServer):
    def __init__(self, host: FakeHost) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

    @override
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._host._connections.add(conn)
        self._host.connection_count += 1

    @override
    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._host._connections.discard(self._conn)

    @override
    def begin_auth(self, username: str) -> bool:
        return True

    @override
    def public_key_auth_supported(self) -> bool:
        return True

    @override
    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Only the host's own client key, and only while `fail_auth` is off."""
        return not self._host.fail_auth and key.public_data == self._host._client.public_data


async def _feed(process: asyncssh.SSHServerProcess[bytes], stdin: asyncio.StreamWriter) -> None:
    """Client's stdin to the command's stdin, then EOF."""
    try:
        while True:
            data = await process.stdin.read(_CHUNK)
            if not data:
                break
            stdin.write(data)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError, asyncssh.Error):
        pass
    finally:
        with contextlib.suppress(OSError):
            stdin.close()


async def _pump(source: asyncio.StreamReader, target: asyncssh.SSHWriter[bytes]) -> None:
    while True:
        data = await source.read(_CHUNK)
        if not data:
            return
        target.write(data)
        await target.drain()


def _kill_group(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
