"""The local test fleet: real sshd per host in its own namespace (needs root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import fleet as fleet_module
from tests.fleet import Fleet, FleetError, TestHost, free_first_octet, processes_in_namespace_of

ROOT = Path(__file__).resolve().parent.parent
SEEN_PIDS: set[int] = set()  # sshds the module fleet's tests caused to start
SUDO_REASON = "the test fleet needs root (mount namespaces, port 22)"
MISSING = [
    t for t in ("/usr/sbin/sshd", "/usr/bin/unshare", "/usr/bin/ssh") if not os.path.exists(t)
]

if os.environ.get("CI") != "true":
    pytestmark = [
        pytest.mark.skipif(os.geteuid() != 0, reason=SUDO_REASON),
        pytest.mark.skipif(bool(MISSING), reason=f"missing: {MISSING}"),
    ]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(text in arg for arg in proc.info["cmdline"] or []) and alive(proc.pid):
            found.append(proc.pid)
    return found


def assert_all_gone(directory: Path, hosts: list[TestHost], pids: set[int], namespaces) -> None:
    for host in hosts:
        assert host.processes() == [], host.name
    for ns in namespaces:
        left = _in_namespace(ns)
        deadline = time.monotonic() + 5  # a SIGKILLed process may take a moment to exit
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _in_namespace(ns)
        assert not left, (ns, [_describe(p) for p in left])
    assert not [p for p in pids if alive(p)]
    assert processes_mentioning(str(directory)) == []
    assert str(directory) not in Path("/proc/self/mountinfo").read_text()


def _in_namespace(ns: tuple[int, int] | None) -> list[int]:
    return [p for p in psutil.pids() if _ns(p) == ns and alive(p)]


def _describe(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{pid} {proc.status()} ppid={proc.ppid()} {' '.join(proc.cmdline())[:200]}"
    except psutil.Error as e:
        return f"{pid} ({e})"


def _ns(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def wait_gone(pids: set[int], timeout: float = 5) -> None:
    """Processes reparented to PID 1 stay zombies until it reaps them; give it a moment."""
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(p) and alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fleet")
    fleet = Fleet.start(directory, 3, first_octet=free_first_octet(3, start=100))
    pids = {h.pid for h in fleet.hosts}
    namespaces = {_ns(h.pid) for h in fleet.hosts}
    hosts = fleet.hosts
    try:
        yield fleet
    finally:
        pids |= SEEN_PIDS | {p for h in fleet.hosts if (p := h.sshd_pid()) is not None}
        fleet.stop()
    wait_gone(pids)
    assert_all_gone(directory, hosts, pids, namespaces)


@pytest.fixture(scope="module")
def system_path(tmp_path_factory) -> str:
    """A tiny real toplevel: bin/switch-to-configuration points /run/current-system at it."""
    script = (
        "PATH=/usr/bin:/bin; mkdir -p $out/bin; "
        'printf "#!/bin/sh\\nln -sfn %s /run/current-system\\necho \\"\\$1\\" > /run/switched\\n"'
        " $out > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration"
    )
    expr = (
        'derivation { name = "fleet-test-toplevel"; system = builtins.currentSystem;'
        f' builder = "/bin/sh"; args = ["-c" {nix_string(script)}]; }}'
    )
    done = subprocess.run(
        ["nix-build", "--no-out-link", "--option", "substituters", "", "-E", expr],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.strip()


def nix_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def push(fleet: Fleet, name: str, path: str) -> None:
    closure = subprocess.run(
        ["nix-store", "-qR", path], capture_output=True, text=True, check=True
    ).stdout.split()
    export = subprocess.Popen(["nix-store", "--export", *closure], stdout=subprocess.PIPE)
    assert export.stdout is not None
    done = subprocess.run(
        fleet.ssh_argv(name, "nix-store --import"),
        stdin=export.stdout,
        capture_output=True,
        timeout=60,
        check=False,
    )
    export.stdout.close()
    assert export.wait() == 0
    assert done.returncode == 0, done.stderr


def ok(fleet: Fleet, name: str, command: str) -> str:
    done = fleet.run(name, command)
    assert done.returncode == 0, (name, command, done.stderr.decode())
    return done.stdout.decode()


def test_each_host_reports_its_own_name_and_boot_id(fleet):
    argv = [fleet.ssh_argv(h.name, "hostname; cat /proc/sys/kernel/random/boot_id") for h in fleet]
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argv]
    outputs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    machine_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    seen = []
    for host, (out, _) in zip(fleet, outputs, strict=True):
        name, boot_id = out.decode().split()
        assert name == host.name
        assert boot_id == host.boot_id() != machine_boot_id
        seen.append(boot_id)
    assert len(set(seen)) == 3
    octets = [int(h.address.rsplit(".", 1)[1]) for h in fleet]
    assert octets == list(range(octets[0], octets[0] + 3))
    assert fleet.env().addresses == {h.name: h.address for h in fleet}


def test_root_sessions_find_the_simulated_reboot_first(fleet):
    out = ok(fleet, "host1", 'echo "$PATH"; command -v reboot; echo "$HOME"; touch ~/.probe')
    path, reboot, home = out.split("\n")[:3]
    assert path.split(":")[0] == "/usr/local/sbin"
    assert reboot == "/usr/local/sbin/reboot"
    # ~ is the host's own /root (so this machine's ~/.bashrc does not reorder PATH).
    assert home == "/root"
    assert fleet["host1"].path("/root/.probe").exists()
    assert not fleet["host2"].path("/root/.probe").exists()


def test_stores_are_separate_and_activation_lands_in_the_host(fleet, system_path):
    host1, host2 = fleet["host1"], fleet["host2"]
    machine_switched = Path("/run/switched").exists()
    push(fleet, "host1", system_path)
    assert host1.path(system_path).is_dir()
    assert not host2.path(system_path).exists()
    assert fleet.run("host2", f"test -e {system_path}").returncode == 1
    ok(
        fleet,
        "host1",
        f"nix-env --profile /nix/var/nix/profiles/system --set {system_path}"
        f" && {system_path}/bin/switch-to-configuration switch",
    )
    assert host1.readlink("/run/current-system") == system_path
    assert host1.resolve("/run/current-system") == host1.path(system_path)
    assert host1.resolve("/nix/var/nix/profiles/system") == host1.path(system_path)
    assert host1.path("/run/switched").read_text() == "switch\n"
    assert not host2.path("/run/current-system").exists()
    assert Path("/run/switched").exists() == machine_switched
    # nix-env's ~/.nix-defexpr went to the host's own /root.
    assert host1.path("/root/.nix-defexpr").exists()


def test_host_key_checking_is_real(fleet, tmp_path):
    host1, host2 = fleet["host1"], fleet["host2"]
    lines = fleet.known_hosts.read_text().splitlines()
    key2 = next(line for line in lines if line.startswith(host2.address + ",")).split(" ", 1)[1]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{host1.address},{host1.name} {key2}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    for known, message in ((wrong, "HOST IDENTIFICATION HAS CHANGED"), (empty, "verification")):
        done = subprocess.run(
            [
                "ssh",
                "-F",
                str(fleet.ssh_config),
                "-o",
                f"UserKnownHostsFile={known}",
                "host1",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 255 and message in done.stderr, done.stderr
    # A client key the fleet does not know is refused (no password fallback).
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
    config = tmp_path / "other_config"
    config.write_text(fleet.ssh_config.read_text().replace(str(fleet.client_key), str(other)))
    prefer = "PreferredAuthentications=publickey,password,keyboard-interactive"
    done = subprocess.run(
        ["ssh", "-F", str(config), "-o", prefer, "host1", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 255 and "Permission denied (publickey)" in done.stderr, done.stderr


def test_stop_host_and_start_host(fleet):
    host = fleet["host3"]
    boot_id = host.boot_id()
    fleet.stop_host("host3")
    assert host.processes() == []
    assert not host.accepts()
    done = fleet.run("host3", "true")
    assert done.returncode == 255 and b"refused" in done.stderr
    assert ok(fleet, "host1", "echo still") == "still\n"
    again = fleet.start_host("host3")
    SEEN_PIDS.add(again.pid)
    assert again.pid != host.pid and again.sshd_pid() == again.pid
    assert ok(fleet, "host3", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
    booted = fleet.start_host("host3", new_boot=True)
    SEEN_PIDS.add(booted.pid)
    assert ok(fleet, "host3", "cat /proc/sys/kernel/random/boot_id").strip() != boot_id


def test_restarting_a_host_spares_a_namespace_number_reused_by_another(fleet):
    # The kernel reuses the number of a mount namespace that has died. A number remembered
    # for host3 that now names host1's namespace must not make host3's restart kill host1
    # (seen in CI: host1's activation was SIGKILLed while host2 restarted).
    host1 = fleet["host1"]
    reused = _ns(host1.pid)
    assert reused is not None
    fleet._namespaces.setdefault("host3", set()).add(reused)
    restarted = fleet.start_host("host3")
    SEEN_PIDS.add(restarted.pid)
    assert alive(host1.pid) and host1.processes()
    assert ok(fleet, "host1", "echo still") == "still\n"
    assert reused not in fleet._namespaces.get("host3", set())


def test_a_stray_in_a_reused_namespace_number_that_sees_another_hosts_nix_is_spared(fleet):
    # Nix unshares a mount namespace of its own to remount the store; the kernel may give
    # it the number of the namespace a stop is emptying (seen in CI: host3's nix-env was
    # SIGKILLed as a "stray" of host2). A process that sees another host's /nix is not a
    # stray of the host being stopped, whatever its namespace's number.
    done = fleet.run("host1", "unshare -m setsid -f sleep 60 </dev/null >/dev/null 2>&1")
    assert done.returncode == 0, done.stderr
    sleeper = None
    for _ in range(100):
        sleeper = next((p for p in psutil.pids() if _cmdline(p) == "sleep 60"
                        and fleet["host1"].pid_is_mine(p)), None)  # fmt: skip
        if sleeper is not None:
            break
        time.sleep(0.05)
    assert sleeper is not None
    try:
        ns = _ns(sleeper)
        assert ns is not None and ns != _ns(fleet["host1"].pid)
        fleet_module._kill_hosts([fleet["host3"]], {ns})  # no spare: only the /nix check
        assert alive(sleeper)
    finally:
        os.kill(sleeper, 9)
        fleet.start_host("host3")


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def test_reboot_changes_boot_id_and_comes_back_after_the_delay(fleet, system_path):
    host = fleet["host2"]
    push(fleet, "host2", system_path)
    ok(fleet, "host2", f"nix-env --profile /nix/var/nix/profiles/system --set {system_path}")
    background = int(
        ok(
            fleet,
            "host2",
            "echo x > /run/marker; setsid sleep 300 >/dev/null 2>&1 </dev/null & echo $!",
        )
    )
    assert alive(background) and host.pid_is_mine(background)
    old_boot, old_pid = host.boot_id(), host.sshd_pid()
    assert old_pid is not None
    fleet.set_reboot_delay("host2", 1.0)
    began = time.monotonic()
    done = fleet.run("host2", "reboot")
    assert done.returncode in (0, 255), done.stderr
    fleet.wait_until_down("host2", timeout=5)
    fleet.wait_until_up("host2", timeout=10)
    took = time.monotonic() - began
    assert 1.0 <= took < 5, took
    new_pid = host.sshd_pid()
    assert new_pid is not None and new_pid != old_pid
    SEEN_PIDS.add(new_pid)
    reported = ok(fleet, "host2", "cat /proc/sys/kernel/random/boot_id").strip()
    assert reported == host.boot_id() != old_boot
    assert not alive(background) and not alive(old_pid)
    # /run is fresh and current-system comes from the system profile, as at a real boot.
    assert not host.path("/run/marker").exists()
    assert host.readlink("/run/current-system") == system_path
    assert host.readlink("/run/booted-system") == system_path
    deadline = time.monotonic() + 5  # the session that read the boot id may still be exiting
    while host.processes() != [new_pid] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.processes() == [new_pid]


def test_reboot_never_stays_down_until_started(fleet):
    host = fleet["host3"]
    fleet.set_reboot_delay("host3", None)
    fleet.run("host3", "reboot")
    fleet.wait_until_down("host3", timeout=5)
    deadline = time.monotonic() + 5
    while host.processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.processes() == []
    time.sleep(1.5)
    assert not host.accepts()
    assert fleet.run("host3", "true").returncode == 255
    fleet.set_reboot_delay("host3", 1.0)
    back = fleet.start_host("host3")
    SEEN_PIDS.add(back.pid)
    assert ok(fleet, "host3", "hostname") == "host3\n"


def test_stop_kills_sessions_detached_processes_and_pending_reboots(tmp_path):
    directory = tmp_path / "f"
    with Fleet.start(directory, 1, first_octet=free_first_octet(1, start=120)) as fleet:
        host = fleet.hosts[0]
        ns = _ns(host.pid)
        detached = int(ok(fleet, "host1", "setsid sleep 300 >/dev/null 2>&1 </dev/null & echo $!"))
        session = subprocess.Popen(
            fleet.ssh_argv("host1", "sleep 300"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while len(host.processes()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = set(host.processes())
        assert {host.pid, detached} <= pids and len(pids) >= 4  # + session sshd, its sleep
        assert sorted(processes_in_namespace_of(host.pid)) == sorted(pids)
    assert session.wait(timeout=10) == 255
    wait_gone(pids)
    assert_all_gone(directory, [host], pids, {ns})

    # A host in the middle of a slow reboot: the pending reboot script dies with the fleet.
    directory = tmp_path / "g"
    with Fleet.start(directory, 1, first_octet=free_first_octet(1, start=120)) as fleet:
        host = fleet.hosts[0]
        ns = _ns(host.pid)
        fleet.set_reboot_delay("host1", 30)
        fleet.run("host1", "reboot")
        fleet.wait_until_down("host1", timeout=5)
        pids = set(host.processes())
        assert pids and host.pid not in pids  # the reboot script, sleeping
    wait_gone(pids)
    assert_all_gone(directory, [host], pids, {ns})


def test_etc_overlay_mode(tmp_path):
    with Fleet.start(tmp_path, 1, first_octet=free_first_octet(1, start=120), etc="overlay") as f:
        host = f.hosts[0]
        assert (
            ok(f, "host1", "hostname; grep -c '^substituters =' /etc/nix/nix.conf") == "host1\n1\n"
        )
        ok(f, "host1", "useradd -M fleetuser && rm /etc/motd && echo hi > /etc/fleet-new")
        assert "fleetuser:" in host.path("/etc/passwd").read_text()
        assert "fleetuser:" not in Path("/etc/passwd").read_text()
        assert host.path("/etc/fleet-new").read_text() == "hi\n"
        assert not host.path("/etc/motd").exists() and Path("/etc/motd").exists()
        assert host.path("/etc/ssh/sshd_config") == Path("/etc/ssh/sshd_config")
        assert host.path("/etc/nix/nix.conf") == host.root / "etc" / "nix" / "nix.conf"


def test_start_errors_are_clear(tmp_path, fleet):
    taken = fleet["host1"].address.rsplit(".", 1)[1]
    with pytest.raises(FleetError, match=f"in use on 127.0.0.{taken}"):
        Fleet.start(tmp_path / "x", 1, first_octet=int(taken))
    with pytest.raises(ValueError, match="bad host name"):
        Fleet.start(tmp_path / "y", 1, names=["no spaces"])


def test_cli_start_and_stop(tmp_path):
    directory = tmp_path / "cli"
    octet = free_first_octet(2, start=120)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "tests.fleet"]
    start = subprocess.run(
        [*cli, "start", "--count", "2", "--dir", str(directory), "--first-octet", str(octet)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    try:
        assert start.returncode == 0, start.stderr
        assert start.stdout.strip() == str(directory / "ssh_config")
        fleet = Fleet.load(directory)
        pids = {h.pid for h in fleet.hosts}
        assert all(alive(p) for p in pids)
        assert ok(fleet, "host2", "hostname") == "host2\n"
    finally:
        stop = subprocess.run(
            [*cli, "stop", "--dir", str(directory)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    assert stop.returncode == 0, stop.stderr
    wait_gone(pids)
    assert_all_gone(directory, fleet.hosts, pids, set())


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client")
def test_sftp_subsystem(fleet, tmp_path):
    source = tmp_path / "k"
    source.write_text("secret\n")
    done = subprocess.run(
        ["sftp", "-F", str(fleet.ssh_config), "-b", "-", "host1"],
        input=f"-mkdir /run/keys\nput {source} /run/keys/k\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert fleet["host1"].path("/run/keys/k").read_text() == "secret\n"
    assert not Path("/run/keys/k").exists() or Path("/run/keys/k").read_text() != "secret\n"
