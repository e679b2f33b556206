"""The in-process fake SSH host: host key checked, commands run and recorded, SFTP, drops."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import asyncssh
import pytest

from tests.fake_ssh import FakeHost


def test_command_output_status_and_record(tmp_path):
    async def main():
        async with (
            FakeHost.start(tmp_path) as host,
            asyncssh.connect(**host.connect_options()) as conn,
        ):
            done = await conn.run("echo out; echo err >&2; pwd; exit 3")
            fed = await conn.run("tr a-z A-Z", input="hello")
            env = await conn.run("echo $HOME:$PATH:${NIX_CONFIG-unset}")
            return host, done, fed, env

    host, done, fed, env = asyncio.run(main())
    assert done.exit_status == 3
    assert done.stdout == f"out\n{tmp_path / 'root'}\n"
    assert done.stderr == "err\n"
    assert fed.stdout == "HELLO"
    assert env.stdout.strip().endswith(":unset")  # the test process's env does not leak
    assert env.stdout.startswith(str(tmp_path / "root") + ":")
    assert host.commands == [
        "echo out; echo err >&2; pwd; exit 3",
        "tr a-z A-Z",
        "echo $HOME:$PATH:${NIX_CONFIG-unset}",
    ]
    assert host.connection_count == 1
    assert host.known_hosts.read_text().startswith(f"[127.0.0.1]:{host.port} ssh-ed25519 ")


def test_large_output_and_signal_exit(tmp_path):
    async def main():
        async with (
            FakeHost.start(tmp_path) as host,
            asyncssh.connect(**host.connect_options()) as conn,
        ):
            big = await conn.run("head -c 3000000 /dev/zero", encoding=None)
            killed = await conn.run("kill -TERM $$")
            return big, killed

    big, killed = asyncio.run(main())
    assert len(big.stdout) == 3_000_000
    assert killed.exit_signal is not None and killed.exit_signal[0] == "TERM"


def test_wrong_host_key_or_client_key_is_rejected(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path / "a") as a, FakeHost.start(tmp_path / "b") as b:
            # b's known_hosts names b's port and key: a's key at a's port is unknown.
            with pytest.raises(asyncssh.HostKeyNotVerifiable):
                await asyncssh.connect(**a.connect_options(known_hosts=str(b.known_hosts)))
            # a does not accept b's client key.
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncssh.connect(**a.connect_options(client_keys=[str(b.client_key)]))
            a.fail_auth = True
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncssh.connect(**a.connect_options())
            return a.commands

    assert asyncio.run(main()) == []


def test_sftp_upload_is_chrooted(tmp_path):
    source = tmp_path / "secret"
    source.write_text("key material\n")

    async def main():
        async with (
            FakeHost.start(tmp_path / "host") as host,
            asyncssh.connect(**host.connect_options()) as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.makedirs("/run/keys")
            await sftp.put(str(source), "/run/keys/secret")
            await sftp.chmod("/run/keys/secret", 0o600)
            listed = await sftp.listdir("/run/keys")
            return host, listed

    host, listed = asyncio.run(main())
    assert "secret" in listed
    uploaded = host.path("/run/keys/secret")
    assert uploaded == tmp_path / "host" / "root" / "run" / "keys" / "secret"
    assert uploaded.read_text() == "key material\n"
    assert uploaded.stat().st_mode & 0o777 == 0o600
    assert host.commands == []


def test_drop_connections(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path) as host:
            conn = await asyncssh.connect(**host.connect_options())
            assert (await conn.run("true")).exit_status == 0
            running = asyncio.ensure_future(conn.run("sleep 30"))
            while len(host.commands) < 2:
                await asyncio.sleep(0.01)
            assert host.drop_connections() == 1
            # asyncssh reports a channel cut without exit status as exit_status None ...
            cut = await asyncio.wait_for(running, 10)
            assert (cut.exit_status, cut.exit_signal) == (None, None)
            # ... and the connection is gone.
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")
            # A new connection works again.
            async with asyncssh.connect(**host.connect_options()) as again:
                assert (await again.run("echo back")).stdout == "back\n"
            return host

    host = asyncio.run(main())
    assert host.connection_count == 2


def test_drop_on_command(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path) as host:
            host.drop_on("switch-to-configuration")
            async with asyncssh.connect(**host.connect_options()) as conn:
                assert (await conn.run("echo before")).stdout == "before\n"
                cmd = "/x/bin/switch-to-configuration switch"
                cut = await asyncio.wait_for(conn.run(cmd), 10)
                assert (cut.exit_status, cut.exit_signal) == (None, None)
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.run("true")
            return host

    host = asyncio.run(main())
    assert host.commands == ["echo before", "/x/bin/switch-to-configuration switch"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client")
def test_openssh_client_with_its_ssh_config(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path, name="fakehost") as host:
            proc = await asyncio.create_subprocess_exec(
                "ssh",
                "-F",
                str(host.ssh_config),
                "fakehost",
                "echo via-openssh",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await proc.communicate()
            return proc.returncode, out, err, host.commands

    code, out, err, commands = asyncio.run(main())
    assert (code, out) == (0, b"via-openssh\n"), err
    assert commands == ["echo via-openssh"]
