"""Host locks (runner/deploy/lock.py, runner/scripts/lock-lib.sh and lock.sh).

- the shell functions, run here under dash and bash on a lock directory of the test's own:
  join on a free host, refusal while another run's holder lives, joining one's own run,
  dead holders (no such process, another boot, a reused pid) ignored and dropped, no
  flock, bad words; lock.sh's heartbeat; the activation runner joining its run's lock and
  refusing a host another run holds;
- `hold_lock` against real sshd hosts: taking and releasing, stale lines ignored, another
  run's lock waited for and then reported, the lock taken again after a reconnect, a lock
  lost to another run reported, lock.sh letting go when the heartbeat stops.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from runner.deploy.hoststate import HostQuery, HostState, parse
from runner.deploy.lock import (
    LOCK_SCRIPT,
    HostLockedError,
    HostLockLostError,
    RunIdentity,
    hold_lock,
    lock_argv,
)
from runner.hosts import command_line
from runner.hosts.local import LocalHost
from runner.hosts.ssh import SshHost, SshSettings, SshTarget
from runner.scripts import script
from tests.conftest import needs_fleet
from tests.fleet import Fleet, TestHost, free_first_octet

T = TypeVar("T")
SHELLS = [s for s in ("/bin/dash", "/bin/bash") if Path(s).exists()]
LIB = script("lock-lib.sh")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat, as lock-lib.sh reads it."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(") ", 1)[1].split()[19]


def holder_line(
    run_id: str, *, pid: int | None = None, boot: str = BOOT_ID, start: str | None = None
) -> str:
    """A lock line of a live holder (this test process) unless told otherwise."""
    pid = os.getpid() if pid is None else pid
    start = start_time(pid) if start is None else start
    return f"{pid} {boot} {run_id} connection {start} deployer-{run_id} 2024-05-01T12:00:00Z\n"


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def lib(shell: str, lock_dir: Path, snippet: str, run_id: str = "r2", **env: str):
    return subprocess.run(
        ["sh", "-c", LIB + snippet],
        executable=shell,
        env={
            "PATH": os.environ["PATH"],
            "WAGGLE_LOCK_DIR": str(lock_dir),
            "WAGGLE_RUN_ID": run_id,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def lines(lock_dir: Path) -> list[list[str]]:
    path = lock_dir / "lock"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("shell", SHELLS)
def test_join_on_a_free_host_records_the_holder_and_leave_removes_it(shell, tmp_path):
    d = tmp_path / "waggle"
    done = lib(
        shell,
        d,
        'waggle_lock_join activation dep 2024-05-01T12:00:00Z; echo "joined $? $$"\n'
        'cat "$WAGGLE_LOCK_DIR/lock"; waggle_lock_leave; echo "left $?"\n',
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    _, status, pid = out[0].split()
    assert status == "0"
    fields = out[1].split()
    assert fields[0] == pid and fields[1] == BOOT_ID and fields[2:4] == ["r2", "activation"]
    assert fields[4].isdigit() and fields[5:] == ["dep", "2024-05-01T12:00:00Z"]
    assert out[2] == "left 0"
    assert lines(d) == []
    assert oct(d.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("shell", SHELLS)
def test_another_runs_live_holder_refuses_the_join(shell, tmp_path):
    d = tmp_path / "waggle"
    d.mkdir(mode=0o700)
    (d / "lock").write_text(holder_line("r1"))
    done = lib(shell, d, 'waggle_lock_join activation; echo "status $?"\n')
    assert done.stdout.splitlines() == [
        "held r1 deployer-r1 2024-05-01T12:00:00Z",
        "status 1",
    ], done.stderr
    assert [f[2] for f in lines(d)] == ["r1"]


@pytest.mark.parametrize("shell", SHELLS)
def test_joining_ones_own_run_copies_its_description(shell, tmp_path):
    d = tmp_path / "waggle"
    d.mkdir(mode=0o700)
    (d / "lock").write_text(holder_line("r2"))
    done = lib(shell, d, 'waggle_lock_join activation; echo "status $?"\n')
    assert done.stdout.splitlines() == ["status 0"], done.stderr
    (_mine, joined) = lines(d)
    assert joined[2:4] == ["r2", "activation"]
    assert joined[5:] == ["deployer-r2", "2024-05-01T12:00:00Z"]


@pytest.mark.parametrize("shell", SHELLS)
def test_dead_holders_are_ignored_and_dropped(shell, tmp_path):
    d = tmp_path / "waggle"
    d.mkdir(mode=0o700)
    stale = [
        holder_line("dead-process", pid=dead_pid(), start="1"),
        holder_line("other-boot", boot="00000000-0000-0000-0000-000000000000"),
        holder_line("reused-pid", start=str(int(start_time(os.getpid())) + 1)),
        "self " + holder_line("not-a-pid").split(" ", 1)[1],
        "garbage\n",
    ]
    (d / "lock").write_text("".join(stale))
    done = lib(shell, d, 'waggle_lock_join connection; echo "status $?"\n')
    assert done.stdout.splitlines() == ["status 0"], done.stderr
    assert [f[2] for f in lines(d)] == ["r2"]


@pytest.mark.parametrize("shell", SHELLS)
def test_lock_sh_holds_until_eof_or_a_silent_stdin(shell, tmp_path):
    d = tmp_path / "waggle"

    def holder(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["sh", "-c", LOCK_SCRIPT, "sh", *args],
            executable=shell,
            env={"PATH": os.environ["PATH"], "WAGGLE_LOCK_DIR": str(d)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    first = holder("r1", "dep", "2024-05-01T12:00:00Z", "30")
    assert first.stdin is not None and first.stdout is not None
    try:
        assert first.stdout.readline() == "locked\n"
        second = holder("r2", "dep2", "2024-05-01T12:00:01Z", "30")
        out, _ = second.communicate(timeout=10)
        assert (second.returncode, out) == (3, "held r1 dep 2024-05-01T12:00:00Z\n")
        first.stdin.write(".")  # a heartbeat
        first.stdin.flush()
        time.sleep(0.2)
        assert first.poll() is None and [f[2] for f in lines(d)] == ["r1"]
        first.stdin.close()  # EOF: Waggle is done
        assert first.wait(timeout=10) == 0
        assert lines(d) == []
        silent = holder("r3", "dep", "2024-05-01T12:00:02Z", "1")
        assert silent.stdout is not None and silent.stdout.readline() == "locked\n"
        began = time.monotonic()
        assert silent.wait(timeout=10) == 0  # no heartbeat for 1 s: it let go
        assert time.monotonic() - began < 5 and lines(d) == []
        assert silent.stdin is not None
        silent.stdin.close()
        silent.stdout.close()
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stdout.close()


@pytest.mark.parametrize("shell", SHELLS)
def test_lock_sh_answers_the_query_once_locked_and_keeps_the_heartbeat(shell, tmp_path):
    # The query (hoststate.py) rides on the lock's channel: its paths come first on stdin,
    # read exactly, so the heartbeat after them still counts.
    d = tmp_path / "waggle"
    record = tmp_path / "activated"
    record.write_text("running /nix/store/x-sys\nboot /nix/store/x-sys\n")
    real = subprocess.run(
        ["nix-store", "-qR", shutil.which("nix-store") or "nix-store"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()[:1]
    query = HostQuery((*real, "/nix/store/00000000000000000000000000000000-gone"), str(record))
    args = lock_argv(RunIdentity("r1", "dep", 0.0), idle=30, query=query)[4:]
    proc = subprocess.Popen(
        ["sh", "-c", LOCK_SCRIPT, "sh", *args],
        executable=shell,
        env={"PATH": os.environ["PATH"], "WAGGLE_LOCK_DIR": str(d)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(query.payload().decode() + ".")  # the paths, then a heartbeat
        proc.stdin.flush()
        assert proc.stdout.readline() == "locked\n"
        answer: list[str] = []
        while not answer or not answer[-1].startswith("query:"):
            answer.append(proc.stdout.readline())
            assert answer[-1], answer
        state = parse(query, answer)
        assert state is not None and state.missing == query.paths[-1:], answer
        assert state.system.activated == state.system.activated_boot == "/nix/store/x-sys"
        time.sleep(0.2)
        assert proc.poll() is None and [f[2] for f in lines(d)] == ["r1"]
        proc.stdin.close()  # EOF: Waggle is done
        assert proc.wait(timeout=10) == 0
        assert lines(d) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def run_runner(tmp_path: Path, run_id: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The activation runner (run.sh as sent) with a system that only logs that it ran."""
    from runner.deploy.activation import RUNNER_SCRIPT

    toplevel = tmp_path / "system"
    (toplevel / "bin").mkdir(parents=True)
    stc = toplevel / "bin" / "switch-to-configuration"
    stc.write_text(f"#!/bin/sh\necho activated >> {tmp_path / 'ran'}\n")
    stc.chmod(0o755)
    run_dir = tmp_path / "waggle" / "activation-1"
    run_dir.mkdir(parents=True)
    (run_dir / "run.sh").write_text(RUNNER_SCRIPT)
    args = [str(run_dir), str(toplevel), "test", "0", "0", "0", "", run_id]
    done = subprocess.run(
        ["/bin/sh", str(run_dir / "run.sh"), *args],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done, run_dir


def test_the_activation_runner_refuses_a_host_another_run_holds(tmp_path):
    d = tmp_path / "waggle"
    d.mkdir(mode=0o700)
    (d / "lock").write_text(holder_line("r1"))
    done, run_dir = run_runner(tmp_path, "r2")
    assert done.returncode == 75
    assert (run_dir / "status").read_text().strip() == "75"
    log = (run_dir / "log").read_text()
    assert (
        "not activating: host locked by run r1 from deployer-r1 since 2024-05-01T12:00:00Z" in log
    )
    assert not (tmp_path / "ran").exists()
    assert [f[2] for f in lines(d)] == ["r1"]


def test_the_activation_runner_joins_its_runs_lock_and_leaves_it(tmp_path):
    d = tmp_path / "waggle"
    d.mkdir(mode=0o700)
    (d / "lock").write_text(holder_line("r1"))  # the run's connection (this process)
    done, run_dir = run_runner(tmp_path, "r1")
    assert done.returncode == 0, (run_dir / "log").read_text()
    assert (tmp_path / "ran").read_text() == "activated\n"
    assert [f[3] for f in lines(d)] == ["connection"]  # the runner's own line went with it


def test_without_flock_the_lock_fails_clearly(tmp_path):
    # A PATH with everything lock-lib.sh uses but flock.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mkdir", "chmod", "mv", "cat", "sh"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    done = lib("/bin/sh", tmp_path / "w", 'waggle_lock_join connection; echo "status $?"\n')
    assert done.stdout.strip() == "status 0"  # with flock on PATH, it works
    done = lib(
        "/bin/sh",
        tmp_path / "w",
        'waggle_lock_join connection; echo "status $?"\n',
        PATH=str(bin_dir),
    )
    assert done.stdout.strip() == "status 2"
    assert "flock (util-linux) is not installed" in done.stderr


@pytest.mark.parametrize("run_id", ["", "a b", "a\nb", "x;y"])
def test_a_bad_run_id_is_refused(tmp_path, run_id):
    done = lib("/bin/sh", tmp_path / "w", 'waggle_lock_join c; echo "status $?"\n', run_id)
    assert done.stdout.strip() == "status 2"
    assert "bad run id" in done.stderr
    assert lines(tmp_path / "w") == []


def test_the_lock_script_as_sent_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed; scripts/setup.sh installs it")
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", "-"],
        input=LOCK_SCRIPT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout


def test_a_run_identity_refuses_words_that_would_break_the_lock_line():
    with pytest.raises(ValueError, match="bad run id"):
        RunIdentity("a b", "deployer", 0.0)
    assert RunIdentity.new().since.endswith("Z")
    assert " " not in RunIdentity.new().deployer


def test_local_hosts_take_no_lock(tmp_path):
    async def main() -> None:
        async with hold_lock(LocalHost("here"), RunIdentity.new(), timeout=1):
            pass

    asyncio.run(main())  # returns at once, runs nothing (apply-local takes no lock)


# -- against real sshd hosts ---------------------------------------------------------------

NAMES = ("lockhost1",)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    first = free_first_octet(len(NAMES), 210)
    with Fleet.start(d, len(NAMES), names=list(NAMES), first_octet=first, etc="overlay") as f:
        yield f


@pytest.fixture
def host(fleet) -> Iterator[TestHost]:
    h = fleet[NAMES[0]]
    lock = h.path("/run/waggle/lock")
    lock.unlink(missing_ok=True)
    yield h
    lock.unlink(missing_ok=True)


def ssh_host(fleet: Fleet) -> SshHost:
    target = SshTarget(node=NAMES[0], host=NAMES[0])
    return SshHost(target, SshSettings(config_files=(str(fleet.ssh_config),)))


def on_hosts(fleet: Fleet, count: int, work: Callable[..., Awaitable[T]]) -> T:
    async def main() -> T:
        hosts = [ssh_host(fleet) for _ in range(count)]
        try:
            return await asyncio.wait_for(work(*hosts), 60)
        finally:
            for h in hosts:
                await h.close()

    return asyncio.run(main())


def host_lines(host: TestHost) -> list[list[str]]:
    path = host.path("/run/waggle/lock")
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def fleet_test(test: Callable[..., None]) -> Callable[..., None]:
    for mark in needs_fleet():
        test = mark(test)
    return test


@fleet_test
def test_hold_lock_takes_the_host_and_gives_it_back(fleet, host):
    owner = RunIdentity.new()

    async def work(h: SshHost) -> tuple[list[list[str]], bool]:
        async with hold_lock(h, owner, timeout=5):
            held = host_lines(host)
            on_the_host = bool(held) and host.pid_is_mine(int(held[0][0]))
        return held, on_the_host

    held, on_the_host = on_hosts(fleet, 1, work)
    assert len(held) == 1 and on_the_host  # lock.sh, a process of the host, holds it
    pid, boot, run_id, role, start, deployer, since = held[0]
    assert (boot, run_id, role) == (host.boot_id(), owner.run_id, "connection")
    assert (deployer, since) == (owner.deployer, owner.since)
    assert not Path(f"/proc/{pid}").exists() or start_time(int(pid)) != start  # lock.sh left
    assert host_lines(host) == []
    assert oct(host.path("/run/waggle").stat().st_mode & 0o777) == "0o700"


@fleet_test
def test_stale_lines_of_dead_holders_do_not_block(fleet, host):
    host.path("/run/waggle").mkdir(mode=0o700, exist_ok=True)
    host.path("/run/waggle/lock").write_text(
        holder_line("dead-process", pid=dead_pid(), boot=host.boot_id(), start="1")
        # This machine's boot id is another boot for the host (a reboot since).
        + holder_line("before-reboot", boot=BOOT_ID)
        + holder_line("reused-pid", boot=host.boot_id(), start="1")
    )
    owner = RunIdentity.new()

    async def work(h: SshHost) -> float:
        began = time.monotonic()
        async with hold_lock(h, owner, timeout=5):
            took = time.monotonic() - began
            assert [f[2] for f in host_lines(host)] == [owner.run_id]
        return took

    assert on_hosts(fleet, 1, work) < 2


@fleet_test
def test_another_runs_lock_is_waited_for_then_reported(fleet, host):
    first, second = RunIdentity.new(), RunIdentity.new()
    waits: list[str] = []

    async def work(a: SshHost, b: SshHost) -> tuple[float, str]:
        async with hold_lock(a, first, timeout=5):
            began = time.monotonic()
            with pytest.raises(HostLockedError) as failed:
                async with hold_lock(b, second, timeout=1.5, on_wait=waits.append):
                    raise AssertionError("the second run got the lock")
            return time.monotonic() - began, str(failed.value)

    took, message = on_hosts(fleet, 2, work)
    assert 1.5 <= took < 4, took
    assert message.startswith(
        f"host locked by run {first.run_id} from {first.deployer} since {first.since}"
    )
    held_by = f"run {first.run_id} from {first.deployer} since {first.since}"
    assert waits == [f"waiting for the host lock: held by {held_by}"]
    assert host_lines(host) == []


@fleet_test
def test_a_released_lock_lets_the_waiting_run_in(fleet, host):
    first, second = RunIdentity.new(), RunIdentity.new()

    async def work(a: SshHost, b: SshHost) -> float:
        async def hold_a() -> None:
            async with hold_lock(a, first, timeout=5):
                await asyncio.sleep(1.5)

        task = asyncio.create_task(hold_a())
        await until(lambda: bool(host_lines(host)), 10, "the first lock")
        began = time.monotonic()
        async with hold_lock(b, second, timeout=10, poll=0.2):
            took = time.monotonic() - began
            assert [f[2] for f in host_lines(host)] == [second.run_id]
        await task
        return took

    assert 0.5 < on_hosts(fleet, 2, work) < 4


@fleet_test
def test_the_query_is_answered_once_a_waited_for_lock_is_taken(fleet, host):
    # The host lock's channel answers the run's query (hoststate.py); after waiting for
    # another run, the answer comes with the lock that was finally taken.
    first, second = RunIdentity.new(), RunIdentity.new()
    query = HostQuery(("/nix/store/00000000000000000000000000000000-missing",), "/nonexistent")

    async def work(a: SshHost, b: SshHost) -> HostState | None:
        async def hold_a() -> None:
            async with hold_lock(a, first, timeout=5):
                await asyncio.sleep(1.0)

        task = asyncio.create_task(hold_a())
        await until(lambda: bool(host_lines(host)), 10, "the first lock")
        async with hold_lock(b, second, timeout=10, poll=0.2, query=query) as state:
            assert [f[2] for f in host_lines(host)] == [second.run_id]
        await task
        return state

    state = on_hosts(fleet, 2, work)
    assert state is not None and state.missing == query.paths
    assert state.system.activated is None


@fleet_test
def test_the_lock_is_taken_again_after_a_reconnect(fleet, host):
    owner = RunIdentity.new()

    async def work(h: SshHost) -> None:
        async with hold_lock(h, owner, timeout=5, poll=0.2):
            (before,) = host_lines(host)
            await h.reconnect()  # what activation does after a dropped connection
            await until(
                lambda: [f[0] for f in host_lines(host)] not in ([], [before[0]]),
                10,
                "the lock taken again on the new connection",
            )
            (after,) = host_lines(host)
            assert after[2] == owner.run_id and after[0] != before[0]
            done = await h.run(["true"])  # the connection is still the pipeline's to use
            assert done.ok

    on_hosts(fleet, 1, work)
    assert host_lines(host) == []


@fleet_test
def test_a_lock_lost_to_another_run_is_reported_when_the_block_ends(fleet, host):
    first, second = RunIdentity.new(), RunIdentity.new()

    async def work(a: SshHost, b: SshHost) -> str:
        with pytest.raises(HostLockLostError) as lost:
            async with hold_lock(a, first, timeout=5, poll=1.0):
                await a.close()  # the connection goes; the host is free for a moment
                await until(lambda: host_lines(host) == [], 5, "the first lock to go")
                async with hold_lock(b, second, timeout=5):
                    await asyncio.sleep(1.5)  # the first run's retry finds the second
        return str(lost.value)

    message = on_hosts(fleet, 2, work)
    assert message == (
        "lost the host lock while working there: now held by run"
        f" {second.run_id} from {second.deployer} since {second.since}"
    )


@fleet_test
def test_lock_sh_lets_go_when_the_heartbeat_stops(fleet, host):
    # stdin stays open but silent: a deployer whose connection died without closing.
    owner = RunIdentity.new()
    command = command_line(lock_argv(owner, idle=1.5))
    proc = subprocess.Popen(
        fleet.ssh_argv(NAMES[0], command),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        began = time.monotonic()
        assert [f[2] for f in host_lines(host)] == [owner.run_id]
        deadline = began + 10
        while host_lines(host) and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.monotonic() - began
        assert host_lines(host) == []
        assert 1.0 < took < 4, took
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@fleet_test
def test_work_stops_as_soon_as_the_lock_is_lost(fleet, host):
    # A push or key upload must not go on beside the run that took the host: the block is
    # cancelled when the loss is found, not when it would have ended.
    first, second = RunIdentity.new(), RunIdentity.new()

    async def work(a: SshHost, b: SshHost) -> float:
        began = time.monotonic()
        with pytest.raises(HostLockLostError):
            async with hold_lock(a, first, timeout=5, poll=0.5):
                await a.close()
                await until(lambda: host_lines(host) == [], 5, "the first lock to go")
                async with hold_lock(b, second, timeout=5):
                    await asyncio.sleep(60)  # the first run's work, going on
        return time.monotonic() - began

    assert on_hosts(fleet, 2, work) < 15
