"""The host layer: quoting, sshOptions, and SshHost against the in-process fake host."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from runner.hosts import HostError, command_line
from runner.hosts.local import LocalHost
from runner.hosts.ssh import (
    HostUnreachableError,
    SshHost,
    SshOptionError,
    SshSettings,
    SshTarget,
    translate_ssh_options,
)
from tests.fake_ssh import FakeHost

NASTY = [
    "plain",
    "with space",
    "quote'single",
    'quote"double',
    "$HOME",
    "`id`",
    "a;b",
    "*",
    "",
    "ünï",
]


def test_command_line_quotes_each_argument():
    line = command_line(["printf", "%s\\n", *NASTY])
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:-1] == NASTY
    assert command_line(["id"], ["sudo", "-H", "--"]) == "sudo -H -- id"


def test_translate_ssh_options():
    lines, ignored = translate_ssh_options(
        [
            "-o",
            "ConnectTimeout=5",
            "-oServerAliveInterval 7",
            "-p",
            "2222",
            "-J",
            "bastion",
            "-i",
            "/k",
            "-l",
            "deploy",
            "-A",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "ControlMaster=auto",
            "-v",
        ]
    )
    assert lines == [
        "ConnectTimeout 5",
        "ServerAliveInterval 7",
        "Port 2222",
        "ProxyJump bastion",
        "IdentityFile /k",
        "User deploy",
        "ForwardAgent yes",
    ]
    # Host key checking is never turned off; ControlMaster is asyncssh's own job.
    assert ignored == ["-o StrictHostKeyChecking=no", "-o ControlMaster=auto", "-v"]
    with pytest.raises(SshOptionError, match="-p needs a value"):
        translate_ssh_options(["-p"])


def test_translate_attached_forms_and_time_values(monkeypatch):
    monkeypatch.setenv("HOME", "/home/op")
    lines, ignored = translate_ssh_options(
        [
            "-p2222",
            "-lroot",
            "-i~/k",
            "-Jjump",
            "-F~/extra.conf",
            "-i",
            "~/with space",
            "-o",
            "ServerAliveInterval=1m",
            "-oConnectTimeout 1h30m",
            "-o",
            "ConnectTimeout = 90",
            "-o",
            "RekeyLimit=1G 1h",
        ]
    )
    assert lines == [
        "Port 2222",
        "User root",
        "IdentityFile /home/op/k",
        "ProxyJump jump",
        "Include /home/op/extra.conf",
        "IdentityFile '/home/op/with space'",
        "ServerAliveInterval 60",
        "ConnectTimeout 5400",
        "ConnectTimeout 90",
        "RekeyLimit 1G 1h",
    ]
    assert ignored == []


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["-o", "User=root\nUserKnownHostsFile none"], r"-o 'User=root\nUserKnownHostsFile none'"),
        (["-p", "22\r"], r"-p 22\r"),
        (["-lroot\0"], r"-lroot\0"),
        (["-o", "UserKnownHostsFile=none"], "UserKnownHostsFile none"),
        (["-o", "GlobalKnownHostsFile /x NONE"], "GlobalKnownHostsFile"),
        (["-o", "ConnectTimeout=soon"], "ConnectTimeout=soon"),
        (["-o", "ServerAliveInterval=-1"], "ServerAliveInterval=-1"),
        (["-o", "ServerAliveCountMax=3s"], "ServerAliveCountMax=3s"),
        (["-p", "http"], "-p http"),
        (["-p99999"], "-p99999"),
        (["-i"], "-i needs a value"),
    ],
)
def test_translate_refuses(options, needle):
    with pytest.raises(SshOptionError) as info:
        translate_ssh_options(options, node="web")
    message = str(info.value)
    assert "\n" not in message and "\r" not in message and "\0" not in message, message
    assert message.startswith("node web: deployment.sshOptions"), message
    assert needle in message, message


def test_config_file_time_values_and_parse_errors(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path, name="fake") as fake:
            base = fake.ssh_config.read_text()
            fake.ssh_config.write_text(base + "    ServerAliveInterval 2m\n    ConnectTimeout 1m\n")
            host = SshHost(SshTarget("web", "fake", user="root"), settings_for(fake))
            done = await host.run(["true"])
            await host.close()
            fake.ssh_config.write_text(base + "    ServerAliveCountMax many\n")
            with pytest.raises(SshOptionError) as info:
                await SshHost(SshTarget("web", "fake", user="root"), settings_for(fake)).connect()
            return done, info.value

    done, error = asyncio.run(main())
    assert done.ok
    message = str(error)
    assert isinstance(error, HostError) and "\n" not in message
    assert message.startswith("node web: ") and "ssh_config line 11" in message, message
    assert "ServerAliveCountMax" in message and "many" in message, message


def test_proxy_jump_loop_is_a_node_error(tmp_path):
    config = tmp_path / "config"
    config.write_text("Host a\n    ProxyJump b\nHost b\n    ProxyJump a\n")
    host = SshHost(SshTarget("web", "a"), SshSettings(config_files=(str(config),)))
    with pytest.raises(SshOptionError, match="node web: more than 8 ProxyJump hops"):
        asyncio.run(host.connect())


def test_target_describe_brackets_ipv6():
    assert SshTarget("n", "fd00::1", 2222, "root").describe() == "root@[fd00::1]:2222"
    assert SshTarget("n", "web", None, None).describe() == "web"


def settings_for(host: FakeHost) -> SshSettings:
    return SshSettings(config_files=(str(host.ssh_config),), connect_timeout=5)


def test_run_stream_and_write_file(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path, name="fake") as fake:
            host = SshHost(SshTarget("node", "fake", user="root"), settings_for(fake))
            lines: list[str] = []
            done = await host.run(
                ["sh", "-c", "echo one; echo two; echo err >&2; exit 4"], on_line=lines.append
            )

            async def chunks():
                for part in (b"abc", b"def"):
                    yield part

            fed = await host.run_fed(["cat"], chunks())
            await host.write_file(str(fake.path("/secret")), b"s3cret", mode=0o600)
            await host.close()
            return fake, done, lines, fed

    fake, done, lines, fed = asyncio.run(main())
    assert (done.returncode, done.stdout, done.stderr.strip()) == (4, "one\ntwo\n", "err")
    assert lines == ["one", "two"]
    assert "exit status 4" in done.describe()
    assert fed.stdout == "abcdef"
    assert fake.path("/secret").read_bytes() == b"s3cret"
    assert oct(fake.path("/secret").stat().st_mode & 0o777) == "0o600"
    assert fake.connection_count == 1  # one connection for everything
    assert all("s3cret" not in c for c in fake.commands)


def test_escalation_prefix_for_other_users(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path, name="fake") as fake:
            target = SshTarget("node", "fake", user="deploy", escalation=("env", "ESCALATED=1"))
            host = SshHost(target, settings_for(fake))
            done = await host.run(["sh", "-c", "echo $ESCALATED"])
            plain = await host.run(["sh", "-c", "echo ${ESCALATED-no}"], privileged=False)
            # Escalated writes go through a command; the fake runs commands locally.
            await host.write_file(str(fake.root / "k"), b"content", mode=0o640)
            await host.close()
            return fake, done, plain

    fake, done, plain = asyncio.run(main())
    assert done.stdout == "1\n" and plain.stdout == "no\n"
    assert fake.commands[0].startswith("env ESCALATED=1 sh -c")
    assert (fake.root / "k").read_bytes() == b"content"
    assert oct((fake.root / "k").stat().st_mode & 0o777) == "0o640"
    assert all("content" not in c for c in fake.commands)


def test_lost_connection_then_reconnect(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path, name="fake") as fake:
            fake.drop_on("cut-here")
            host = SshHost(SshTarget("node", "fake", user="root"), settings_for(fake))
            lost = await host.run(["echo", "cut-here"])
            again = await host.run(["echo", "fine"])
            await host.close()
            return fake, lost, again

    fake, lost, again = asyncio.run(main())
    assert lost.lost and lost.returncode is None and "connection was lost" in lost.describe()
    assert again.ok and again.stdout == "fine\n"
    assert fake.connection_count == 2


def test_unreachable_host_names_target():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = SshHost(
        SshTarget("node", "127.0.0.1", port=port, user="root"),
        SshSettings(config_files=(), connect_timeout=3),
    )
    with pytest.raises(HostUnreachableError, match=f"root@127.0.0.1:{port}"):
        asyncio.run(host.connect())


def test_host_key_is_checked(tmp_path):
    async def main():
        async with FakeHost.start(tmp_path / "a", name="fake") as fake:
            fake.known_hosts.write_text(
                fake.known_hosts.read_text().replace("ssh-ed25519 ", "ssh-ed25519 AAAA", 1)
            )
            host = SshHost(SshTarget("node", "fake", user="root"), settings_for(fake))
            with pytest.raises(HostUnreachableError):
                await host.connect()

    asyncio.run(main())


def test_local_host_runs_and_writes(tmp_path):
    async def main():
        host = LocalHost("me")
        done = await host.run(["sh", "-c", "echo hi; exit 2"])
        await host.write_file(str(tmp_path / "k"), b"x", mode=0o600)
        return done

    done = asyncio.run(main())
    assert (done.returncode, done.stdout) == (2, "hi\n")
    assert (tmp_path / "k").read_bytes() == b"x"
