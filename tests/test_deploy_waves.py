"""Rollout waves (runner/deploy/waves.py): the spec, the order, the failure budget, the gate,
and what the results and reports say about nodes a wave never reached.

The fleet tests (real sshd, real activation) are in test_deploy_waves_fleet.py; here the
gate runs with real nix and hosts that must never be contacted.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner import cli
from runner.app import ci as ci_app
from runner.app.requests import CiRequest
from runner.build import BuildSettings
from runner.deploy import waves
from runner.deploy.pipeline import DeploySettings, deploy
from runner.errors import UsageError
from runner.evaluate import EvalSettings
from runner.events import Emitter, Event, EventKind
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.hive.model import NodeConfig
from runner.nix import NixFlags
from runner.report import node_status
from runner.report.jsonreport import report_json
from runner.report.junit import junit_xml
from runner.report.markdown import markdown
from runner.report.text import deployed_lines
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status
from tests.conftest import write_hive
from tests.helpers import assert_clean_error, waggle

# --- the spec ------------------------------------------------------------------------------


def sizes(spec: str, total: int) -> list[int]:
    return waves.wave_sizes(waves.parse_waves(spec.split(",")), total)


def test_wave_sizes_are_cumulative_rounded_up_and_never_empty():
    assert sizes("1,10%,100%", 100) == [1, 9, 90]
    assert sizes("1,10%,100%", 6) == [1, 1, 4]  # 10% of 6 is 1, already reached: one more
    assert sizes("1,50%,100%", 6) == [1, 2, 3]
    assert sizes("1,10%,100%", 1) == [1]  # nothing left for later waves: they are dropped
    assert sizes("1,10%,100%", 0) == []
    assert sizes("100%", 5) == [5]
    assert sizes("2,5,100%", 3) == [2, 1]  # a count beyond the fleet reaches all of it
    assert sizes("10%,100%", 30) == [3, 27]  # exactly 10%, no float rounding up to 4
    assert sizes("33.4%,100%", 3) == [2, 1]
    assert sizes("10,50%,100%", 10) == [10]  # 50% of 10 is below 10: all reached already


@given(
    st.lists(st.integers(1, 1000), max_size=4, unique=True),
    st.lists(st.integers(1, 99), max_size=4, unique=True),
    st.integers(0, 2000),
)
def test_wave_sizes_cover_every_node_once(counts, shares, total):
    spec = [str(c) for c in sorted(counts)] + [f"{p}%" for p in sorted(shares)] + ["100%"]
    got = waves.wave_sizes(waves.parse_waves(spec), total)
    assert sum(got) == total
    assert all(size >= 1 for size in got)
    assert len(got) <= len(spec)
    if total:  # the first wave reaches what its entry says, at least one node
        share = Fraction(min(shares) if shares else 100, 100)
        first = min(counts) if counts else math.ceil(share * total)
        assert got[0] == min(total, max(1, first))


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("1,x,100%", "entry 2 ('x')"),
        ("1,,100%", "entry 2 is empty"),
        ("0,100%", "entry 1 ('0')"),
        ("1,0%,100%", "entry 2 ('0%')"),
        ("1,150%", "entry 2 ('150%')"),
        ("5,3,100%", "entry 2 ('3') does not reach more nodes than entry 1 ('5')"),
        ("50%,10%,100%", "entry 2 ('10%') does not reach more nodes than entry 1 ('50%')"),
        ("1,10%", "the last entry must be 100%"),
        ("-1,100%", "entry 1 ('-1')"),
    ],
)
def test_bad_wave_specs_are_one_line_errors(spec, needle):
    with pytest.raises(waves.SpecError, match=None) as caught:
        waves.parse_waves(spec.split(","))
    assert needle in str(caught.value)
    with pytest.raises(UsageError) as flagged:
        waves.Rollout.parse(tuple(spec.split(",")), "0", ())
    assert flagged.value.message.startswith(f"--waves {spec!r}: ")
    assert needle in flagged.value.message and "\n" not in flagged.value.message


def test_failure_budget_counts_or_shares_of_the_wave_rounded_down():
    assert waves.parse_budget("0").of(10) == 0
    assert waves.parse_budget("2").of(1) == 2
    assert waves.parse_budget("10%").of(9) == 0
    assert waves.parse_budget("10%").of(10) == 1
    assert waves.parse_budget("50%").of(5) == 2
    assert waves.parse_budget("100%").of(7) == 7
    for bad in ("x", "-1", "101%", "", "1.5", "%"):
        with pytest.raises(waves.SpecError):
            waves.parse_budget(bad)
    with pytest.raises(UsageError, match=r"^--max-failures 'x': "):
        waves.Rollout.parse(("1", "100%"), "x", ())


def test_settings_are_checked_when_made():
    # The CLI builds DeploySettings from the flags: a bad value is a usage error (exit 2)
    # before the hive is even looked for.
    with pytest.raises(UsageError, match="--waves"):
        DeploySettings(waves=("1", "x"))
    with pytest.raises(UsageError, match="--wave-order"):
        DeploySettings(waves=("1", "100%"), wave_order=("@",))
    DeploySettings(waves=("1", "10%", "100%"), max_failures="10%", wave_order=("@a", "b*"))


def test_cli_names_the_flag(tmp_path):
    for args, needle in (
        (("--waves", "1,abc,100%"), "--waves '1,abc,100%': entry 2 ('abc')"),
        (("--waves", "1,100%", "--max-failures", "many"), "--max-failures 'many'"),
        (("--wave-order", "@web,,x"), "--wave-order '@web,,x': entry 2 is empty"),
    ):
        done = waggle("apply", *args, cwd=tmp_path, timeout=60)
        assert_clean_error(done, 2, needle)


# --- the order -----------------------------------------------------------------------------

TAGS = {
    "web-2": ("web",),
    "web-1": ("web", "canary"),
    "db-1": ("db",),
    "db-2": ("db", "canary-eu"),
    "mail": (),
    "edge": ("edge-eu",),
}


def test_default_order_is_canary_first_then_by_name():
    names = list(TAGS)
    assert waves.order_nodes(names, TAGS, waves.parse_order(())) == [
        "web-1",
        "db-1",
        "db-2",
        "edge",
        "mail",
        "web-2",
    ]


def test_wave_order_groups_by_rule_then_name():
    order = waves.parse_order(("@canary*", "@db", "edge"))
    assert waves.order_nodes(list(TAGS), TAGS, order) == [
        "db-2",  # first rule (both canaries), by name
        "web-1",
        "db-1",  # @db (db-2 already placed)
        "edge",  # a name glob
        "mail",  # the rest, by name
        "web-2",
    ]
    with pytest.raises(waves.SpecError, match="entry 1 is a bare '@'"):
        waves.parse_order(("@",))


@given(st.permutations(list(TAGS)))
def test_order_does_not_depend_on_selection_order(names):
    order = waves.parse_order(("@db",))
    assert waves.order_nodes(names, TAGS, order) == waves.order_nodes(list(TAGS), TAGS, order)


def test_rollout_splits_the_ordered_nodes():
    rollout = waves.Rollout.parse(("1", "50%", "100%"), "0", ())
    assert rollout is not None
    assert rollout.split(list(TAGS), TAGS) == (
        ("web-1",),
        ("db-1", "db-2"),
        ("edge", "mail", "web-2"),
    )
    assert waves.Rollout.parse((), "0", ()) is None  # no --waves: one wave, no gate


# --- the gate ------------------------------------------------------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def gate_of(split, budget="0", events=None):
    sink = events.append if events is not None else (lambda _e: None)
    return waves.WaveGate(split, waves.parse_budget(budget), Emitter(sink))


def test_gate_opens_the_next_wave_when_every_node_of_this_one_has_an_outcome():
    async def main():
        events: list[Event] = []
        gate = gate_of((("a",), ("b", "c"), ("d",)), events=events)
        assert await gate.enter("a") is None  # wave 1 is open from the start
        b = asyncio.create_task(gate.enter("b"))
        await asyncio.sleep(0.05)
        assert not b.done()
        gate.record("a", ok=True)
        assert await b is None
        gate.record("b", ok=True)
        d = asyncio.create_task(gate.enter("d"))
        await asyncio.sleep(0.05)
        assert not d.done()  # c has no outcome yet
        gate.record("c", ok=True)
        assert await d is None
        assert [gate.wave_of(n) for n in "abcd"] == [1, 2, 2, 3]
        assert gate.wave_of("zzz") is None
        assert await gate.enter("zzz") is None  # not in any wave: not gated
        texts = [e.message for e in events if e.kind is EventKind.LOG]
        assert "wave 2 of 3: waiting for wave 1" in texts
        assert any(t.startswith("wave 2 of 3 started") for t in texts)

    run(main())


def test_gate_stops_after_a_wave_over_budget_and_later_waves_are_not_reached():
    async def main():
        gate = gate_of((("a",), ("b", "c"), ("d", "e")), budget="1")
        later = [asyncio.create_task(gate.enter(n)) for n in "bcde"]
        gate.record("a", ok=False)  # 1 failed: within the budget of 1
        assert await later[0] is None and await later[1] is None
        gate.record("b", ok=False)
        gate.record("c", ok=False)
        reason = "not reached: wave 2 exceeded the failure budget (2 failed)"
        assert await later[2] == reason and await later[3] == reason
        assert gate.not_reached("d") and not gate.not_reached("b")

    run(main())


def test_gate_counts_nodes_that_failed_before_their_wave_started():
    # b and c fail their build while wave 1 still runs: their outcomes are known early,
    # wave 2 counts them once it starts, and wave 3 is not reached (no deadlock).
    async def main():
        gate = gate_of((("a",), ("b", "c"), ("d",)))
        gate.record("b", ok=False)
        gate.record("c", ok=False)
        d = asyncio.create_task(gate.enter("d"))
        gate.record("a", ok=True)
        assert await d == "not reached: wave 2 exceeded the failure budget (2 failed)"

    run(main())


def test_gate_learns_outcomes_from_the_event_stream():
    async def main():
        gate = gate_of((("a",), ("b",)))
        seen: list[Event] = []
        sink = gate.watch(seen.append)
        b = asyncio.create_task(gate.enter("b"))
        failed = StageResult(Stage.EVAL, Status.FAILED, 0.0, "boom")
        sink(Event("a", EventKind.NODE_END, node_result=NodeResult("a", (failed,))))
        assert await b == "not reached: wave 1 exceeded the failure budget (1 failed)"
        assert [e.node for e in seen] == ["a"]  # passed on

    run(main())


@given(
    st.lists(st.booleans(), min_size=1, max_size=12),
    st.lists(st.integers(1, 4), min_size=1, max_size=6),
    st.integers(0, 3),
)
def test_gate_never_deadlocks_and_stops_at_the_first_wave_over_budget(oks, cuts, budget):
    names = [f"n{i}" for i in range(len(oks))]
    split, at = [], 0
    for cut in cuts:
        if at < len(names):
            split.append(tuple(names[at : at + cut]))
            at += cut
    if at < len(names):
        split.append(tuple(names[at:]))

    async def main():
        gate = gate_of(tuple(split), budget=str(budget))
        outcome = dict(zip(names, oks, strict=True))

        async def node(name):
            held = await gate.enter(name)
            if held is None:
                gate.record(name, outcome[name])
            return held

        return await asyncio.gather(*(node(n) for n in reversed(names)))

    held = dict(zip(reversed(names), run(main()), strict=True))
    stopped = None
    for k, wave in enumerate(split, start=1):
        failed = sum(not oks[names.index(n)] for n in wave)
        if stopped is not None:
            assert all(held[n] == stopped for n in wave)
        else:
            assert all(held[n] is None for n in wave)
            if failed > budget and k < len(split):
                stopped = f"not reached: wave {k} exceeded the failure budget ({failed} failed)"


# --- results and reports of nodes not reached --------------------------------------------

T0 = 1_735_732_800.0
REASON = "not reached: wave 1 exceeded the failure budget (1 failed)"


def _ok(stage: Stage) -> StageResult:
    return StageResult(stage, Status.OK, 1.0, "", started_at=T0)


def summary_with_waves() -> RunSummary:
    failed = StageResult(Stage.ACTIVATE, Status.FAILED, 1.0, "activation failed", "log", T0)
    held = StageResult(Stage.PUSH, Status.SKIPPED, 0.0, REASON, started_at=T0)
    broken = StageResult(Stage.BUILD, Status.FAILED, 1.0, "build failed", "log", T0)
    built = (_ok(Stage.EVAL), _ok(Stage.BUILD))
    nodes = (
        NodeResult("a-held", (*built, held), wave=2, not_reached=True),
        NodeResult("z-canary", (*built, _ok(Stage.PUSH), _ok(Stage.KEYS), failed), wave=1),
        NodeResult("b-held", (*built, held), wave=3, not_reached=True),
        NodeResult("m-broken", (_ok(Stage.EVAL), broken), wave=3),
    )
    stages = (Stage.EVAL, Stage.BUILD, Stage.PUSH, Stage.KEYS, Stage.ACTIVATE)
    return RunSummary("apply switch", "switch", "./hive.nix", None, T0, 3.0, stages, nodes)


def test_a_node_not_reached_is_skipped_yet_the_run_failed():
    summary = summary_with_waves()
    held = summary.nodes[0]
    assert node_status(held) == "skipped"
    assert held.ok  # no stage of its own failed
    assert summary.not_reached == (summary.nodes[0], summary.nodes[2])
    assert summary.failed == (summary.nodes[1], summary.nodes[3])
    assert not summary.ok  # exit 1, even if only the budget stopped the run
    only_held = RunSummary("apply", "switch", "h", None, T0, 1.0, (), (held,))
    assert not only_held.ok
    assert deployed_lines([held]) == [f"a-held\t{REASON}\t"]


def test_reports_say_why_a_node_was_not_reached_and_group_by_wave():
    summary = summary_with_waves()
    data = report_json(summary)
    nodes = {n["name"]: n for n in data["nodes"]}
    assert data["run"]["ok"] is False
    assert nodes["a-held"]["status"] == "skipped" and nodes["a-held"]["wave"] == 2
    assert nodes["a-held"]["stages"][-1]["message"] == REASON
    assert data["run"]["counts"]["skipped"] == 2 and data["run"]["counts"]["failed"] == 2

    xml = ET.fromstring(junit_xml(summary))
    held = {c.attrib["classname"]: c for c in xml.iter("testcase") if c.attrib["name"] == "a-held"}
    for stage in ("waggle.push", "waggle.keys", "waggle.activate"):
        skipped = held[stage].find("skipped")
        assert skipped is not None and skipped.attrib["message"] == REASON, stage
    suite = xml.find("./testsuite")
    assert suite is not None and suite.attrib["failures"] == "2"

    text = markdown(summary)
    rows = [line for line in text.splitlines() if line.startswith("| ")][2:]
    # by wave, failed nodes first within a wave (not all failed nodes first)
    order = [r.split(" | ")[0].strip("| *") for r in rows]
    assert order == ["z-canary", "a-held", "m-broken", "b-held"]
    assert [r.split(" | ")[1] for r in rows] == ["1", "2", "3", "3"]
    assert "| Node | Wave | Status |" in text
    assert "Wave 1 exceeded the failure budget (1 failed): 2 nodes not reached." in text
    assert "### ❌ z-canary" in text and "### ❌ a-held" not in text


def test_reports_without_waves_have_no_wave_column():
    summary = summary_with_waves()
    node = replace(summary.nodes[1], wave=None)
    plain = RunSummary("apply", "switch", "h", None, T0, 1.0, summary.stages, (node,))
    assert "Wave" not in markdown(plain)
    assert json.loads(json.dumps(report_json(plain)))["nodes"][0]["wave"] is None


# --- the pipeline: evaluation failures count in their wave --------------------------------

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  canary = { name, ... }: {
    deployment.tags = [ "canary" ];
    deployment.targetHost = "192.0.2.1";
    networking.hostName = builtins.throw "the canary does not evaluate";
  };
  a = { name, ... }: { networking.hostName = name; deployment.targetHost = "192.0.2.2"; };
  b = { name, ... }: { networking.hostName = name; deployment.targetHost = "192.0.2.3"; };
}
"""


def test_a_canary_that_fails_to_evaluate_stops_the_rollout_before_any_host(tmp_path):
    hive = Hive(locate(str(write_hive(tmp_path, HIVE)), tmp_path), NixFlags())
    contacted: list[str] = []

    def no_host(config: NodeConfig):
        contacted.append(config.name)
        raise AssertionError("no host may be contacted")

    async def main():
        names = await hive.node_names()
        configs = await hive.deployment(names)
        settings = DeploySettings(waves=("1", "100%"), rollback=False)
        return await deploy(
            hive, configs, names, EvalSettings(), BuildSettings(), settings, host_factory=no_host
        )

    result = {r.name: r for r in asyncio.run(asyncio.wait_for(main(), 120)).nodes}
    assert contacted == []
    assert result["canary"].failure is not None and result["canary"].wave == 1
    for name in ("a", "b"):
        assert result[name].not_reached and result[name].wave == 2
        assert result[name].stages[-1].message == REASON
        assert result[name].stages[-1].stage is Stage.PUSH


# --- the command line: which rollout flags `waggle ci` was given -------------------------


def test_ci_knows_which_rollout_flags_were_given(monkeypatch, tmp_path, capsys):
    seen: list[CiRequest] = []

    async def fake_run_ci(request, printer, environ=None):
        seen.append(request)
        return ci_app.CiOutcome("build", True)

    monkeypatch.setattr(ci_app, "run_ci", fake_run_ci)
    monkeypatch.chdir(tmp_path)
    assert cli.run(["ci"]) == 0
    assert (
        cli.run(["ci", "--confirm-timeout", "30", "--max-failures", "0", "--waves", "1,100%"]) == 0
    )
    assert [(r.max_failures_given, r.confirm_timeout_given) for r in seen] == [
        (False, False),
        (True, True),
    ]
    defaults, flags = seen[0].apply.deploy, seen[1].apply.deploy
    assert (flags.waves, flags.max_failures, flags.confirm_timeout) == (("1", "100%"), "0", 30.0)
    # timeouts not given are DeploySettings' defaults, the numbers the help shows
    with pytest.raises(SystemExit):
        cli.run(["apply", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag, name in (
        ("push", "push_timeout"),
        ("activation", "activation_timeout"),
        ("reboot", "reboot_timeout"),
        ("confirm", "confirm_timeout"),
        ("lock", "lock_timeout"),
    ):
        value = getattr(defaults, name)
        assert value == getattr(DeploySettings(), name)
        assert re.search(rf"--{flag}-timeout SECONDS timeout of [^(]*\(default {value:g}\)", shown)
