"""SSH host keys, ssh_config and sshOptions against real sshd hosts (tests/fleet.py).

Host keys are always checked against real known_hosts files, whatever sshOptions or an
ssh_config file say (`UserKnownHostsFile none`, lines injected through a newline, a jump
host's own block); the system-wide `/etc/ssh/ssh_known_hosts` and `/etc/ssh/ssh_config` are
read as OpenSSH reads them (here: temp files standing in for them); OpenSSH time values
(`1m`, `10s`, `1h30m`) are accepted; attached flag forms (`-p2222`, `-i~/k`, `-lroot`,
`-Jjump`) work. Each test runs with HOME pointing at an empty temp directory and no
ssh-agent, so nothing of this machine's own ~/.ssh is used.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from runner.cli import _ssh_settings, build_parser
from runner.errors import UsageError
from runner.hosts import HostError
from runner.hosts.ssh import HostUnreachableError, SshHost, SshOptionError, SshSettings, SshTarget
from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import waggle

pytestmark = needs_fleet()

HOSTS = ("plain", "bastion", "inner", "ported")
PORT = 2222
# Where this side's direct connections come from in the jump tests: "inner" lets root in
# only from 127.0.0.1, the address the bastion's forwarded connections come from.
DEPLOYER_ADDRESS = "127.0.0.98"
NOT_TRUSTED = "Host key is not trusted"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    with Fleet.start(
        d, len(HOSTS), names=HOSTS, first_octet=free_first_octet(len(HOSTS), 200), etc="overlay"
    ) as f:
        f.configure_sshd("inner", "AllowUsers root@127.0.0.1")
        f.listen_also("ported", f["ported"].address, PORT)
        f.add_user("ported", "deploy", sudo=False)
        yield f


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME (no ~/.ssh) and no agent: only what a test writes is used."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return h


def block(fleet: Fleet, alias: str, host: str, *extra: str, identity: bool = True) -> str:
    """A `Host alias` block reaching fleet host `host` as root with the fleet's key."""
    lines = [f"Host {alias}", f"HostName {fleet[host].address}", "User root"]
    if identity:
        lines += [f'IdentityFile "{fleet.client_key}"', "IdentitiesOnly yes"]
    return "\n    ".join([*lines, *extra]) + "\n\n"


def trusted(fleet: Fleet) -> str:
    return f'UserKnownHostsFile "{fleet.known_hosts}"'


NO_SYSTEM = "GlobalKnownHostsFile /dev/null"  # never this machine's /etc/ssh files


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def settings(config: Path | None, **kw: Any) -> SshSettings:
    files = (str(config),) if config is not None else None
    return SshSettings(config_files=files, connect_timeout=5, **kw)


def hostname(
    target: SshTarget, ssh: SshSettings, command: Sequence[str] = ("hostname",)
) -> tuple[str, object]:
    """Connect, run `command`; (its output, the connection's peer address)."""

    async def main() -> tuple[str, object]:
        host = SshHost(target, ssh)
        try:
            conn = await host.connect()
            peer = conn.get_extra_info("peername")
            done = await host.run(command, timeout=10, privileged=False)
            assert done.ok, done.describe()
            return done.stdout.strip(), peer
        finally:
            await host.close()

    return asyncio.run(main())


def refused(target: SshTarget, ssh: SshSettings) -> HostError:
    async def main() -> HostError:
        host = SshHost(target, ssh)
        try:
            with pytest.raises(HostError) as info:
                await host.connect()
            return info.value
        finally:
            await host.close()

    return asyncio.run(main())


def target(alias: str, *options: str, node: str = "web", user: str | None = "root") -> SshTarget:
    return SshTarget(node=node, host=alias, user=user, ssh_options=tuple(options))


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "\r" not in text and "\0" not in text, repr(text)
    return text


# -- item 2: host key checking cannot be switched off ------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ("-o", "UserKnownHostsFile=none"),
        ("-oUserKnownHostsFile none",),
        ("-o", "UserKnownHostsFile = NONE"),
        ("-o", "GlobalKnownHostsFile=none"),
    ],
)
def test_known_hosts_none_in_ssh_options_is_refused(fleet, tmp_path, options):
    # The host's key is in no known_hosts file this connection reads.
    config = write(tmp_path / "config", block(fleet, "plain", "plain", NO_SYSTEM))
    e = refused(target("plain", *options), settings(config))
    assert isinstance(e, SshOptionError), e
    message = one_line(e)
    assert "web" in message and "KnownHostsFile" in message, message


def test_known_hosts_none_in_a_config_file_still_checks_the_host_key(fleet, tmp_path):
    # Control: with the fleet's known_hosts the same block connects.
    good = write(tmp_path / "good", block(fleet, "plain", "plain", trusted(fleet), NO_SYSTEM))
    assert hostname(target("plain"), settings(good))[0] == "plain"
    # `UserKnownHostsFile none` means no user file (as in OpenSSH), never "trust anything".
    config = write(
        tmp_path / "config",
        block(fleet, "plain", "plain", "UserKnownHostsFile none", "GlobalKnownHostsFile none"),
    )
    e = refused(target("plain"), settings(config))
    assert isinstance(e, HostUnreachableError) and NOT_TRUSTED in one_line(e), e
    # The same through an extra config file that sshOptions name with -F.
    extra = write(tmp_path / "extra", "UserKnownHostsFile none\n")
    plain = write(tmp_path / "plain", block(fleet, "plain", "plain", NO_SYSTEM))
    e = refused(target("plain", "-F", str(extra)), settings(plain))
    assert isinstance(e, HostUnreachableError) and NOT_TRUSTED in one_line(e), e
    # Colmena-style "don't check" options change nothing either (StrictHostKeyChecking is
    # ignored with a warning; /dev/null is a known_hosts file without keys).
    lax = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null")
    e = refused(target("plain", *lax), settings(plain))
    assert isinstance(e, HostUnreachableError) and NOT_TRUSTED in one_line(e), e


@pytest.mark.parametrize(
    "options",
    [
        ("-o", "User=root\nUserKnownHostsFile none"),
        ("-oPort=22\rUserKnownHostsFile none",),
        ("-p", "22\nUserKnownHostsFile none"),
        ("-l", "root\nUserKnownHostsFile none"),
        ("-i", "/k\nUserKnownHostsFile none"),
        ("-J", "none\nUserKnownHostsFile none"),
        ("-o", "ControlMaster=auto\nUserKnownHostsFile none"),
        ("-o", "User=root\0"),
    ],
)
def test_control_characters_in_ssh_options_are_refused(fleet, tmp_path, options):
    config = write(tmp_path / "config", block(fleet, "plain", "plain", NO_SYSTEM))
    e = refused(target("plain", *options), settings(config))
    assert isinstance(e, SshOptionError), e
    message = one_line(e)
    flag = options[0][:2]
    assert "web" in message and flag in message, message


def test_jump_host_key_is_checked(fleet, tmp_path):
    inner = block(fleet, "inner", "inner", "ProxyJump bastion", trusted(fleet), NO_SYSTEM)
    direct = f"Host *\n    BindAddress {DEPLOYER_ADDRESS}\n"
    # Control: through a bastion whose key is known, the inner host answers (it lets root
    # in only from 127.0.0.1, so this went through the bastion).
    good = block(fleet, "bastion", "bastion", trusted(fleet), NO_SYSTEM)
    config = write(tmp_path / "good", inner + good + direct)
    assert hostname(target("inner"), settings(config))[0] == "inner"
    # A bastion block saying `UserKnownHostsFile none`: its key must still be checked.
    bad = block(fleet, "bastion", "bastion", "UserKnownHostsFile none", NO_SYSTEM)
    config = write(tmp_path / "bad", inner + bad + direct)
    e = refused(target("inner"), settings(config))
    assert isinstance(e, HostUnreachableError) and NOT_TRUSTED in one_line(e), e


# -- item 11: the system-wide known hosts and ssh_config ----------------------------------------


def test_host_key_only_in_the_system_known_hosts(fleet, tmp_path):
    config = write(tmp_path / "config", block(fleet, "plain", "plain"))  # no *KnownHostsFile
    system = tmp_path / "ssh_known_hosts"
    line = next(line for line in fleet.known_hosts.read_text().splitlines() if ",plain " in line)
    system.write_text(line + "\n")
    assert hostname(target("plain"), settings(config, system_known_hosts=(str(system),)))[0] == (
        "plain"
    )
    e = refused(target("plain"), settings(config, system_known_hosts=()))
    assert NOT_TRUSTED in one_line(e), e
    # OpenSSH's defaults.
    assert SshSettings().system_known_hosts == (
        "/etc/ssh/ssh_known_hosts",
        "/etc/ssh/ssh_known_hosts2",
    )
    assert SshSettings().system_config == "/etc/ssh/ssh_config"


def test_system_ssh_config_is_read_after_the_users(fleet, tmp_path, home):
    # The user's ~/.ssh/config names the address; the system file the rest. A HostName in
    # the system file comes second and loses, as with OpenSSH.
    (home / ".ssh").mkdir()
    (home / ".ssh" / "config").write_text(f"Host sysalias\n    HostName {fleet['plain'].address}\n")
    system = write(
        tmp_path / "ssh_config",
        "Host sysalias\n    HostName 127.0.0.254\n    "
        + block(fleet, "sysalias", "plain", trusted(fleet), NO_SYSTEM).split("\n", 2)[2],
    )
    ssh = settings(None, system_config=str(system), system_known_hosts=())
    assert hostname(target("sysalias"), ssh)[0] == "plain"
    # With explicit config files (--ssh-config, like ssh -F) the system file is not read.
    user_only = write(tmp_path / "user", (home / ".ssh" / "config").read_text())
    e = refused(target("sysalias"), settings(user_only, system_config=str(system)))
    assert isinstance(e, HostUnreachableError), e


def test_known_hosts_flag(fleet, tmp_path):
    config = write(
        tmp_path / "config",
        block(fleet, "plain", "plain", "UserKnownHostsFile /dev/null", NO_SYSTEM),
    )
    assert NOT_TRUSTED in one_line(refused(target("plain"), settings(config)))
    extra = (str(fleet.known_hosts),)
    assert hostname(target("plain"), settings(config, known_hosts_files=extra))[0] == "plain"
    # The flag, repeatable, on the deploy commands and exec.
    other = write(tmp_path / "other", "")
    for command in (["apply", "switch"], ["exec", "--", "true"]):
        ns = build_parser().parse_args(
            [
                command[0],
                "--known-hosts",
                str(fleet.known_hosts),
                "--known-hosts",
                str(other),
                *command[1:],
            ]
        )
        assert _ssh_settings(ns).known_hosts_files == (str(fleet.known_hosts), str(other))
    ns = build_parser().parse_args(["apply", "--known-hosts", str(tmp_path / "missing")])
    with pytest.raises(UsageError, match=r"--known-hosts .*missing"):
        _ssh_settings(ns)


# -- item 7: OpenSSH time values ------------------------------------------------------------


def test_time_values_in_ssh_options_and_config_files(fleet, tmp_path):
    config = write(
        tmp_path / "config",
        block(
            fleet,
            "plain",
            "plain",
            trusted(fleet),
            NO_SYSTEM,
            "ConnectTimeout 90s",
            "ServerAliveInterval 1h30m",
            "RekeyLimit 1G 1h",
        ),
    )
    assert hostname(target("plain"), settings(config))[0] == "plain"
    options = (
        "-o",
        "ServerAliveInterval=1m",
        "-oConnectTimeout 10s",
        "-o",
        "ServerAliveCountMax=2",
    )
    assert hostname(target("plain", *options), settings(config))[0] == "plain"


def test_bad_config_value_fails_the_node_not_the_run(fleet, tmp_path):
    config = write(
        tmp_path / "config", block(fleet, "plain", "plain", trusted(fleet), "ConnectTimeout soon")
    )
    e = refused(target("plain"), settings(config))
    assert isinstance(e, SshOptionError), e
    message = one_line(e)
    assert "web" in message and f"{config} line" in message and "soon" in message, message
    # End to end: `waggle exec` reports the node's error in its row; the others run.
    hive = tmp_path / "hive"
    hive.mkdir()
    write_hive(
        hive,
        """
        {
          meta.nixpkgs = import @NIXPKGS@ { };
          good = { deployment.targetHost = "plain"; };
          late = { deployment.targetHost = "plain";
                   deployment.sshOptions = [ "-o" "ServerAliveInterval=soon" ]; };
          injected = { deployment.targetHost = "plain";
                       deployment.sshOptions = [ "-o" "User=root\\nUserKnownHostsFile none" ]; };
          timed = { deployment.targetHost = "plain";
                    deployment.sshOptions = [ "-o" "ServerAliveInterval=1m" ]; };
        }
        """,
    )
    done = waggle("exec", "--ssh-config", str(fleet.ssh_config), "--", "hostname", cwd=hive)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "=== good: exit 0 ===\nplain" in done.stdout, done.stdout
    assert "=== timed: exit 0 ===\nplain" in done.stdout, done.stdout
    rows = {line.split(":")[0]: line for line in done.stdout.splitlines() if line.startswith("===")}
    assert "ServerAliveInterval=soon" in rows["=== late"], rows
    assert "-o" in rows["=== injected"] and "exit 0" not in rows["=== injected"], rows


def test_connect_timeout_from_ssh_options_is_honoured():
    # A listener that accepts and never says anything: only the timeout ends the wait.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                try:
                    accepted.append(server.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            ssh = SshSettings(config_files=(), connect_timeout=30)
            start = time.monotonic()
            e = refused(
                SshTarget("web", "127.0.0.1", port, "root", ("-o", "ConnectTimeout=1s")), ssh
            )
            took = time.monotonic() - start
        finally:
            stop.set()
            thread.join(5)
            for s in accepted:
                s.close()
    assert isinstance(e, HostUnreachableError) and "timed out" in one_line(e), e
    assert took < 5, took


# -- item 12: attached flag forms ----------------------------------------------------------


def test_attached_flag_forms(fleet, tmp_path, home):
    shutil.copy(fleet.client_key, home / "id")
    (home / "id").chmod(0o600)
    # User root, no IdentityFile, port 22: only the sshOptions can make this work.
    config = write(
        tmp_path / "config",
        block(
            fleet,
            "ported",
            "ported",
            trusted(fleet),
            NO_SYSTEM,
            "IdentitiesOnly yes",
            identity=False,
        ),
    )
    options: Sequence[str] = (f"-p{PORT}", "-ldeploy", "-i~/id")
    out, peer = hostname(target("ported", *options, user=None), settings(config), ["id", "-un"])
    assert out == "deploy"
    assert isinstance(peer, tuple) and peer[1] == PORT, peer
    # -J attached, and -J's jump host does not get the node's own sshOptions (no loop).
    jump = block(fleet, "bastion", "bastion", trusted(fleet), NO_SYSTEM)
    inner = block(fleet, "inner", "inner", trusted(fleet), NO_SYSTEM)
    direct = f"Host *\n    BindAddress {DEPLOYER_ADDRESS}\n"
    config = write(tmp_path / "jump", inner + jump + direct)
    assert hostname(target("inner", "-Jbastion"), settings(config))[0] == "inner"
    assert hostname(target("inner", "-J", "bastion"), settings(config))[0] == "inner"
