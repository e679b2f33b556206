"""`waggle apply` and `apply-local` end to end along the less common deployment paths.

A non-root targetUser escalating with sudo, ProxyJump through a bastion, an IPv6 literal
target, `--reboot` (a host that comes back and one that does not), building on the target,
and `apply-local` run inside a fleet host. Real nix, real sshd hosts with their own stores
(tests/fleet.py); every test checks what landed on the hosts, the exit code, and that no
Python traceback was printed.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import ROOT, needs_fleet, write_hive
from tests.fleet import Fleet, TestHost, free_first_octet
from tests.helpers import waggle

pytestmark = needs_fleet()

HOSTS = ("sudo1", "bastion", "inner", "v6", "up-again", "gone", "builder", "local")
# The deployer's source address for direct connections in the ProxyJump test: the inner
# host accepts only 127.0.0.1, which is where the bastion's forwarded connections come from.
DEPLOYER_ADDRESS = "127.0.0.99"

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, pkgs, ... }: {
    networking.hostName = name;
    environment.systemPackages = [ pkgs.hello ];
    environment.etc.release.text = "@RELEASE@";
  };
@NODES@
}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    with Fleet.start(
        d, len(HOSTS), names=HOSTS, first_octet=free_first_octet(len(HOSTS), 160)
    ) as f:
        yield f


@pytest.fixture
def hive(tmp_path: Path) -> Path:
    return tmp_path


# -- helpers ---------------------------------------------------------------------------------


def write(hive_dir: Path, release: str, nodes: Mapping[str, str]) -> None:
    """The hive with `nodes` (name -> module, Nix text) on top of the common defaults."""
    body = "\n".join(f"  {json.dumps(name)} = {module};" for name, module in nodes.items())
    write_hive(hive_dir, HIVE.replace("@RELEASE@", release).replace("@NODES@", body))


def apply(hive_dir: Path, ssh_config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return waggle("apply", *args, "--ssh-config", str(ssh_config), cwd=hive_dir, timeout=300)


def outcome(done: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    rows = [line.split("\t") for line in done.stdout.splitlines() if "\t" in line]
    return {r[0]: (r[1], r[2]) for r in rows}


def succeeded(done: subprocess.CompletedProcess[str], *nodes: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    results = outcome(done)
    for node in nodes:
        assert results.get(node, ("missing", ""))[0] == "ok", done.stdout


def toplevel_of(hive_dir: Path, node: str) -> str:
    """The node's system path, by evaluation only (nothing is built or copied here)."""
    expr = f"{{ nodes, ... }}: nodes.{json.dumps(node)}.config.system.build.toplevel.outPath"
    done = waggle("eval", "-E", expr, cwd=hive_dir)
    assert done.returncode == 0, done.stderr
    path = json.loads(done.stdout)
    assert isinstance(path, str) and path.startswith("/nix/store/"), path
    return path


def built(hive_dir: Path, node: str) -> str:
    """Build the node here; its system path."""
    done = waggle("build", "--on", node, cwd=hive_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\t")[1].strip()


def log_mark(host: TestHost) -> int:
    return (host.root / "sshd.log").stat().st_size


def log_since(host: TestHost, mark: int) -> str:
    with (host.root / "sshd.log").open("rb") as f:
        f.seek(mark)
        return f.read().decode(errors="replace")


def ids(host: TestHost, database: str, name: str) -> int:
    """The uid (passwd) or gid (group) of `name` in the host's own /etc."""
    for line in host.path(f"/etc/{database}").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"{name} not in the host's /etc/{database}")


def identity_block(fleet: Fleet, pattern: str, *extra: str) -> str:
    """An ssh_config block reaching a fleet host as root with the fleet's key."""
    lines = [
        f"Host {pattern}",
        *(f"    {line}" for line in extra),
        "    User root",
        f'    IdentityFile "{fleet.client_key}"',
        "    IdentitiesOnly yes",
        f'    UserKnownHostsFile "{fleet.known_hosts}"',
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking yes",
        "    BatchMode yes",
        "    ConnectTimeout 10",
    ]
    return "\n".join(lines) + "\n\n"


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


# -- 1. a non-root targetUser with sudo --------------------------------------------------------

SUDO_NODE = """{
    deployment.targetHost = "sudo1";
    deployment.targetUser = "deploy";
    users.users.svc = { isSystemUser = true; group = "svc"; };
    users.groups.svc = { };
    deployment.keys.token = {
      text = "@SECRET@"; user = "svc"; group = "svc"; permissions = "0640";
    };
    system.activationScripts.whoDeployed = "echo \\"$SUDO_USER:$(id -un)\\" > /run/deployed-by";
  }"""


def test_non_root_target_user_deploys_through_sudo(fleet, hive):
    h = fleet["sudo1"]
    fleet.add_user("sudo1", "deploy", sudo=True)
    secret = f"secret-{uuid.uuid4()}"
    write(hive, "sudo", {"via-sudo": SUDO_NODE.replace("@SECRET@", secret)})
    mark = log_mark(h)
    done = apply(hive, fleet.ssh_config, "switch", "--on", "via-sudo")
    succeeded(done, "via-sudo")
    toplevel = built(hive, "via-sudo")
    assert h.readlink("/run/current-system") == toplevel
    assert h.resolve("/nix/var/nix/profiles/system") == h.path(toplevel)
    assert h.resolve("/etc/release").read_text() == "sudo"
    # The pre-activation key: uploaded before svc existed, chowned by the activation.
    key = h.path("/run/keys/token")
    assert key.read_text() == secret
    st = key.stat()
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == (
        "0o640",
        ids(h, "passwd", "svc"),
        ids(h, "group", "svc"),
    )
    # It all ran as root through deploy's sudo: the activation saw SUDO_USER, sudo logged
    # the push, the key and the activation, and sshd let in deploy only.
    assert h.path("/run/deployed-by").read_text().strip() == "deploy:root"
    sudo_log = h.path("/run/sudo.log").read_text()
    commands = [line for line in sudo_log.splitlines() if " : deploy : " in line]
    assert commands and all("USER=root" in line for line in commands), sudo_log
    assert any("nix-store --import" in line for line in commands), sudo_log
    assert any(toplevel in line and "run.sh" in line for line in commands), sudo_log
    assert any("/run/keys" in line for line in commands), sudo_log
    assert secret not in sudo_log
    sessions = log_since(h, mark)
    assert "Accepted publickey for deploy from" in sessions, sessions
    assert "Accepted publickey for root" not in sessions, sessions


# -- 2. ProxyJump through a bastion -----------------------------------------------------------


def test_proxy_jump_through_a_bastion(fleet, hive):
    bastion, inner = fleet["bastion"], fleet["inner"]
    # The bastion logs each forwarding request; the inner host lets root in only from
    # 127.0.0.1 (the bastion's connections) while the deployer's own come from elsewhere.
    fleet.configure_sshd("bastion", "LogLevel DEBUG1")
    fleet.configure_sshd("inner", "LogLevel VERBOSE", "AllowUsers root@127.0.0.1")
    config = hive / "ssh_config"
    config.write_text(
        identity_block(fleet, "inner-via-bastion", f"HostName {inner.address}", "ProxyJump bastion")
        + identity_block(fleet, "inner-direct", f"HostName {inner.address}")
        + fleet.ssh_config.read_text()
        + f"Host *\n    BindAddress {DEPLOYER_ADDRESS}\n"
    )
    mark_bastion, mark_inner = log_mark(bastion), log_mark(inner)
    # Directly, the inner host is out of reach; through the bastion it answers.
    direct = subprocess.run(
        ["ssh", "-F", str(config), "inner-direct", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert direct.returncode == 255, direct.stderr
    assert f"User root from {DEPLOYER_ADDRESS} not allowed" in log_since(inner, mark_inner)
    # sshd logs the end of the refused connection after the client has gone: wait for it.
    closed = f"Connection closed by invalid user root {DEPLOYER_ADDRESS}"
    deadline = time.monotonic() + 10
    while closed not in log_since(inner, mark_inner) and time.monotonic() < deadline:
        time.sleep(0.05)

    write(hive, "jump", {"jumped": '{ deployment.targetHost = "inner-via-bastion"; }'})
    mark_bastion, mark_inner = log_mark(bastion), log_mark(inner)
    done = apply(hive, config, "switch", "--on", "jumped")
    succeeded(done, "jumped")
    toplevel = built(hive, "jumped")
    assert inner.readlink("/run/current-system") == toplevel
    assert inner.resolve("/etc/release").read_text() == "jump"
    assert not bastion.path("/run/current-system").exists()
    forwarded = log_since(bastion, mark_bastion)
    assert re.search(
        rf"server_request_direct_tcpip: originator \S* port \d+, target {re.escape(inner.address)}"
        r" port 22\b",
        forwarded,
    ), forwarded
    assert f"Accepted publickey for root from {DEPLOYER_ADDRESS}" in forwarded  # to the bastion
    sessions = log_since(inner, mark_inner)
    assert "Accepted publickey for root from 127.0.0.1 " in sessions, sessions
    assert f"Connection from {DEPLOYER_ADDRESS}" not in sessions  # nothing tried it directly


# -- 3. an IPv6 literal target -----------------------------------------------------------------


def test_ipv6_literal_target_with_port(fleet, hive):
    h = fleet["v6"]
    port = free_port("::1")
    fleet.listen_also("v6", "::1", port)
    config = hive / "ssh_config"
    config.write_text(identity_block(fleet, "::1") + fleet.ssh_config.read_text())
    write(
        hive,
        "six",
        {"v6-node": f'{{ deployment.targetHost = "::1"; deployment.targetPort = {port}; }}'},
    )
    mark = log_mark(h)
    done = apply(hive, config, "switch", "--on", "v6-node")
    succeeded(done, "v6-node")
    toplevel = built(hive, "v6-node")
    assert h.readlink("/run/current-system") == toplevel
    assert h.resolve("/etc/release").read_text() == "six"
    sessions = log_since(h, mark)
    assert "Accepted publickey for root from ::1 port" in sessions, sessions
    assert f"Accepted publickey for root from {h.address}" not in sessions


# -- 4. --reboot ----------------------------------------------------------------------------


class Moment(threading.Event):
    at: float = 0.0


def watch_reboot_log(host: TestHost, timeout: float = 120) -> Moment:
    """A Moment set (with its monotonic time) when `host`'s simulated reboot goes down."""
    seen = Moment()
    log = host.root / "reboot.log"
    before = log.read_text().count("going down") if log.exists() else 0

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and log.read_text().count("going down") > before:
                seen.at = time.monotonic()
                seen.set()
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def test_reboot_waits_for_the_host_and_gives_up_on_one_that_stays_down(fleet, hive):
    back, gone = fleet["up-again"], fleet["gone"]
    fleet.set_reboot_delay("up-again", 0.5)
    fleet.set_reboot_delay("gone", None)
    boot_ids = {h.name: h.boot_id() for h in (back, gone)}
    write(
        hive,
        "reboot",
        {
            "comes-back": '{ deployment.targetHost = "up-again"; }',
            "stays-down": '{ deployment.targetHost = "gone"; }',
        },
    )
    targets = {n: toplevel_of(hive, n) for n in ("comes-back", "stays-down")}
    went_down = watch_reboot_log(gone)
    try:
        done = apply(
            hive,
            fleet.ssh_config,
            "--reboot",
            "--reboot-timeout",
            "5",
            "--on",
            "comes-back,stays-down",
        )
        ended = time.monotonic()
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == 1, (done.stdout, done.stderr)
        results = outcome(done)
        assert results["comes-back"][0] == "ok", done.stdout
        assert results["stays-down"][0] == "failed", done.stdout
        assert "did not come back within 5 s" in results["stays-down"][1]
        assert re.search(r"stays-down.*did not come back within 5 s", done.stderr), done.stderr
        # Waggle gave up once the 5 s had passed, not before and not much later.
        assert went_down.wait(1), "the host never went down"
        waited = ended - went_down.at
        assert 4.0 < waited < 9.0, waited
        # The host that came back: a new boot, running the new system.
        assert back.boot_id() != boot_ids["up-again"]
        assert back.readlink("/run/current-system") == targets["comes-back"]
        assert back.readlink("/run/booted-system") == targets["comes-back"]
        assert "up again" in (back.root / "reboot.log").read_text()
        # The one that went down for good: the new system is its boot default.
        assert not gone.accepts()
        assert "stays down" in (gone.root / "reboot.log").read_text()
        assert gone.resolve("/nix/var/nix/profiles/system") == gone.path(targets["stays-down"])
    finally:
        fleet.set_reboot_delay("gone", 1.0)
        fleet.start_host("gone", new_boot=True)
    assert gone.boot_id() != boot_ids["gone"]
    assert gone.readlink("/run/current-system") == targets["stays-down"]


# -- 5. build on target ----------------------------------------------------------------------


def on_target_node(hive_dir: Path, node: str, extra: str = "") -> str:
    """Write a hive whose node `node` (on host "builder") has a system no store has yet."""
    unique = f"unique-{uuid.uuid4()}"
    write(
        hive_dir,
        "bot",
        {
            node: f"""{{
    deployment.targetHost = "builder";
    environment.etc.unique.text = "{unique}";
    {extra}
  }}"""
        },
    )
    return unique


def assert_built_on_target(h: TestHost, toplevel: str) -> None:
    assert h.path(toplevel).is_dir(), f"{toplevel} is not in {h.name}'s store"
    assert not Path(toplevel).exists(), f"{toplevel} was built (or copied) here"


def test_build_on_target_option_builds_there_and_switches(fleet, hive):
    h = fleet["builder"]
    unique = on_target_node(hive, "bot", "deployment.buildOnTarget = true;")
    toplevel = toplevel_of(hive, "bot")
    assert not Path(toplevel).exists()
    done = apply(hive, fleet.ssh_config, "switch", "--on", "bot")
    succeeded(done, "bot")
    assert_built_on_target(h, toplevel)
    assert h.readlink("/run/current-system") == toplevel
    assert h.resolve("/etc/unique").read_text() == unique


def test_build_on_target_flag_and_its_override(fleet, hive):
    h = fleet["builder"]
    unique = on_target_node(hive, "plain")
    toplevel = toplevel_of(hive, "plain")
    done = apply(hive, fleet.ssh_config, "switch", "--on", "plain", "--build-on-target")
    succeeded(done, "plain")
    assert_built_on_target(h, toplevel)
    assert h.resolve("/etc/unique").read_text() == unique
    # --no-build-on-target overrides deployment.buildOnTarget: built here, then pushed.
    on_target_node(hive, "bot", "deployment.buildOnTarget = true;")
    toplevel = toplevel_of(hive, "bot")
    done = apply(hive, fleet.ssh_config, "push", "--on", "bot", "--no-build-on-target")
    succeeded(done, "bot")
    assert Path(toplevel).is_dir()
    assert h.path(toplevel).is_dir()


def test_apply_build_of_a_build_on_target_node_builds_on_the_target(fleet, hive):
    h = fleet["builder"]
    on_target_node(hive, "bot", "deployment.buildOnTarget = true;")
    toplevel = toplevel_of(hive, "bot")
    done = apply(hive, fleet.ssh_config, "build", "--on", "bot")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert_built_on_target(h, toplevel)


def test_apply_build_with_build_on_target_flag_builds_on_the_target(fleet, hive):
    h = fleet["builder"]
    on_target_node(hive, "plain")
    toplevel = toplevel_of(hive, "plain")
    done = apply(hive, fleet.ssh_config, "build", "--on", "plain", "--build-on-target")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert_built_on_target(h, toplevel)


# -- 6. apply-local inside a fleet host -------------------------------------------------------

LOCAL_NODES = {
    "loc": "{ deployment.allowLocalDeployment = true; }",
    "not-allowed": "{ }",
}


def apply_local(fleet: Fleet, hive_dir: Path, node: str) -> tuple[int, str, str]:
    """`waggle apply-local --node NODE`, run inside the fleet host "local" as root.

    The venv and the hive are on the shared filesystem; the Python the venv points at may
    live under /root (pyenv), which is the host's own: that is shared with the host first.
    """
    for prefix in {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}:
        fleet.share("local", prefix)
    command = (
        f"cd {shlex.quote(str(hive_dir))} && NIX_CONFIG='substituters =' "
        f"PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} -m runner"
        f" apply-local --node {shlex.quote(node)}"
    )
    done = fleet.run("local", command, timeout=120)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def set_os_release(h: TestHost, text: str) -> None:
    # The host's own /etc is a copy of this machine's, where os-release is a symlink into
    # /usr (shared): replace the link, never write through it.
    path = h.path("/etc/os-release")
    assert path.parent != Path("/etc")
    path.unlink(missing_ok=True)
    path.write_text(text)


def test_apply_local_inside_a_host(fleet, hive):
    h = fleet["local"]
    write(hive, "local", LOCAL_NODES)
    toplevel = toplevel_of(hive, "loc")
    set_os_release(h, 'NAME=NixOS\nID=nixos\nVERSION_ID="23.11"\n')
    code, out, err = apply_local(fleet, hive, "loc")
    assert "Traceback" not in err, err
    assert code == 0, (out, err)
    assert out.startswith("loc\tok\t"), out
    # Built from scratch in the host's own store and activated there.
    assert h.path(toplevel).is_dir()
    assert h.readlink("/run/current-system") == toplevel
    assert h.resolve("/nix/var/nix/profiles/system") == h.path(toplevel)
    assert h.resolve("/etc/release").read_text() == "local"

    code, out, err = apply_local(fleet, hive, "not-allowed")
    assert "Traceback" not in err, err
    assert code == 2, (out, err)
    assert "waggle: error:" in err and "allowLocalDeployment" in err and "not-allowed" in err

    set_os_release(h, 'NAME="Debian GNU/Linux"\nID=debian\n')
    log_lines = h.path("/run/standin/activations.log").read_text().count("\n")
    code, out, err = apply_local(fleet, hive, "loc")
    assert "Traceback" not in err, err
    assert code == 2, (out, err)
    assert "waggle: error:" in err and "not NixOS" in err
    assert h.path("/run/standin/activations.log").read_text().count("\n") == log_lines


def test_apply_local_of_a_node_without_target_host(fleet, hive):
    h = fleet["local"]
    write(
        hive,
        "laptop",
        {"laptop": "{ deployment.allowLocalDeployment = true; deployment.targetHost = null; }"},
    )
    toplevel = toplevel_of(hive, "laptop")
    set_os_release(h, "NAME=NixOS\nID=nixos\n")
    code, out, err = apply_local(fleet, hive, "laptop")
    assert "Traceback" not in err, err
    assert code == 0, (out, err)
    assert out.startswith("laptop\tok\t"), out
    assert h.readlink("/run/current-system") == toplevel
