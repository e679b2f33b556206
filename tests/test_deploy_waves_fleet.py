"""`waggle apply --waves` against the real fleet (6 sshd hosts, real nix, real activation).

- a failing canary stops the rollout: only it ran, the other hosts are never activated, and
  every report says they were not reached and why; exit 1;
- `--max-failures 1` lets the second wave run after a failed canary, and a second wave over
  the budget stops the third; `--wave-order` decides the waves (not the canary tag);
- with every node healthy all waves run, one after the other, the canary first; the plain
  log says which wave runs.
"""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import waggle

pytestmark = needs_fleet()

NAMES = [f"host{i}" for i in range(1, 7)]
FAIL = "standin.activation.fail = true;"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    with Fleet.start(d, 6, names=NAMES, first_octet=free_first_octet(6, 180)) as f:
        yield f


def write_fleet_hive(directory: Path, nodes: dict[str, str]) -> None:
    """host1..host6 with a fresh release (every host activates) and per-node settings."""
    release = uuid.uuid4().hex
    body = "\n".join(
        f'  {n} = {{ ... }}: {{ environment.etc.release.text = "{release}"; {nodes.get(n, "")} }};'
        for n in NAMES
    )
    write_hive(
        directory,
        "{\n  meta.nixpkgs = import @NIXPKGS@ { };\n"
        "  defaults = { name, ... }: { networking.hostName = name; };\n" + body + "\n}\n",
    )


def activations(fleet: Fleet) -> dict[str, int]:
    counts = {}
    for name in NAMES:
        log = fleet[name].path("/run/standin/activations.log")
        counts[name] = len(log.read_text().splitlines()) if log.exists() else 0
    return counts


def apply(fleet: Fleet, directory: Path, *args: str) -> tuple[Any, dict[str, Any], Any]:
    reports = directory / "reports"
    reports.mkdir(exist_ok=True)
    done = waggle(
        "apply",
        "--ssh-config",
        str(fleet.ssh_config),
        "--no-rollback",
        "--no-health-checks",
        "--connect-timeout",
        "5",
        "--activation-timeout",
        "60",
        "--lock-timeout",
        "5",
        "--report-json",
        str(reports / "run.json"),
        "--junit",
        str(reports / "junit.xml"),
        "--report-md",
        str(reports / "report.md"),
        *args,
        cwd=directory,
        timeout=240,
    )
    data = json.loads((reports / "run.json").read_text())
    return done, {n["name"]: n for n in data["nodes"]}, data


def when(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def host_stage_start(node: dict[str, Any]) -> float:
    """When the node's host work began (its push)."""
    push = next(s for s in node["stages"] if s["stage"] == "push")
    return when(push["started_at"])


def node_end(node: dict[str, Any]) -> float:
    return max(
        when(s["started_at"]) + float(s["seconds"]) for s in node["stages"] if s["started_at"]
    )


def junit_skips(directory: Path, node: str) -> dict[str, str]:
    xml = ET.parse(directory / "reports" / "junit.xml")
    out = {}
    for case in xml.iter("testcase"):
        skipped = case.find("skipped")
        if case.attrib["name"] == node and skipped is not None:
            out[case.attrib["classname"]] = skipped.attrib.get("message", "")
    return out


def test_failing_canary_stops_the_rollout(fleet, tmp_path):
    # host4 is the canary by its tag (not by name) and its activation fails.
    write_fleet_hive(tmp_path, {"host4": f'deployment.tags = [ "canary" ]; {FAIL}'})
    before = activations(fleet)
    done, nodes, data = apply(fleet, tmp_path, "--waves", "1,50%,100%")
    assert done.returncode == 1, done.stdout + done.stderr
    after = activations(fleet)
    assert after["host4"] == before["host4"] + 1  # only the canary ran
    assert {n: after[n] - before[n] for n in NAMES if n != "host4"} == dict.fromkeys(
        ["host1", "host2", "host3", "host5", "host6"], 0
    )
    reason = "not reached: wave 1 exceeded the failure budget (1 failed)"
    assert nodes["host4"]["status"] == "failed" and nodes["host4"]["wave"] == 1
    assert {n: nodes[n]["wave"] for n in NAMES if n != "host4"} == {
        "host1": 2,
        "host2": 2,
        "host3": 3,
        "host5": 3,
        "host6": 3,
    }
    for name in ("host1", "host2", "host3", "host5", "host6"):
        assert nodes[name]["status"] == "skipped", name
        assert nodes[name]["stages"][-1] == {**nodes[name]["stages"][-1], "message": reason}
        assert set(junit_skips(tmp_path, name).values()) == {reason}, name
        assert f"{name}\t{reason}\t" in done.stdout
    assert data["run"]["ok"] is False
    assert data["run"]["counts"]["failed"] == 1 and data["run"]["counts"]["skipped"] == 5
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "Wave 1 exceeded the failure budget (1 failed): 5 nodes not reached." in md
    rows = [line for line in md.splitlines() if line.lstrip("| *").startswith("host")]
    assert [r.split(" | ")[1] for r in rows] == ["1", "2", "2", "3", "3", "3"]
    assert "wave 2 of 3: waiting for wave 1" in done.stderr


def test_budget_lets_the_second_wave_run_and_wave_order_decides(fleet, tmp_path):
    # --wave-order @first,@second: host6 alone, then host2 and host5, then the rest (host1's
    # canary tag does not count with an explicit order). host6 fails (within the budget of
    # 1), both nodes of wave 2 fail (over it): wave 3 is not reached.
    write_fleet_hive(
        tmp_path,
        {
            "host1": 'deployment.tags = [ "canary" ];',
            "host6": f'deployment.tags = [ "first" ]; {FAIL}',
            "host2": f'deployment.tags = [ "second" ]; {FAIL}',
            "host5": f'deployment.tags = [ "second" ]; {FAIL}',
        },
    )
    before = activations(fleet)
    done, nodes, _ = apply(
        fleet,
        tmp_path,
        "--waves",
        "1,50%,100%",
        "--max-failures",
        "1",
        "--wave-order",
        "@first,@second",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    after = activations(fleet)
    ran = {n for n in NAMES if after[n] > before[n]}
    assert ran == {"host6", "host2", "host5"}
    assert {n: nodes[n]["wave"] for n in NAMES} == {
        "host6": 1,
        "host2": 2,
        "host5": 2,
        "host1": 3,
        "host3": 3,
        "host4": 3,
    }
    assert {n: nodes[n]["status"] for n in NAMES} == {
        "host6": "failed",
        "host2": "failed",
        "host5": "failed",
        "host1": "skipped",
        "host3": "skipped",
        "host4": "skipped",
    }
    reason = "not reached: wave 2 exceeded the failure budget (2 failed)"
    assert nodes["host1"]["stages"][-1]["message"] == reason
    # wave 2 started only after wave 1 had ended
    assert min(host_stage_start(nodes[n]) for n in ("host2", "host5")) >= node_end(nodes["host6"])


def test_healthy_rollout_runs_every_wave_in_turn(fleet, tmp_path):
    write_fleet_hive(tmp_path, {"host5": 'deployment.tags = [ "canary" ];'})
    before = activations(fleet)
    done, nodes, data = apply(fleet, tmp_path, "--waves", "1,50%,100%", "--parallel", "6")
    assert done.returncode == 0, done.stdout + done.stderr
    after = activations(fleet)
    assert all(after[n] == before[n] + 1 for n in NAMES)
    assert data["run"]["ok"] is True
    waves: dict[int, list[str]] = {}
    for name, node in nodes.items():
        assert node["status"] == "ok", name
        waves.setdefault(node["wave"], []).append(name)
    assert waves == {1: ["host5"], 2: ["host1", "host2"], 3: ["host3", "host4", "host6"]}
    for k in (2, 3):
        started = min(host_stage_start(nodes[n]) for n in waves[k])
        assert started >= max(node_end(nodes[n]) for n in waves[k - 1]), k
    assert "wave 3 of 3 started (3 nodes; wave 2: 0 failed, 0 allowed)" in done.stderr
