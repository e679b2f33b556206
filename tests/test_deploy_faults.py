"""A failure stays its node's; a stopped run cleans up and reports (real sshd hosts, real nix).

- a host that drops out between two stages fails that node only (the others deploy);
- a bug (any exception) inside one node's pipeline is that node's "internal error", in a
  stage or between two (the closure's query, reading the host's current system);
- an ssh option asyncssh cannot parse fails its node, with a one-line message;
- a finished node's connection (and its temp ssh config) is closed right away;
- SIGTERM (a cancelled CI job) stops the run like Ctrl-C: local children killed, reports
  written with the unfinished nodes marked, exit 143; host activations finish by themselves.
  Sent while a node evaluates (its evaluator is killed, temp ssh configs go), builds (the
  builder is killed) or pushes into a stalled import (the exporter is killed before the
  reports are written; the host registers no half-imported path), or mid-activation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import psutil
import pytest

from runner.build import BuildSettings
from runner.deploy import pipeline
from runner.deploy.pipeline import DeploySettings, deploy
from runner.evaluate import EvalSettings
from runner.events import Event, EventKind
from runner.goals import Goal
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.hive.model import NodeConfig
from runner.hosts import LineCallback, RemoteResult
from runner.hosts.ssh import SshHost, SshSettings, ssh_host_for
from runner.nix import NixFlags
from runner.results import NodeResult, Stage
from tests.conftest import ROOT, needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import is_import, stopped_imports

pytestmark = needs_fleet()

NAMES = ("host1", "host2", "host3")

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
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    with Fleet.start(d, len(NAMES), names=list(NAMES), first_octet=free_first_octet(3, 100)) as f:
        yield f


def hive_at(directory: Path, **modules: str) -> Hive:
    """A hive of host1..host3 with a fresh release (so every host activates), plus modules."""
    nodes = "\n".join(f"  {n} = {{ ... }}: {modules.get(n, '{ }')};" for n in NAMES)
    text = HIVE.replace("@RELEASE@", uuid.uuid4().hex).replace("@NODES@", nodes)
    path = write_hive(directory, text)
    return Hive(locate(str(path), directory), NixFlags())


def run_deploy(
    hive: Hive,
    fleet: Fleet,
    *,
    on_event=None,
    host_factory=None,
    goal: Goal = Goal.SWITCH,
) -> dict[str, NodeResult]:
    ssh = SshSettings(config_files=(str(fleet.ssh_config),))

    async def main():
        names = await hive.node_names()
        configs = await hive.deployment(names)
        run = await deploy(
            hive,
            configs,
            names,
            EvalSettings(),
            BuildSettings(),
            DeploySettings(goal=goal, ssh=ssh, activation_timeout=60),
            host_factory=host_factory or (lambda c: ssh_host_for(c, ssh)),
            events=on_event,
        )
        return {r.name: r for r in run.nodes}

    return asyncio.run(main())


def test_host_dropping_out_between_stages_fails_only_that_node(fleet, tmp_path):
    # Right after its push, host2 stops running commands (sshd restarted with a
    # ForceCommand that fails): starting its activation, the stage after the push, fails.
    # (Its current system came with the host lock's answer before the push.) That was an
    # exception escaping the pipeline, cancelling host1 and host3 mid-deploy and writing no
    # reports.
    config = fleet["host2"].root / "sshd_config"
    saved = config.read_text()

    def on_event(event: Event) -> None:
        if (
            event.node == "host2"
            and event.kind is EventKind.STAGE_END
            and event.stage is Stage.PUSH
        ):
            fleet.configure_sshd("host2", "ForceCommand /bin/false")

    try:
        results = run_deploy(hive_at(tmp_path), fleet, on_event=on_event)
    finally:
        config.write_text(saved)
        fleet.start_host("host2")
    assert results["host1"].ok, results["host1"].failure
    assert results["host3"].ok, results["host3"].failure
    failure = results["host2"].failure
    assert failure is not None
    assert failure.stage is Stage.ACTIVATE
    assert "could not start it" in failure.message, failure.message


class BuggyHost:
    """A real host whose `run` raises a plain exception for one command (a bug's stand-in)."""

    def __init__(self, inner: SshHost) -> None:
        self.inner = inner
        self.name = inner.name

    async def run(
        self,
        argv: Sequence[str],
        *,
        input_data: bytes | None = None,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult:
        if any("systemd-run" in a for a in argv):  # the activation's launch
            raise RuntimeError("boom\nsecond line")
        return await self.inner.run(
            argv, input_data=input_data, timeout=timeout, privileged=privileged, on_line=on_line
        )

    async def run_fed(self, argv, chunks, *, timeout=None, privileged=True) -> RemoteResult:
        return await self.inner.run_fed(argv, chunks, timeout=timeout, privileged=privileged)

    async def write_file(self, path, data, *, mode, timeout=None) -> None:
        await self.inner.write_file(path, data, mode=mode, timeout=timeout)

    async def close(self) -> None:
        await self.inner.close()


def test_an_exception_inside_one_pipeline_is_that_nodes_internal_error(fleet, tmp_path):
    ssh = SshSettings(config_files=(str(fleet.ssh_config),))

    def factory(c: NodeConfig):
        host = ssh_host_for(c, ssh)
        return BuggyHost(host) if c.name == "host2" else host

    results = run_deploy(hive_at(tmp_path), fleet, host_factory=factory)
    assert results["host1"].ok and results["host3"].ok
    failure = results["host2"].failure
    assert failure is not None and failure.stage is Stage.ACTIVATE
    assert failure.message == "internal error: RuntimeError: boom second line"
    assert "Traceback" in failure.detail and "BuggyHost" not in failure.message


def raising_for(node: str, original: Any, key: Any) -> Any:
    """`original`, except that it raises a two-line exception when `key(args)` is `node`."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if key(args) == node:
            raise RuntimeError("vanished\nfrom under us")
        return await original(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("where", ["before the push", "before the activation"])
def test_an_exception_between_stages_fails_only_that_node(fleet, tmp_path, monkeypatch, where):
    # Work that is no stage of its own raises for host2: the query of the closure to push
    # (before the host lock and the push), or reading the host's current system (between
    # the push and the activation). host2 fails in the stage it was about to run, alone.
    hive = hive_at(tmp_path)
    method, failed_at = {
        "before the push": ("make_query", Stage.PUSH),
        "before the activation": ("current_system", Stage.ACTIVATE),
    }[where]
    original = getattr(pipeline._Pipeline, method)
    monkeypatch.setattr(
        pipeline._Pipeline, method, raising_for("host2", original, lambda a: a[0].config.name)
    )
    results = run_deploy(hive, fleet)
    assert results["host1"].ok, results["host1"].failure
    assert results["host3"].ok, results["host3"].failure
    failure = results["host2"].failure
    assert failure is not None and failure.stage is failed_at, failure
    assert failure.message == "internal error: RuntimeError: vanished from under us"
    assert "Traceback" in failure.detail
    host_stages = [s for s in results["host2"].stages if s.stage not in (Stage.EVAL, Stage.BUILD)]
    assert [s.stage for s in host_stages][-1] is failed_at  # nothing ran after it


def waggle_proc(hive_dir: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=hive_dir,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_unparsable_ssh_option_fails_its_node_only(fleet, tmp_path):
    hive_at(tmp_path, host3='{ deployment.sshOptions = [ "-o" "Port=notaport" ]; }')
    done = subprocess.run(
        [sys.executable, "-m", "runner", "apply", "switch", "--ssh-config", str(fleet.ssh_config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    rows = dict(line.split("\t", 1) for line in done.stdout.splitlines() if "\t" in line)
    assert rows["host1"].startswith("ok") and rows["host2"].startswith("ok"), done.stdout
    assert rows["host3"].startswith("failed"), done.stdout
    assert "Port" in rows["host3"] and "\n" not in rows["host3"]


def established_to(address: str) -> list[Any]:
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.ip == address and c.status == psutil.CONN_ESTABLISHED
    ]


def test_a_finished_nodes_connection_is_closed_at_once(fleet, tmp_path):
    # host2 activates slowly; host1 is done long before. With sshOptions, host1 also has a
    # temp ssh config file, which must go with its connection.
    hive = hive_at(
        tmp_path,
        host1='{ deployment.sshOptions = [ "-o" "ServerAliveCountMax=5" ]; }',
        host2="{ standin.activation.hangSeconds = 4; }",
    )
    ssh = SshSettings(config_files=(str(fleet.ssh_config),))
    hosts: dict[str, SshHost] = {}
    snippet: list[str] = []
    seen: dict[str, object] = {}

    def factory(c: NodeConfig) -> SshHost:
        hosts[c.name] = ssh_host_for(c, ssh)
        return hosts[c.name]

    def on_event(event: Event) -> None:
        if event.node != "host1":
            return
        if event.kind is EventKind.STAGE_END and event.stage is Stage.PUSH:
            snippet.append(hosts["host1"]._snippet or "")
            seen["during"] = len(established_to(fleet["host1"].address))
        if event.kind is EventKind.NODE_END:
            seen["after"] = len(established_to(fleet["host1"].address))
            seen["snippet_left"] = bool(snippet and snippet[0] and os.path.exists(snippet[0]))
            seen["host2_done"] = "host2" in seen

        if event.node == "host2" and event.kind is EventKind.NODE_END:
            seen["host2"] = True

    results = run_deploy(hive, fleet, host_factory=factory, on_event=on_event)
    assert all(r.ok for r in results.values()), [r.failure for r in results.values()]
    assert seen["during"] == 1  # the check sees the connection while it is in use
    assert snippet and snippet[0]
    assert seen["after"] == 0, "host1's connection stayed open after host1 was done"
    assert seen["snippet_left"] is False
    assert seen["host2_done"] is False  # host1 finished while host2 still activated


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> float:
    start = time.monotonic()
    while not check():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"waggle ended ({proc.returncode}) before {what}: {out}{err}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def with_marker(marker: str, *words: str) -> list[int]:
    """PIDs of live processes whose environment holds WAGGLE_TEST_MARKER=marker (and whose
    argv has each of `words` in it)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("WAGGLE_TEST_MARKER") != marker:
                continue
            argv = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if all(w in argv for w in words):
            found.append(p.pid)
    return found


def argv_of(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()[:4]
    except psutil.Error:
        return []


def kill_marked(marker: str) -> None:
    """Clean-up after a failed test: what a run left behind must not outlive the test."""
    for pid in with_marker(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def sigterm(proc: subprocess.Popen[str]) -> tuple[str, float]:
    """Send SIGTERM to a run and wait for it to exit (at most 20 s): its stderr, and how many
    seconds it took."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=20)
    return err, time.monotonic() - sent


@contextlib.contextmanager
def cleaned_up(proc: subprocess.Popen[str], marker: str | None = None) -> Iterator[list[int]]:
    """At the end, whatever happened: `proc` killed if it still runs, and the processes
    with `marker` it left behind listed (in the list yielded) and killed."""
    left: list[int] = []
    try:
        yield left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if marker is not None:
            left += with_marker(marker)
            kill_marked(marker)


def new_system_of(log: Path) -> str:
    """The system the stand-in's activation log names last."""
    return log.read_text().splitlines()[-1].split()[1]


def test_sigterm_during_activation_writes_reports_and_exits_143(fleet, tmp_path):
    hive_dir = tmp_path / "hive"
    hive_dir.mkdir()
    # TMPDIR for waggle's temp ssh configs; Nix's builders (build users) must reach it too.
    temp = Path(tempfile.mkdtemp(prefix="waggle-faults-", dir="/tmp"))
    temp.chmod(0o755)
    hive_at(
        hive_dir,
        host2='{ standin.activation.hangSeconds = 6; deployment.sshOptions = [ "-C" ]; }',
        host3='{ deployment.sshOptions = [ "-C" ]; }',
    )
    log = fleet["host2"].path("/run/standin/activations.log")
    before = log.read_text().count("\n") if log.exists() else 0
    log1 = fleet["host1"].path("/run/standin/activations.log")
    before1 = log1.read_text().count("\n") if log1.exists() else 0
    report = tmp_path / "report.json"
    proc = waggle_proc(
        hive_dir,
        "apply",
        "switch",
        "--plain",
        "--ssh-config",
        str(fleet.ssh_config),
        "--report-json",
        str(report),
        "--junit",
        str(tmp_path / "junit.xml"),
        env={"TMPDIR": str(temp)},
    )
    with cleaned_up(proc):
        wait_for(
            lambda: log.exists() and log.read_text().count("\n") > before,
            120,
            "host2's activation to start",
            proc,
        )
        wait_for(
            lambda: log1.exists() and log1.read_text().count("\n") > before1,
            120,
            "host1's activation",
            proc,
        )
        time.sleep(1)  # host1's activation is quick: it is done by now
        err, took = sigterm(proc)
    assert proc.returncode == 143, err
    assert took < 15, took
    assert "Traceback" not in err
    assert "interrupted by SIGTERM" in err
    data = json.loads(report.read_text())
    nodes = {n["name"]: n for n in data["nodes"]}
    host2 = nodes["host2"]
    assert host2["status"] == "failed", host2
    stages = {s["stage"]: s for s in host2["stages"]}
    assert stages["activate"]["status"] == "failed"
    assert stages["activate"]["message"] == "interrupted by SIGTERM"
    # What it was deploying is known though it never finished (it was null before).
    assert host2["out_path"] == new_system_of(log) and host2["drv_path"], host2
    assert nodes["host1"]["status"] == "ok", nodes["host1"]
    assert (tmp_path / "junit.xml").exists()
    assert list(temp.glob("waggle-ssh-*")) == []  # temp ssh config files removed
    shutil.rmtree(temp)
    # The detached activation on host2 was left alone: it finishes by itself.
    new_system = new_system_of(log)
    wait_for(
        lambda: (
            fleet["host2"].path("/run/current-system").is_symlink()
            and fleet["host2"].readlink("/run/current-system") == new_system
        ),
        20,
        "host2's activation to finish on its own",
    )


def test_sigterm_during_a_build_kills_the_builder(fleet, tmp_path):
    marker = uuid.uuid4().hex
    slow = (
        "{ environment.systemPackages = [ (derivation { "
        f'name = "slow"; system = builtins.currentSystem; builder = "/bin/sh"; '
        f'WAGGLE_TEST_MARKER = "{marker}"; '
        'args = [ "-c" "/bin/sleep 120; echo > $out" ]; }) ]; }'
    )
    hive_at(tmp_path, host1=slow)
    report = tmp_path / "report.json"
    proc = waggle_proc(
        tmp_path,
        "apply",
        "switch",
        "--on",
        "host1",
        "--plain",
        "--ssh-config",
        str(fleet.ssh_config),
        "--report-json",
        str(report),
        env={},
    )
    with cleaned_up(proc):
        wait_for(lambda: with_marker(marker), 120, "the slow builder to start", proc)
        err, _took = sigterm(proc)
    assert proc.returncode == 143, err
    wait_for(lambda: not with_marker(marker), 5, "the builder to be gone")
    data = json.loads(report.read_text())
    (host1,) = data["nodes"]
    assert host1["status"] == "failed"
    build = next(s for s in host1["stages"] if s["stage"] == "build")
    assert build["message"] == "interrupted by SIGTERM"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def report_stage(report: Path, node: str, stage: str) -> dict[str, Any]:
    data = json.loads(report.read_text())
    found: dict[str, Any] = next(
        s for n in data["nodes"] if n["name"] == node for s in n["stages"] if s["stage"] == stage
    )
    return found


def junit_failure(path: Path, node: str, stage: str) -> str | None:
    """The failure message of the node's stage in a JUnit report (None: it did not fail)."""
    for case in ElementTree.parse(path).iter("testcase"):
        if case.get("classname") == f"waggle.{stage}" and case.get("name") == node:
            failure = case.find("failure")
            return None if failure is None else failure.get("message")
    raise AssertionError(f"no test case for {node}'s {stage} in {path}")


# A pure computation of about a minute (1e8 additions take 10 s here, in about 450 MiB): the
# node is still being evaluated when the signal comes, and an orphan would go on for long.
SLOW_EVAL = """{
    environment.etc.slow.text = let
      inner = n: builtins.foldl' (a: _: a + 1) 0 (builtins.genList (x: x) n);
    in toString (builtins.foldl' (a: _: a + inner 100000) 0 (builtins.genList (x: x) 6000));
  }"""


def test_sigterm_during_evaluation_kills_the_evaluators_and_writes_reports(fleet, tmp_path):
    # host3 evaluates for a minute; host1 (with sshOptions: a temp ssh config) is evaluated,
    # built, pushed and activating by the time the signal comes; each has an evaluator of
    # its own. (host2 may still be locked by the activation interrupted above, which waits
    # for its confirmation; --no-rollback: host1's own activation ends by itself soon.)
    marker = uuid.uuid4().hex
    hive_dir = tmp_path / "hive"
    hive_dir.mkdir()
    temp = Path(tempfile.mkdtemp(prefix="waggle-faults-", dir="/tmp"))
    temp.chmod(0o755)  # Nix's builders (build users) use TMPDIR too
    hive_at(
        hive_dir,
        host1='{ standin.activation.hangSeconds = 3; deployment.sshOptions = [ "-C" ]; }',
        host3=SLOW_EVAL,
    )
    log = fleet["host1"].path("/run/standin/activations.log")
    before = log.read_text().count("\n") if log.exists() else 0
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    proc = waggle_proc(
        hive_dir,
        *("apply", "switch", "--on", "host1,host3", "--no-rollback", "--plain"),
        *("--eval-jobs", "2", "--ssh-config", str(fleet.ssh_config)),
        *("--report-json", str(report), "--junit", str(junit)),
        env={"TMPDIR": str(temp), "WAGGLE_TEST_MARKER": marker},
    )
    with cleaned_up(proc, marker) as left:
        wait_for(
            lambda: log.exists() and log.read_text().count("\n") > before,
            60,
            "host1's activation to start",
            proc,
        )
        evaluating = with_marker(marker, "nix-instantiate", "evalQueue", "host3")
        assert evaluating, "host3's evaluator is not running"
        assert list(temp.glob("waggle-ssh-*")), "host1's connection has no temp ssh config"
        err, took = sigterm(proc)
    assert proc.returncode == 143, err
    assert took < 10, took
    assert "Traceback" not in err
    assert left == [], [argv_of(p) for p in left]  # host3's evaluator above all
    assert not any(running(p) for p in evaluating)
    assert list(temp.glob("waggle-ssh-*")) == []
    shutil.rmtree(temp)
    evaluation = report_stage(report, "host3", "eval")
    assert evaluation["status"] == "failed", evaluation
    assert evaluation["message"] == "interrupted by SIGTERM"
    assert junit_failure(junit, "host3", "eval") == "interrupted by SIGTERM"
    assert report_stage(report, "host1", "activate")["message"] == "interrupted by SIGTERM"
    # host1's detached activation finishes by itself (and gives the host's lock back).
    new_system = new_system_of(log)
    wait_for(
        lambda: (
            fleet["host1"].path("/run/current-system").is_symlink()
            and fleet["host1"].readlink("/run/current-system") == new_system
        ),
        15,
        "host1's activation to finish on its own",
    )


# Three files of random data, 6 MiB each: far more than the pipe, the SSH window and sshd's
# buffers hold, so the exporter is blocked while the host's import is stopped.
BLOBS = """{
    imports = [ ({ pkgs, ... }: {
      environment.systemPackages = map (i: pkgs.runCommand "blob-${toString i}-@UNIQUE@" { } ''
        head -c 6291456 /dev/urandom > $out
      '') [ 1 2 3 ];
    }) ];
  }"""


@contextlib.contextmanager
def running_when_written(pid: int, path: Path) -> Iterator[list[bool]]:
    """Whether process `pid` still ran when `path` appeared (one bool, once it did).

    A run writes its reports after it stopped its children, just before it exits; an
    exporter it left would still be running then (it dies of the broken pipe only once
    the run has exited). Seen too late (the run had exited), the check proves nothing.
    """
    seen: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if path.exists():
                seen.append(running(pid))
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        time.sleep(0.05)
        done.set()
        watcher.join(5)


def test_sigterm_during_a_stalled_push_kills_the_exporter(fleet, tmp_path):
    marker = uuid.uuid4().hex
    hive_at(tmp_path, host3=BLOBS.replace("@UNIQUE@", marker[:12]))
    report = tmp_path / "report.json"
    with stopped_imports(fleet["host3"]) as stopped:
        proc = waggle_proc(
            tmp_path,
            *("apply", "switch", "--on", "host3", "--plain"),
            *("--ssh-config", str(fleet.ssh_config), "--report-json", str(report)),
            env={"WAGGLE_TEST_MARKER": marker},
        )
        exporting: list[int] = []
        with cleaned_up(proc, marker) as left:

            def exporter_blocked() -> bool:
                exporting[:] = with_marker(marker, "nix-store", "--export")
                return bool(stopped and exporting)

            wait_for(exporter_blocked, 60, "the push into the stopped import", proc)
            sent_paths = psutil.Process(exporting[0]).cmdline()[2:]
            time.sleep(0.5)  # the exporter fills the pipes and the SSH window, then waits
            with running_when_written(exporting[0], report) as exporter_running:
                err, took = sigterm(proc)
        # The host's import goes on now: it reads what was buffered, then the end of the
        # stream the run cut (its connection is gone).
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        wait_for(lambda: not any(is_import(p) for p in stopped), 10, "host3's import to end")
    assert proc.returncode == 143, err
    assert took < 10, took
    assert "Traceback" not in err
    assert left == [], [argv_of(p) for p in left]  # the nix-store --export above all
    # Killed by Waggle, not only by the broken pipe once Waggle was gone.
    assert exporter_running == [False], "the exporter still ran when the report was written"
    push = report_stage(report, "host3", "push")
    assert push["status"] == "failed" and push["message"] == "interrupted by SIGTERM", push
    # What the host holds of the stream is whole: a path registered as valid is intact,
    # the rest is not valid (the toplevel, last in the stream, never came).
    toplevel = sent_paths[-1]  # the export's order: dependencies first
    listed = " ".join(sent_paths)
    invalid = fleet.run("host3", f"nix-store --check-validity --print-invalid {listed}")
    assert invalid.returncode == 0, invalid.stderr
    not_there = set(invalid.stdout.decode().split())
    assert toplevel in not_there
    valid = [p for p in sent_paths if p not in not_there]
    if valid:
        verified = fleet.run("host3", "nix-store --verify-path " + " ".join(valid))
        assert verified.returncode == 0, verified.stderr
