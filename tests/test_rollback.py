"""Magic rollback end to end: real nix, real sshd hosts, real activation.

The stand-in's `standin.activation.blockLogins = N` stops a host's sshd listener after the
switch (no new logins for N seconds; established sessions go on): the deployer still holds
its connection, but a fresh handshake cannot be made, so the switch is never confirmed and
the host must go back by itself. Timeouts are small (a confirm timeout of 3 s).
"""

from __future__ import annotations

import glob
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from junitparser import JUnitXml
from typing_extensions import override

from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, TestHost, free_first_octet
from tests.helpers import waggle

pytestmark = needs_fleet()

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("host1", "host2", "host3")
CONFIRM = 3  # --confirm-timeout of these tests, seconds
BLOCK = 40  # blockLogins: much longer than CONFIRM (the rollback ends it early)
HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, ... }: {
    networking.hostName = name;
    environment.etc.release.text = "@RELEASE@";
  };
@NODES@
}
"""
FLAKY = """{
  system.activationScripts.flaky = ''
    if [ ! -e /run/standin/flaky-@RELEASE@ ]; then
      touch /run/standin/flaky-@RELEASE@; echo "flaky: failing once"; false
    fi
  '';
}"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    with Fleet.start(d, len(NAMES), names=list(NAMES), first_octet=free_first_octet(3, 180)) as f:
        yield f


def write(hive_dir: Path, release: str, **modules: str) -> None:
    nodes = "\n".join(f"  {n} = {modules.get(n, '{ }')};" for n in NAMES)
    text = HIVE.replace("@NODES@", nodes).replace("@RELEASE@", release)
    write_hive(hive_dir, text)


def apply(hive_dir: Path, fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    ssh = ("--ssh-config", str(fleet.ssh_config), "--confirm-timeout", str(CONFIRM))
    return waggle("apply", *args, *ssh, cwd=hive_dir, timeout=300)


def rows(done: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    return {
        line.split("\t")[0]: line.split("\t")[1:]
        for line in done.stdout.splitlines()
        if "\t" in line
    }


def built(hive_dir: Path, node: str) -> str:
    done = waggle("build", "--on", node, cwd=hive_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\t")[1].strip()


def running(host: TestHost) -> str | None:
    link = host.path("/run/current-system")
    return os.readlink(link) if link.is_symlink() else None


def generation(host: TestHost) -> str:
    """The system profile's link, e.g. "system-3-link"."""
    return host.readlink("/nix/var/nix/profiles/system")


def booting(host: TestHost) -> str:
    return "/nix/" + str(
        host.resolve("/nix/var/nix/profiles/system").relative_to(host.path("/nix"))
    )


def baseline(hive_dir: Path, fleet: Fleet) -> str:
    """Deploy a fresh release to every host (so each has a previous system); the release."""
    release = uuid.uuid4().hex[:8]
    write(hive_dir, release)
    done = apply(hive_dir, fleet, "switch")
    assert done.returncode == 0, done.stdout + done.stderr
    return release


def wait_for(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def activation_times(host: TestHost, toplevel: str) -> list[int]:
    """When (unix seconds) each activation of `toplevel` on the host began."""
    log = host.path("/run/standin/activations.log").read_text().splitlines()
    return [int(line.split()[2]) for line in log if line.split()[1] == toplevel]


def test_unconfirmed_switch_rolls_back_the_host_and_fails_the_node(fleet, tmp_path):
    baseline(tmp_path, fleet)
    host2 = fleet["host2"]
    previous, previous_link = running(host2), generation(host2)
    release = uuid.uuid4().hex[:8]
    write(tmp_path, release, host2=f"{{ standin.activation.blockLogins = {BLOCK}; }}")
    new = built(tmp_path, "host2")
    reports = tmp_path / "reports"
    began = time.monotonic()
    done = apply(
        tmp_path,
        fleet,
        "switch",
        "--junit",
        str(reports / "run.xml"),
        "--report-md",
        str(reports / "run.md"),
        "--report-json",
        str(reports / "run.json"),
    )
    took = time.monotonic() - began
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    out = rows(done)
    assert out["host1"][0] == "ok" and out["host3"][0] == "ok", done.stdout
    assert out["host2"][0] == "failed", done.stdout
    assert out["host2"][1].startswith(f"confirm: rolled back: not confirmed within {CONFIRM} s")
    # The host went back by itself: the previous system runs, the profile is one step back.
    assert running(host2) == previous
    assert generation(host2) == previous_link
    assert booting(host2) == previous
    assert host2.resolve("/etc/release").read_text() != release
    # ... within the confirm timeout plus a bound (the log has whole seconds).
    assert activation_times(host2, previous)[-1] - activation_times(host2, new)[-1] <= CONFIRM + 3
    assert took < 60, took
    assert host2.accepts()  # the rollback also ended the block on new logins
    # The others were confirmed.
    for name in ("host1", "host3"):
        assert fleet[name].resolve("/etc/release").read_text() == release

    report = json.loads((reports / "run.json").read_text())
    nodes = {n["name"]: n for n in report["nodes"]}
    assert nodes["host2"]["status"] == "failed" and nodes["host2"]["rolled_back"] is True
    assert nodes["host2"]["failed_stage"] == "confirm"
    stages = {s["stage"]: s for s in nodes["host2"]["stages"]}
    assert stages["activate"]["status"] == "ok"
    assert stages["confirm"]["status"] == "failed"
    assert stages["confirm"]["message"].startswith(f"rolled back: not confirmed within {CONFIRM} s")
    assert stages["confirm"]["seconds"] < CONFIRM + 2
    assert stages["rollback"]["status"] == "ok", stages["rollback"]
    assert previous in stages["rollback"]["message"]
    for name in ("host1", "host3"):
        assert nodes[name]["status"] == "ok" and nodes[name]["rolled_back"] is False
        confirm = [s for s in nodes[name]["stages"] if s["stage"] == "confirm"]
        assert [s["status"] for s in confirm] == ["ok"], nodes[name]["stages"]
    assert report["run"]["ok"] is False

    suite = next(iter(JUnitXml.fromfile(str(reports / "run.xml"))))
    failed = [c for c in suite if c.result and c.result[0]._tag == "failure"]
    assert [(c.classname, c.name) for c in failed] == [("waggle.confirm", "host2")]
    assert failed[0].result[0].message.startswith("rolled back: not confirmed within 3 s")
    md = (reports / "run.md").read_text()
    assert "1 failed" in md.splitlines()[0]
    assert md.index("host2") < md.index("host1")  # failures first
    assert "rolled back" in md and "not confirmed within 3 s" in md


def test_the_host_rolls_back_by_itself_when_waggle_is_killed(fleet, tmp_path):
    baseline(tmp_path, fleet)
    host1 = fleet["host1"]
    previous, previous_link = running(host1), generation(host1)
    write(tmp_path, uuid.uuid4().hex[:8], host1=f"{{ standin.activation.blockLogins = {BLOCK}; }}")
    new = built(tmp_path, "host1")
    argv = [sys.executable, "-m", "runner", "apply", "switch", "--on", "host1"]
    proc = subprocess.Popen(
        [*argv, "--ssh-config", str(fleet.ssh_config), "--confirm-timeout", str(CONFIRM)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    statuses = str(host1.path("/run/waggle")) + "/activation-*/status"
    before = set(glob.glob(statuses))
    try:
        assert wait_for(lambda: bool(set(glob.glob(statuses)) - before), 120), "no activation"
        proc.send_signal(signal.SIGKILL)  # right after the activation, before any confirmation
        killed = time.monotonic()
    finally:
        proc.kill()
        proc.wait(30)
    assert running(host1) == new
    assert wait_for(lambda: running(host1) == previous, CONFIRM + 10), running(host1)
    assert time.monotonic() - killed <= CONFIRM + 10
    assert generation(host1) == previous_link
    assert booting(host1) == previous
    # The outcome stays on the host for a later run or a human.
    run_dir = Path(next(iter(set(glob.glob(statuses)) - before))).parent
    assert wait_for(lambda: (run_dir / "outcome").exists(), 10)
    assert re.match(r"rolled-back\b", (run_dir / "outcome").read_text())
    # The next run sees the host as it is (the previous system) and deploys again.
    again = apply(tmp_path, fleet, "switch", "--on", "host1", "--no-rollback")
    assert again.returncode == 0 and rows(again)["host1"][0] == "ok", again.stdout
    assert wait_for(host1.accepts, BLOCK + 5)


def test_first_deploy_proceeds_and_says_no_rollback_is_possible(fleet, tmp_path):
    baseline(tmp_path, fleet)
    host3 = fleet["host3"]
    host3.path("/run/current-system").unlink()  # as on a host Waggle never deployed
    write(tmp_path, uuid.uuid4().hex[:8])
    report = tmp_path / "run.json"
    done = apply(tmp_path, fleet, "switch", "--on", "host3", "--report-json", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(done)["host3"][0] == "ok"
    node = json.loads(report.read_text())["nodes"][0]
    messages = " ".join(s["message"] for s in node["stages"])
    assert "no rollback possible: first deploy" in messages, node["stages"]
    assert "confirm" not in [s["stage"] for s in node["stages"]]
    assert running(host3) == built(tmp_path, "host3")
    # Recorded as activated: the next run leaves the host alone.
    again = apply(tmp_path, fleet, "switch", "--on", "host3")
    assert rows(again)["host3"][0] == "unchanged", again.stdout


def test_a_switch_that_failed_after_setting_the_profile_is_activated_again(fleet, tmp_path):
    baseline(tmp_path, fleet)
    release = uuid.uuid4().hex[:8]
    write(tmp_path, release, host1=FLAKY.replace("@RELEASE@", release))
    target = built(tmp_path, "host1")
    first = apply(tmp_path, fleet, "switch", "--on", "host1")
    assert first.returncode == 1 and rows(first)["host1"][0] == "failed", first.stdout
    host1 = fleet["host1"]
    # Half-way: the profile is set and /run/current-system points at it, but it failed.
    assert running(host1) == target and booting(host1) == target
    second = apply(tmp_path, fleet, "switch", "--on", "host1")
    assert second.returncode == 0, second.stdout + second.stderr
    assert rows(second)["host1"][0] == "ok", second.stdout  # activated, not "unchanged"
    assert len(activation_times(host1, target)) == 2
    third = apply(tmp_path, fleet, "switch", "--on", "host1")
    assert rows(third)["host1"][0] == "unchanged", third.stdout


def test_no_rollback_switches_as_before(fleet, tmp_path):
    baseline(tmp_path, fleet)
    host2 = fleet["host2"]
    write(tmp_path, uuid.uuid4().hex[:8], host2="{ standin.activation.blockLogins = 3; }")
    new = built(tmp_path, "host2")
    report = tmp_path / "run.json"
    done = apply(
        tmp_path, fleet, "switch", "--on", "host2", "--no-rollback", "--report-json", str(report)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(done)["host2"][0] == "ok"
    assert running(host2) == new
    node = json.loads(report.read_text())["nodes"][0]
    assert [s["stage"] for s in node["stages"]][-2:] == ["activate", "post-keys"]
    assert node["rolled_back"] is False
    assert wait_for(host2.accepts, 10)


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    @override
    def log_message(self, format: str, *args: object) -> None:
        return


def test_failing_health_checks_roll_back_and_passing_ones_are_confirmed(fleet, tmp_path):
    baseline(tmp_path, fleet)
    before = {n: running(fleet[n]) for n in NAMES}
    server = http.server.ThreadingHTTPServer((fleet["host3"].address, 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    quick = "period = 0.2; timeout = 1;"
    checks = {
        "host1": f"""{{ deployment.healthChecks.cmd = [
            {{ description = "marker"; cmd = [ "test" "-e" "/run/no-such-marker" ]; {quick} }}
        ]; }}""",
        "host2": f"""{{ deployment.healthChecks.http = [
            {{ description = "front page"; host = "{fleet["host2"].address}"; port = {port}; {quick} }}
        ]; }}""",
        "host3": f"""{{ deployment.healthChecks = {{
            cmd = [ {{ description = "up"; cmd = [ "true" ]; {quick} }} ];
            http = [ {{ description = "front page"; host = "{fleet["host3"].address}"; port = {port}; {quick} }} ];
        }}; }}""",
    }
    release = uuid.uuid4().hex[:8]
    write(tmp_path, release, **checks)
    report = tmp_path / "run.json"
    md = tmp_path / "run.md"
    try:
        done = apply(
            tmp_path, fleet, "switch", "--report-json", str(report), "--report-md", str(md)
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1, done.stdout + done.stderr
    out = rows(done)
    assert out["host1"][0] == "failed" and out["host2"][0] == "failed", done.stdout
    assert out["host1"][1].startswith("health: rolled back: health check"), out["host1"]
    assert "marker" in out["host1"][1]
    assert out["host2"][1].startswith("health: rolled back: health check"), out["host2"]
    assert out["host3"][0] == "ok", done.stdout
    nodes = {n["name"]: n for n in json.loads(report.read_text())["nodes"]}
    for name in ("host1", "host2"):
        assert running(fleet[name]) == before[name]  # went back
        assert nodes[name]["rolled_back"] is True and nodes[name]["failed_stage"] == "health"
        ran = [s["stage"] for s in nodes[name]["stages"]]
        assert ran[-3:] == ["activate", "health", "rollback"], ran  # never confirmed
    assert fleet["host3"].resolve("/etc/release").read_text() == release
    stages = {s["stage"]: s["status"] for s in nodes["host3"]["stages"]}
    assert stages["health"] == "ok" and stages["confirm"] == "ok"
    text = md.read_text()
    assert text.index("host1") < text.index("host3") and "rolled back" in text


def test_a_failing_health_check_without_rollback_fails_the_node_only(fleet, tmp_path):
    baseline(tmp_path, fleet)
    module = """{ deployment.healthChecks.cmd = [
        { description = "never"; cmd = [ "false" ]; period = 0.2; timeout = 0.5; }
    ]; }"""
    write(tmp_path, uuid.uuid4().hex[:8], host1=module)
    new = built(tmp_path, "host1")
    done = apply(tmp_path, fleet, "switch", "--on", "host1", "--no-rollback")
    assert done.returncode == 1
    assert rows(done)["host1"][1].startswith("health: health check"), done.stdout
    assert running(fleet["host1"]) == new  # no rollback asked for: the new system stays
    skipped = apply(tmp_path, fleet, "switch", "--on", "host1", "--no-health-checks", "--force")
    assert skipped.returncode == 0 and rows(skipped)["host1"][0] == "ok", skipped.stdout


def test_changed_since_deploys_a_host_whose_switch_failed_half_way(fleet, tmp_path):
    # Nothing in the commit touches host1, but its last switch failed after setting the
    # profile: the host counts as drifted, not unchanged, until an activation succeeds.
    baseline(tmp_path, fleet)
    release = uuid.uuid4().hex[:8]
    write(tmp_path, release, host1=FLAKY.replace("@RELEASE@", release))
    target = built(tmp_path, "host1")
    first = apply(tmp_path, fleet, "switch", "--on", "host1")
    assert first.returncode == 1 and running(fleet["host1"]) == target, first.stdout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "hive.nix"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=tmp_path, check=True)
    done = apply(tmp_path, fleet, "switch", "--changed-since", "HEAD", "--on", "host1", "-v")
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(done)["host1"][0] == "ok", done.stdout
    assert "host1: deploying (drift: no successful activation" in done.stderr, done.stderr
