"""Two `waggle apply` runs at once against the same hosts (real sshd hosts, real nix).

Each run deploys its own system (a hive of its own); the stand-in's activation hangs a few
seconds (`standin.activation.hangSeconds`) and an activation snippet appends `end
<release>` to the host's /run/standin/activations.log after switch-to-configuration's own
`switch <toplevel> <time>` line, so the log shows whether two activations overlapped.

- the second run waits for the first and succeeds: on every host, whole runs one after the
  other;
- with a small --lock-timeout the second run fails those nodes with "host locked by run
  <the first run's id> from <deployer> since <time>";
- a run killed (SIGKILL) mid-activation leaves the host locked by its detached activation
  until that ends; then the lock is free by itself and the next run goes ahead;
- a run killed while its hosts wait for the confirmation (magic rollback) leaves them
  locked until they have rolled back: the rollback never undoes the next run's switch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, needs_fleet, write_hive
from tests.fleet import Fleet, TestHost, free_first_octet

pytestmark = needs_fleet()

NAMES = ("dlock1", "dlock2")

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, ... }: {
    networking.hostName = name;
    environment.etc.release.text = "@RELEASE@";
    standin.activation.hangSeconds = @HANG@;
    system.activationScripts.lockTestEnd = "echo end @RELEASE@ >> /run/standin/activations.log";
  };
@NODES@
}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    first = free_first_octet(len(NAMES), 215)
    with Fleet.start(d, len(NAMES), names=list(NAMES), first_octet=first, etc="overlay") as f:
        yield f


class Run:
    """One hive of its own (its own release, so its own system) and its `waggle apply`."""

    def __init__(self, directory: Path, fleet: Fleet, hang: int, node: str = "{ }") -> None:
        directory.mkdir()
        self.dir, self.fleet = directory, fleet
        self.release = uuid.uuid4().hex
        nodes = "\n".join(f"  {n} = {{ ... }}: {node};" for n in NAMES)
        text = HIVE.replace("@RELEASE@", self.release).replace("@HANG@", str(hang))
        write_hive(directory, text.replace("@NODES@", nodes))
        self.report = directory / "report.json"
        self.proc: subprocess.Popen[str] | None = None
        built = subprocess.run(
            [sys.executable, "-m", "runner", "build"],
            cwd=directory,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert built.returncode == 0, built.stderr  # built now: the apply goes straight on

    def start(self, *args: str, rollback: bool = False) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runner",
                "apply",
                "switch",
                "--plain",
                *(() if rollback else ("--no-rollback",)),
                "--ssh-config",
                str(self.fleet.ssh_config),
                "--report-json",
                str(self.report),
                *args,
            ],
            cwd=self.dir,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode, out + err

    def nodes(self) -> dict[str, Any]:
        return {n["name"]: n for n in json.loads(self.report.read_text())["nodes"]}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def runs(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[..., Run]]:
    made: list[Run] = []

    def make(hang: int, node: str = "{ }") -> Run:
        made.append(Run(tmp_path / f"run{len(made) + 1}", fleet, hang, node))
        return made[-1]

    yield make
    for run in made:
        run.stop()


def log_of(host: TestHost) -> list[str]:
    path = host.path("/run/standin/activations.log")
    return path.read_text().splitlines() if path.exists() else []


def wait_for(check: Callable[[], bool], timeout: float, what: str, run: Run | None = None) -> None:
    end = time.monotonic() + timeout
    while not check():
        if run is not None and run.proc is not None and run.proc.poll() is not None:
            raise AssertionError(f"waggle ended before {what}: {run.wait()}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def activation_started(fleet: Fleet, before: dict[str, int]) -> Callable[[], bool]:
    return lambda: all(len(log_of(fleet[n])) > before[n] for n in NAMES)


def lock_lines(host: TestHost) -> list[list[str]]:
    path = host.path("/run/waggle/lock")
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def assert_whole_runs_in_turn(fleet: Fleet, before: dict[str, int], *runs: Run) -> None:
    """Each host's log since `before`: the runs' activations whole, one after the other."""
    for name in NAMES:
        new = log_of(fleet[name])[before[name] :]
        shape = [(line.split()[0], line.split()[1]) for line in new]
        assert [s[0] for s in shape] == ["switch", "end"] * len(runs), (name, new)
        assert [s[1] for s in shape[1::2]] == [r.release for r in runs], (name, new)
        tops = [s[1] for s in shape[0::2]]
        assert len(set(tops)) == len(runs), (name, new)


def test_a_second_run_waits_for_the_first_and_they_never_interleave(fleet, runs):
    first, second = runs(4), runs(1)
    before = {n: len(log_of(fleet[n])) for n in NAMES}
    first.start()
    wait_for(activation_started(fleet, before), 60, "the first run's activations", first)
    second.start("--lock-timeout", "60")
    code1, out1 = first.wait()
    code2, out2 = second.wait()
    assert code1 == 0, out1
    assert code2 == 0, out2
    assert "Traceback" not in out1 + out2
    assert_whole_runs_in_turn(fleet, before, first, second)
    assert "waiting for the host lock: held by run" in out2, out2
    assert all(n["status"] == "ok" for n in second.nodes().values())
    for name in NAMES:
        assert lock_lines(fleet[name]) == []  # both runs gave their locks back


def test_with_a_small_lock_timeout_the_second_run_fails_naming_the_first(fleet, runs):
    first, second = runs(5), runs(0)
    before = {n: len(log_of(fleet[n])) for n in NAMES}
    first.start()
    wait_for(activation_started(fleet, before), 60, "the first run's activations", first)
    holders = lock_lines(fleet[NAMES[0]])
    assert holders, "the first run holds no lock while it activates"
    run_id = holders[0][2]
    began = time.monotonic()
    second.start("--lock-timeout", "1")
    code2, out2 = second.wait()
    took = time.monotonic() - began
    code1, out1 = first.wait()
    assert code1 == 0, out1
    assert code2 == 1, out2
    assert "Traceback" not in out2
    # The id the lock names is the one in the first run's report.
    assert json.loads(first.report.read_text())["run"]["id"] == run_id
    since = holders[0][6]
    for name, node in second.nodes().items():
        assert node["status"] == "failed", node
        failed = [s for s in node["stages"] if s["status"] == "failed"]
        assert len(failed) == 1 and failed[0]["stage"] == "push", node
        expected = f"host locked by run {run_id} from {socket.gethostname()} since {since}"
        assert failed[0]["message"].startswith(expected), (name, failed[0])
    assert took < 30, took
    assert_whole_runs_in_turn(fleet, before, first)  # the second never touched the hosts


def test_a_killed_run_leaves_the_host_locked_until_its_activation_ends(fleet, runs):
    first, second = runs(6), runs(0)
    before = {n: len(log_of(fleet[n])) for n in NAMES}
    first.start()
    wait_for(activation_started(fleet, before), 60, "the first run's activations", first)
    assert first.proc is not None
    first.proc.kill()  # SIGKILL: no clean-up at all; the detached activations go on
    first.wait()
    for name in NAMES:
        roles = {(line[2], line[3]) for line in lock_lines(fleet[name])}
        assert any(role == "activation" for _, role in roles), (name, roles)
    second.start("--lock-timeout", "60")
    code2, out2 = second.wait()
    assert code2 == 0, out2
    assert "waiting for the host lock: held by run" in out2, out2
    # The second run's activation came only after the killed run's had ended, by itself.
    assert_whole_runs_in_turn(fleet, before, first, second)
    for name in NAMES:
        assert lock_lines(fleet[name]) == []


def test_a_pending_rollback_never_undoes_the_next_runs_switch(fleet, runs):
    base = runs(0)
    base.start()
    assert base.wait()[0] == 0  # a previous system to roll back to
    # The first run is killed during its health check, before it could confirm: its hosts
    # wait out their window (confirm timeout + check timeout + 2 s), then roll back.
    slow = '[ { cmd = [ "sleep" "30" ]; description = "slow"; timeout = 2; } ]'
    first = runs(0, f"{{ deployment.healthChecks.cmd = {slow}; }}")
    second = runs(0)
    before = {n: len(log_of(fleet[n])) for n in NAMES}
    first.start("--confirm-timeout", "6", rollback=True)
    ended = lambda: all(f"end {first.release}" in log_of(fleet[n]) for n in NAMES)
    wait_for(ended, 60, "the first run's activations", first)
    assert first.proc is not None
    first.proc.kill()
    first.wait()
    second.start("--lock-timeout", "60")
    code2, out2 = second.wait()
    assert code2 == 0, out2
    assert "waiting for the host lock: held by run" in out2, out2
    for name in NAMES:
        host = fleet[name]
        new = [line.split()[:2] for line in log_of(host)[before[name] :]]
        assert [w[1] for w in new[1::2]] == [first.release, base.release, second.release], new
        assert new[4][1] == host.readlink("/run/current-system")  # the second run's system
        assert lock_lines(host) == []
