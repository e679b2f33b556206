"""Activation and reboot: the real fleet (detached runner, cut SSH, reboots) and the fake host
(the exact systemd-run command line, resuming a stream after a drop)."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from runner.deploy import activation, confirm
from runner.deploy.activation import (
    ActivationResult,
    CurrentSystem,
    activate,
    current_system,
    reboot_and_wait,
)
from runner.hosts import command_line
from runner.hosts.ssh import SshHost, SshSettings, SshTarget
from tests.fake_ssh import DEFAULT_ENV, FakeHost
from tests.fleet import Fleet, TestHost, free_first_octet

ROOT = Path(__file__).resolve().parent.parent
EVAL_CONFIG = ROOT / "tests" / "fixtures" / "nixpkgs" / "nixos" / "lib" / "eval-config.nix"
needs_root = pytest.mark.skipif(
    os.environ.get("CI") != "true" and os.geteuid() != 0,
    reason="the test fleet needs root (mount namespaces, port 22)",
)
TIMINGS: dict[str, float] = {}

# Node configurations (Nix) of the toplevels the fleet tests activate.
SYSTEMS = {
    "a": '{ networking.hostName = "a"; }',
    "b": '{ networking.hostName = "b"; }',
    "c": '{ networking.hostName = "c"; }',
    "fail": '{ networking.hostName = "fail"; standin.activation.fail = true; }',
    "hang": '{ networking.hostName = "hang"; standin.activation.hangSeconds = 600; }',
    "cut": """{
        networking.hostName = "cut";
        standin.activation.cutSsh = true;
        system.activationScripts.lines = "for i in $(seq 1 30); do echo line-$i; done";
    }""",
}


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fleet")
    fleet = Fleet.start(directory, 3, first_octet=free_first_octet(3, start=140), etc="overlay")
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def systems() -> dict[str, str]:
    """Real toplevels of the nixpkgs stand-in, by name."""
    names = list(SYSTEMS)
    items = " ".join(f"(mk ({SYSTEMS[n]}))" for n in names)
    expr = (
        f"let mk = m: (import {EVAL_CONFIG} {{ modules = [ m ]; }})"
        f".config.system.build.toplevel; in [ {items} ]"
    )
    done = subprocess.run(
        ["nix-build", "--option", "substituters", "", "--no-out-link", "-E", expr],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert len(paths) == len(names), done.stdout
    return dict(zip(names, paths, strict=True))


def push(fleet: Fleet, name: str, *paths: str) -> None:
    closure = subprocess.run(
        ["nix-store", "-qR", *paths], capture_output=True, text=True, check=True
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


def ssh_host(config: Path, name: str) -> SshHost:
    return SshHost(
        SshTarget(node=name, host=name, user="root"), SshSettings(config_files=(str(config),))
    )


def with_host(config: Path, name: str, work):
    """Run `await work(host)` with a fresh SshHost, closed afterwards."""

    async def main():
        host = ssh_host(config, name)
        try:
            return await work(host)
        finally:
            await host.close()

    return asyncio.run(main())


def profile(host: TestHost) -> Path:
    return host.resolve("/nix/var/nix/profiles/system")


def run_dirs(host: TestHost) -> list[str]:
    """The activation run directories in /run/waggle (not the host lock's files there)."""
    state = host.path("/run/waggle")
    found = state.iterdir() if state.exists() else iter(())
    return sorted(p.name for p in found if p.name.startswith("activation-"))


def activation_processes(host: TestHost, *needles: str) -> list[str]:
    """Command lines of the host's live processes mentioning any needle."""
    found = []
    for pid in host.processes():
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(n in cmdline for n in needles):
            found.append(cmdline)
    return found


def wait_for(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- the fleet: goals, failure, hang, cut connection, reboots ------------------------------


@needs_root
def test_goals_set_profile_and_current_system_as_nixos_does(fleet, systems):
    host = fleet["host1"]
    a, b, c = systems["a"], systems["b"], systems["c"]
    push(fleet, "host1", a, b, c)
    lines: list[str] = []

    async def work(h: SshHost):
        before = await current_system(h)
        began = time.monotonic()
        switched = await activate(
            h, a, "switch", set_profile=True, timeout=60, on_line=lines.append
        )
        TIMINGS["switch"] = time.monotonic() - began
        after_switch = (host.readlink("/run/current-system"), profile(host), run_dirs(host))
        now = await current_system(h)
        booted = await activate(h, b, "boot", set_profile=True, timeout=60)
        after_boot = (host.readlink("/run/current-system"), profile(host))
        tested = await activate(h, c, "test", set_profile=False, timeout=60)
        after_test = (host.readlink("/run/current-system"), profile(host))
        dry_lines: list[str] = []
        dry = await activate(
            h, a, "dry-activate", set_profile=False, timeout=60, on_line=dry_lines.append
        )
        return (
            before,
            switched,
            after_switch,
            now,
            booted,
            after_boot,
            tested,
            after_test,
            (
                dry,
                dry_lines,
                await current_system(h),
            ),
        )

    before, switched, after_switch, now, booted, after_boot, tested, after_test, dry_part = (
        with_host(fleet.ssh_config, "host1", work)
    )
    assert before == CurrentSystem(None, None)
    assert switched.ok, switched
    assert switched.message == "Activation successful" and switched.exit_status == 0
    assert switched.method == "detached" and switched.reconnects == 0
    assert after_switch == (a, host.path(a), [])  # current, profile, run directory removed
    assert "activating the configuration..." in lines
    assert switched.log_tail.splitlines() == lines[-activation.LOG_TAIL_LINES :]
    # ... and recorded as activated by Waggle (the runner's record, which only a success writes).
    assert now == CurrentSystem(current=a, profile=a, activated=a, activated_boot=a)

    assert booted.ok, booted
    assert after_boot == (a, host.path(b))  # boot: the profile only
    assert host.readlink("/nix/var/nix/profiles/.standin-boot-default") == b

    assert tested.ok, tested
    assert after_test == (c, host.path(b))  # test: running system only, profile untouched

    dry, dry_lines, last = dry_part
    assert dry.ok, dry
    assert f"would activate the configuration {a}" in dry_lines
    # dry-activate changes nothing
    assert last == CurrentSystem(current=c, profile=b, activated=c, activated_boot=b)
    log = host.path("/run/standin/activations.log").read_text().splitlines()
    assert [line.split()[:2] for line in log] == [
        ["switch", a],
        ["boot", b],
        ["test", c],
        ["dry-activate", a],
    ]
    assert run_dirs(host) == []


@needs_root
def test_failing_activation_reports_status_and_log_tail(fleet, systems):
    host = fleet["host1"]
    push(fleet, "host1", systems["fail"])
    running_before = host.readlink("/run/current-system")

    async def work(h: SshHost) -> ActivationResult:
        return await activate(h, systems["fail"], "test", set_profile=False, timeout=60)

    result = with_host(fleet.ssh_config, "host1", work)
    assert not result.ok and not result.timed_out
    assert result.exit_status == 1
    assert result.message == "Activation failed: exit status 1"
    assert "standin.activation.fail is set" in result.log_tail
    assert host.readlink("/run/current-system") == running_before
    assert run_dirs(host) == []


@needs_root
def test_hanging_activation_times_out_and_is_killed_on_the_host(fleet, systems):
    host = fleet["host2"]
    hang = systems["hang"]
    push(fleet, "host2", hang)
    lines: list[str] = []

    async def work(h: SshHost) -> ActivationResult:
        return await activate(h, hang, "test", set_profile=False, timeout=3, on_line=lines.append)

    began = time.monotonic()
    result = with_host(fleet.ssh_config, "host2", work)
    took = time.monotonic() - began
    assert not result.ok and result.timed_out
    assert result.message == "activation timed out after 3 s"
    assert result.exit_status is None
    assert 3 <= took < 6, took
    assert "standin: hanging for 600 seconds before activation" in lines
    assert "hanging for 600 seconds" in result.log_tail
    needles = (hang, "/run/waggle/", "sleep 600")
    assert wait_for(lambda: not activation_processes(host, *needles), 5), activation_processes(
        host, *needles
    )
    assert run_dirs(host) == []
    assert not host.path("/run/current-system").exists()


@needs_root
def test_activation_survives_the_ssh_connection_being_cut(fleet, systems):
    host = fleet["host2"]
    cut = systems["cut"]
    push(fleet, "host2", cut)
    lines: list[str] = []

    async def work(h: SshHost) -> ActivationResult:
        return await activate(h, cut, "switch", set_profile=True, timeout=60, on_line=lines.append)

    began = time.monotonic()
    result = with_host(fleet.ssh_config, "host2", work)
    TIMINGS["cut-and-reconnect"] = time.monotonic() - began
    assert result.ok, result
    assert result.reconnects >= 1
    assert result.exit_status == 0 and result.message == "Activation successful"
    assert host.readlink("/run/current-system") == cut
    assert profile(host) == host.path(cut)
    # Every line once, in order, across the reconnect.
    numbered = [line for line in lines if line.startswith("line-")]
    assert numbered == [f"line-{i}" for i in range(1, 31)]
    assert lines.count("activating the configuration...") == 1
    assert run_dirs(host) == []


@needs_root
def test_reboot_waits_for_a_new_boot_and_checks_the_system(fleet, systems):
    host = fleet["host3"]
    a = systems["a"]
    push(fleet, "host3", a)
    fleet.set_reboot_delay("host3", 1.0)
    old_boot = host.boot_id()

    async def work(h: SshHost):
        switched = await activate(h, a, "switch", set_profile=True, timeout=60)
        began = time.monotonic()
        rebooted = await reboot_and_wait(h, timeout=20, expect_toplevel=a, poll_interval=0.5)
        TIMINGS["reboot (delay 1 s, polls every 0.5 s)"] = time.monotonic() - began
        wrong = await reboot_and_wait(
            h, timeout=20, expect_toplevel=systems["b"], poll_interval=0.5
        )
        return switched, rebooted, wrong

    switched, rebooted, wrong = with_host(fleet.ssh_config, "host3", work)
    assert switched.ok, switched
    assert rebooted.ok, rebooted
    assert rebooted.old_boot_id == old_boot
    assert rebooted.new_boot_id not in (None, old_boot)
    assert rebooted.current == a
    assert 1.0 < rebooted.seconds < 10, rebooted.seconds
    assert not wrong.ok
    assert wrong.message == (
        f"Unexpected active system after reboot: {a} (expected {systems['b']})"
    )
    assert wrong.new_boot_id == host.boot_id() != rebooted.new_boot_id


@needs_root
def test_reboot_of_a_host_that_never_comes_back_fails_in_time(fleet):
    fleet.set_reboot_delay("host3", None)

    async def work(h: SshHost):
        return await reboot_and_wait(h, timeout=5, expect_toplevel=None, poll_interval=0.5)

    began = time.monotonic()
    result = with_host(fleet.ssh_config, "host3", work)
    took = time.monotonic() - began
    assert not result.ok
    assert result.message == "host did not come back within 5 s"
    assert result.new_boot_id is None and result.old_boot_id
    assert 5 <= took < 7, took
    assert not fleet["host3"].accepts()


# -- magic rollback on the fleet: arming, confirming, rolling back (runner/deploy/confirm.py)


def record(host: TestHost) -> str:
    path = host.path(activation.ACTIVATED_RECORD)
    return path.read_text() if path.exists() else ""


@needs_root
def test_an_armed_switch_is_confirmed_over_a_new_connection(fleet, systems):
    host = fleet["host1"]
    a, b = systems["a"], systems["b"]
    push(fleet, "host1", a, b)

    async def work(h: SshHost):
        first = await activate(h, a, "switch", set_profile=True, timeout=60)  # not armed
        armed = await activate(h, b, "switch", set_profile=True, timeout=60, confirm_window=5)
        waiting = (run_dirs(host), record(host))
        began = time.monotonic()
        done = await confirm.confirm(h, armed.directory, deadline=began + 5, toplevel=b)
        TIMINGS["confirm over a new connection"] = time.monotonic() - began
        return first, armed, waiting, done

    first, armed, (waiting, unrecorded), done = with_host(fleet.ssh_config, "host1", work)
    assert first.ok and not first.armed
    assert armed.ok and armed.armed and armed.rollback_note == ""
    assert waiting == [Path(armed.directory).name]  # the runner waits in its directory
    assert f"running {b}" not in unrecorded  # nothing recorded before the confirmation
    assert done.confirmed, done
    assert done.attempts == 1 and done.outcome is not None and done.outcome.kind == "confirmed"
    assert host.readlink("/run/current-system") == b and profile(host) == host.path(b)
    assert record(host) == f"running {b}\nboot {b}\n"
    assert run_dirs(host) == []  # removed once the outcome was read
    assert wait_for(lambda: not activation_processes(host, "/run/waggle/"), 5)


@needs_root
def test_a_rollback_goes_back_exactly_one_step(fleet, systems):
    # The host runs c (a `test`) while its profile's current generation is b; an older
    # generation holds a. A switch to a that is rolled back must leave c running and the
    # profile at b's generation: not one further back, not at a (deploy-rs#154).
    host = fleet["host1"]
    a, b, c = systems["a"], systems["b"], systems["c"]
    push(fleet, "host1", a, b, c)

    async def work(h: SshHost):
        for toplevel, goal in ((a, "switch"), (b, "boot"), (c, "test")):
            done = await activate(h, toplevel, goal, set_profile=goal != "test", timeout=60)
            assert done.ok, done
        before = (host.readlink("/nix/var/nix/profiles/system"), record(host))
        armed = await activate(h, a, "switch", set_profile=True, timeout=60, confirm_window=30)
        switched = (host.readlink("/run/current-system"), profile(host))
        began = time.monotonic()
        outcome = await confirm.roll_back(h, armed.directory, timeout=60)
        TIMINGS["rollback asked for (a failed health check)"] = time.monotonic() - began
        return before, armed, switched, outcome

    (link, recorded), armed, switched, outcome = with_host(fleet.ssh_config, "host1", work)
    assert armed.armed and switched == (a, host.path(a))
    assert outcome.rolled_back, outcome
    assert outcome.previous == c and outcome.host_seconds is not None
    assert "waggle: rolled back to" in outcome.log
    assert host.readlink("/run/current-system") == c
    assert host.readlink("/nix/var/nix/profiles/system") == link  # b's generation, as before
    assert profile(host) == host.path(b)
    assert host.readlink("/nix/var/nix/profiles/.standin-boot-default") == b
    assert sorted(record(host).splitlines()) == [f"boot {b}", f"running {c}"]
    assert sorted(recorded.splitlines()) == [f"boot {b}", f"running {c}"]
    log = host.path("/run/standin/activations.log").read_text().splitlines()
    assert [line.split()[:2] for line in log[-3:]] == [["switch", a], ["test", c], ["boot", b]]
    assert run_dirs(host) == []


@needs_root
def test_an_unconfirmed_test_goes_back_by_itself_in_time(fleet, systems):
    host = fleet["host1"]
    a, b = systems["a"], systems["b"]
    push(fleet, "host1", a, b)

    async def work(h: SshHost):
        done = await activate(h, a, "test", set_profile=False, timeout=60)
        assert done.ok, done
        link = host.readlink("/nix/var/nix/profiles/system")
        armed = await activate(h, b, "test", set_profile=False, timeout=60, confirm_window=1)
        return link, armed

    link, armed = with_host(fleet.ssh_config, "host1", work)
    assert armed.armed and host.readlink("/run/current-system") == b
    began = time.monotonic()
    outcome = Path(armed.directory.replace("/run/", str(host.path("/run")) + "/", 1)) / "outcome"
    assert wait_for(outcome.exists, 5), run_dirs(host)
    assert time.monotonic() - began < 3  # 1 s window, then the rollback itself
    assert outcome.read_text().startswith("rolled-back ")
    assert host.readlink("/run/current-system") == a
    assert host.readlink("/nix/var/nix/profiles/system") == link  # test: profile untouched
    assert f"running {a}" in record(host)
    # Collected later (a deployer that came back): the outcome, then the directory is gone.
    read = with_host(
        fleet.ssh_config,
        "host1",
        lambda h: confirm.decide(h, armed.directory, "", wait=1, timeout=10),
    )
    assert read.kind == "rolled-back" and read.decision == "rollback"
    assert run_dirs(host) == []


@needs_root
def test_first_activation_cannot_arm_a_rollback(fleet, systems):
    host = fleet["host1"]
    a = systems["a"]
    push(fleet, "host1", a)
    host.path("/run/current-system").unlink()

    async def work(h: SshHost):
        return await activate(h, a, "switch", set_profile=True, timeout=60, confirm_window=5)

    result = with_host(fleet.ssh_config, "host1", work)
    assert result.ok and not result.armed
    assert result.rollback_note == "no previous system"
    assert "no rollback possible" in result.log_tail
    assert run_dirs(host) == [] and host.readlink("/run/current-system") == a
    assert record(host) == f"running {a}\nboot {a}\n"


def test_the_runner_stops_an_activation_that_outlives_its_limit(tmp_path):
    # Without a deployer nothing else would stop it (and it would hold the host's lock).
    toplevel = fake_toplevel(tmp_path, "echo started\nsleep 600\n")
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "log").write_text("")
    runner = directory / "run.sh"
    runner.write_text(activation.RUNNER_SCRIPT)
    argv = ["/bin/sh", str(runner), str(directory), toplevel, "test", "0", "0", "1"]
    argv += [str(tmp_path / "activated"), "run-1"]
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    took = time.monotonic() - began
    assert 1 <= took < 4, took
    assert done.returncode == 143  # TERM
    assert (directory / "status").read_text().strip() == "143"
    log = (directory / "log").read_text()
    assert "started" in log and "still running after 1 s: stopping it" in log
    assert (
        not (tmp_path / "activated").exists()
        or "running" not in (tmp_path / "activated").read_text()
    )
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if "sleep 600" in " ".join(p.info["cmdline"] or [])
        and toplevel in " ".join(p.info["cmdline"] or [])
    ]


@needs_root
def test_report_timings(fleet):
    """Not a check: what the fleet tests measured (visible with -s or in -rA)."""
    for what, seconds in TIMINGS.items():
        print(f"{what}: {seconds:.2f} s")


# -- the fake host: systemd-run command line, stream resumption ---------------------------


FAKE_SYSTEMD_RUN = """\
#!/bin/sh
# Records its argv, then starts the command the way a transient unit would run it.
printf '%s\\n' "$@" > "$RECORDS/systemd-run.argv"
while [ $# -gt 0 ]; do
  case $1 in
    --setenv=*) export "${1#--setenv=}" ;;
    -*) ;;
    *) break ;;
  esac
  shift
done
setsid -f "$@" </dev/null >/dev/null 2>&1
"""

FAKE_RECORDER = """\
#!/bin/sh
echo "$*" >> "$RECORDS/$(basename "$0").log"
"""


def fake_bin(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A bin directory with systemd-run, systemctl and nix-env stand-ins; their env."""
    bin_dir = tmp_path / "bin"
    records = tmp_path / "records"
    bin_dir.mkdir()
    records.mkdir()
    for name, text in (
        ("systemd-run", FAKE_SYSTEMD_RUN),
        ("systemctl", FAKE_RECORDER),
        ("nix-env", FAKE_RECORDER),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return records, {"PATH": f"{bin_dir}:{DEFAULT_ENV['PATH']}", "RECORDS": str(records)}


def fake_toplevel(tmp_path: Path, body: str) -> str:
    toplevel = tmp_path / "system"
    (toplevel / "bin").mkdir(parents=True)
    script = toplevel / "bin" / "switch-to-configuration"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(toplevel)


def run_fake(tmp_path: Path, env: dict[str, str], work):
    async def main():
        async with FakeHost.start(tmp_path / "fake", env=env) as fake:
            host = ssh_host(fake.ssh_config, "fake")
            try:
                return fake, await work(host, fake)
            finally:
                await host.close()

    return asyncio.run(main())


def test_systemd_run_command_line(tmp_path, monkeypatch):
    run_id = uuid.UUID(int=0xABC).hex
    monkeypatch.setattr(activation, "_new_run_id", lambda: run_id)
    records, env = fake_bin(tmp_path)
    env["LOCALE_ARCHIVE"] = "/run/current-system/sw/lib/locale/locale-archive"
    toplevel = fake_toplevel(tmp_path, 'echo "activating $1"\n')
    state = tmp_path / "state"
    lines: list[str] = []

    async def work(host, fake):
        return await activate(
            host,
            toplevel,
            "switch",
            set_profile=True,
            timeout=30,
            on_line=lines.append,
            method="systemd-run",
            state_dir=str(state),
            record=str(tmp_path / "activated"),
        )

    fake, result = run_fake(tmp_path, env, work)
    assert result.ok, result
    assert result.method == "systemd-run"
    directory = f"{state}/activation-{run_id}"
    expected = [
        "systemd-run",
        f"--unit=waggle-activate-{run_id}",
        f"--description=Waggle activation: switch {toplevel}",
        "--collect",
        "--no-block",
        "--quiet",
        "--no-ask-password",
        "--service-type=exec",
        "--property=TimeoutStartSec=infinity",
        "--property=KillMode=mixed",
        "--property=SendSIGHUP=no",
        f"--setenv=PATH={env['PATH']}",
        f"--setenv=LOCALE_ARCHIVE={env['LOCALE_ARCHIVE']}",
        "/bin/sh",
        f"{directory}/run.sh",
        directory,
        toplevel,
        "switch",
        "1",
        "0",  # no confirmation window: no rollback
        "45",  # the activation stops on the host after timeout + GRACE s without Waggle
        str(tmp_path / "activated"),
        run_id,  # the host lock's run id (its own when none is given)
    ]
    # One command prepared and started it (the launch), the runner's argv quoted argument by
    # argument, never spliced into the script; exactly this command line reached systemd-run.
    sent = [shlex.split(c) for c in fake.commands]
    launches = [argv for argv in sent if argv[2:3] == [activation.LAUNCH_SCRIPT]]
    assert [argv[:2] for argv in launches] == [["sh", "-c"]], fake.commands
    description = f"Waggle activation: switch {toplevel}"
    assert launches[0][3:] == [
        "sh",
        directory,
        "systemd-run",
        f"waggle-activate-{run_id}",
        description,
        *expected[13:],
    ]
    assert command_line(launches[0]) in fake.commands
    assert (records / "systemd-run.argv").read_text().splitlines() == expected[1:]
    assert (records / "nix-env.log").read_text() == (
        f"--profile /nix/var/nix/profiles/system --set {toplevel}\n"
    )
    assert lines == ["activating switch"]
    assert not Path(directory).exists()
    assert (tmp_path / "activated").read_text() == f"running {toplevel}\nboot {toplevel}\n"


def test_systemd_run_timeout_kills_the_unit(tmp_path, monkeypatch):
    run_id = uuid.UUID(int=0xDEF).hex
    monkeypatch.setattr(activation, "_new_run_id", lambda: run_id)
    records, env = fake_bin(tmp_path)
    toplevel = fake_toplevel(tmp_path, "echo hanging\nsleep 600\n")
    state = tmp_path / "state"
    directory = Path(f"{state}/activation-{run_id}")
    seen_pid: list[int] = []

    def on_line(line: str) -> None:
        seen_pid.append(int((directory / "pid").read_text()))

    async def work(host, fake):
        return await activate(
            host,
            toplevel,
            "test",
            set_profile=False,
            timeout=2,
            on_line=on_line,
            method="systemd-run",
            state_dir=str(state),
            record=str(tmp_path / "activated"),
        )

    began = time.monotonic()
    _, result = run_fake(tmp_path, env, work)
    assert time.monotonic() - began < 6
    assert result.timed_out and not result.ok
    assert result.message == "activation timed out after 2 s"
    assert result.log_tail == "hanging"
    unit = f"waggle-activate-{run_id}.service"
    # TERM, then KILL. (The fake host sometimes loses the first stop command right after the
    # timed-out follow command on the same connection; the stop is then sent again, so a
    # second TERM may come first: harmless.)
    sent = (records / "systemctl.log").read_text().splitlines()
    assert sent[0] == f"kill --signal=TERM {unit}" and sent[-1] == f"kill --signal=KILL {unit}"
    assert set(sent) == {f"kill --signal={s} {unit}" for s in ("TERM", "KILL")}, sent
    assert not (records / "nix-env.log").exists()  # test: no profile
    pid = seen_pid[0]

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert wait_for(gone, 5)
    assert not directory.exists()


def test_stream_resumes_after_a_dropped_connection_without_loss_or_duplicates(tmp_path):
    toplevel = fake_toplevel(
        tmp_path, 'for i in $(seq 1 40); do echo "line-$i"; sleep 0.02; done\nexit 4\n'
    )
    lines: list[str] = []
    holder: list[FakeHost] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "line-10":
            holder[0].drop_connections()

    async def work(host, fake):
        holder.append(fake)
        return await activate(
            host,
            toplevel,
            "test",
            set_profile=False,
            timeout=30,
            on_line=on_line,
            state_dir=str(tmp_path / "state"),
            record=str(tmp_path / "activated"),
        )

    fake, result = run_fake(tmp_path, {}, work)
    assert result.method == "detached"  # no /run/systemd/system here
    assert lines == [f"line-{i}" for i in range(1, 41)]
    assert result.reconnects >= 1 and fake.connection_count >= 2
    assert not result.ok and result.exit_status == 4
    assert result.message == "Activation failed: exit status 4"
    assert result.log_tail.splitlines() == lines[-20:]


def test_unreachable_host_after_a_drop_gives_up_after_reconnect_timeout(tmp_path):
    toplevel = fake_toplevel(tmp_path, "echo started\nsleep 2\necho done\n")

    async def work(host, fake):
        def on_line(line: str) -> None:
            if line == "started":
                fake.fail_auth = True  # reconnecting fails from now on
                fake.drop_connections()

        began = time.monotonic()
        result = await activate(
            host,
            toplevel,
            "test",
            set_profile=False,
            timeout=30,
            on_line=on_line,
            reconnect_timeout=1.5,
            state_dir=str(tmp_path / "state"),
            record=str(tmp_path / "activated"),
        )
        return result, time.monotonic() - began

    _, (result, took) = run_fake(tmp_path, {}, work)
    assert not result.ok and not result.timed_out
    assert "could not reconnect within 1.5 s" in result.message
    assert "it may still be running on the host" in result.message
    assert took < 5
    # It did carry on, unattended: its status lands in the run directory Waggle left.
    assert wait_for(lambda: list((tmp_path / "state").glob("activation-*/status")), 5)


def test_a_launch_sent_again_starts_no_second_runner(tmp_path):
    # Prepare and start are one command; when its answer is lost with the connection it is
    # sent again, and the run directory, made once, says it was started already.
    toplevel = fake_toplevel(tmp_path, 'echo "run $$" >> "$RUNS"\n')
    directory = str(tmp_path / "state" / "activation-1")
    argv = activation.launch_argv(
        "auto", directory, toplevel, "test", set_profile=False, run_id="1", record=""
    )

    async def work(host, fake):
        first = await host.run(argv, input_data=activation.RUNNER_SCRIPT.encode())
        again = await host.run(argv, input_data=activation.RUNNER_SCRIPT.encode())
        return first, again

    runs = tmp_path / "runs"
    _, (first, again) = run_fake(tmp_path, {"RUNS": str(runs)}, work)
    assert first.ok and first.stdout == "method=detached\n", first
    assert again.ok and again.stdout == "method=detached\nalready\n", again
    assert wait_for(lambda: Path(directory, "status").exists(), 10)
    assert len(runs.read_text().splitlines()) == 1


def test_bad_arguments_are_refused():
    async def main():
        with pytest.raises(ValueError, match="not an activation goal"):
            await activate(None, "/nix/store/x", "build", set_profile=False, timeout=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="not a store path"):
            await activate(None, "x", "switch", set_profile=True, timeout=1)  # type: ignore[arg-type]

    asyncio.run(main())


def test_the_decide_script_as_sent_is_shellcheck_clean():
    from tests.test_shell_scripts import shellcheck

    done = shellcheck("-", text=confirm.DECIDE_SCRIPT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["launch", "query", "import"])
def test_the_merged_scripts_as_sent_are_shellcheck_clean(name):
    from runner.deploy import hoststate, push
    from tests.test_shell_scripts import shellcheck

    text = {
        "launch": activation.LAUNCH_SCRIPT,
        "query": hoststate.QUERY_SCRIPT,
        "import": push.IMPORT_SCRIPT,
    }[name]
    done = shellcheck("-", text=text)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_deciders_answer_is_read_strictly():
    from runner.hosts import RemoteResult

    def answer(stdout: str, code: int | None = 0) -> confirm.Outcome:
        return confirm.parse(RemoteResult(("sh",), code, stdout, "", 0.1))

    back = answer("decision:rollback\noutcome:rolled-back 123 /nix/store/x-old\nlog:\nline\n")
    assert back.rolled_back and back.final and back.previous == "/nix/store/x-old"
    assert back.host_seconds == 1.23 and back.log == "line\n"
    assert back.describe() == "rolled back to /nix/store/x-old in 1.2 s"
    failed = answer("decision:rollback\noutcome:rollback-failed resetting it failed\nlog:\n")
    assert failed.final and not failed.rolled_back
    assert failed.describe() == "rollback failed: resetting it failed"
    assert answer("decision:confirm\noutcome:confirmed\nlog:\n").kind == "confirmed"
    none = answer("decision:\noutcome:none\nlog:\n")
    assert not none.final and "ended without an outcome" in none.describe()
    assert answer("outcome:gone\n").kind == "gone"
    assert answer("garbage").kind == "unreadable"
    assert answer("", code=1).kind == "unreadable"
