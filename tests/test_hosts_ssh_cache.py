"""SSH connections reuse what they parsed (issue 10, on the deploy's hot path): ssh_config per
(host, config files) and known_hosts per (file, mtime), so a connection costs no parsing
once one to the same host was made; a changed known_hosts file is read again. Against the
in-process fake host (tests/fake_ssh.py), with the parsers counted."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.config import SSHConfig

from runner.hosts import ssh
from runner.hosts.ssh import HostUnreachableError, SshHost, SshSettings, SshTarget
from tests.fake_ssh import FakeHost


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How often ssh_config files and known_hosts texts were parsed."""
    seen = {"config": 0, "known_hosts": 0}
    parse, load = SSHConfig.parse, asyncssh.SSHKnownHosts.load

    def counted_parse(self: SSHConfig, path: Path) -> None:
        seen["config"] += 1
        parse(self, path)

    def counted_load(self: asyncssh.SSHKnownHosts, text: str) -> None:
        seen["known_hosts"] += 1
        load(self, text)

    monkeypatch.setattr(SSHConfig, "parse", counted_parse)
    monkeypatch.setattr(asyncssh.SSHKnownHosts, "load", counted_load)
    ssh.clear_caches()
    yield seen
    ssh.clear_caches()


def host_for(fake: FakeHost, **settings: Any) -> SshHost:
    return SshHost(
        SshTarget("node", fake.name, user="root"),
        SshSettings(config_files=(str(fake.ssh_config),), **settings),
    )


async def connect_once(fake: FakeHost) -> None:
    host = host_for(fake)
    try:
        done = await host.run(["true"])
        assert done.ok, done
    finally:
        await host.close()


def test_connections_to_one_host_parse_its_ssh_config_and_known_hosts_once(tmp_path, counts):
    async def main() -> None:
        async with FakeHost.start(tmp_path, name="fake") as fake:
            for _ in range(3):
                await connect_once(fake)

    asyncio.run(main())
    # One config file, one known_hosts file (GlobalKnownHostsFile is /dev/null: empty).
    assert counts["config"] == 1, counts
    assert counts["known_hosts"] <= 2, counts


def test_a_changed_known_hosts_file_is_read_again(tmp_path, counts):
    async def main() -> None:
        async with FakeHost.start(tmp_path, name="fake") as fake:
            await connect_once(fake)
            good = fake.known_hosts.read_text()
            # Another key for the host: the next connection must refuse it.
            fake.known_hosts.write_text(good.replace("ssh-ed25519 ", "ssh-ed25519 AAAA", 1))
            with pytest.raises(HostUnreachableError):
                await connect_once(fake)
            fake.known_hosts.write_text(good)
            stat = fake.known_hosts.stat()
            os.utime(fake.known_hosts, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
            await connect_once(fake)

    asyncio.run(main())
    assert counts["config"] == 1, counts
