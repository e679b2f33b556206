"""Streaming evaluation workers: the decision rules (unit) and real nix runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import psutil
import pytest

from runner.build import BuildSettings, evaluate_and_build
from runner.evaluate import (
    COST,
    DIED,
    MEMORY,
    Costs,
    EvalSettings,
    GiB,
    MemoryBudget,
    MiB,
    NodeEval,
    cgroup_room,
    evaluate,
    first_workers,
    may_start_worker,
    parse_size,
    recent_cost,
    recycle_reason,
    split_queues,
    steal_count,
)
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.nix import NixFlags
from tests.conftest import write_hive


def budget(size: int) -> MemoryBudget:
    return MemoryBudget(available=size, cgroup_room=None, reserve=0, budget=size)


def test_parse_size():
    assert parse_size("4G") == 4 * GiB
    assert parse_size("512M") == 512 * MiB
    assert parse_size("1.5GiB") == int(1.5 * GiB)
    assert parse_size("2048") == 2 * GiB
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_cgroup_limit_caps_budget(tmp_path):
    (tmp_path / "proc").write_text("0::/ci/job\n")
    job = tmp_path / "cg" / "ci" / "job"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("max\n")
    (job / "memory.current").write_text("100\n")
    (tmp_path / "cg" / "ci" / "memory.max").write_text(str(3 * GiB))
    (tmp_path / "cg" / "ci" / "memory.current").write_text(str(1 * GiB))
    assert cgroup_room(tmp_path / "cg", tmp_path / "proc") == 2 * GiB
    (tmp_path / "proc").write_text("0::/\n")
    assert cgroup_room(tmp_path / "cg", tmp_path / "proc") is None


# -- the decision rules (pure) -------------------------------------------------------


def test_queues_are_contiguous_and_even():
    queues = split_queues([f"n{i}" for i in range(7)], 3)
    assert [list(q) for q in queues] == [["n0", "n1", "n2"], ["n3", "n4"], ["n5", "n6"]]
    assert [list(q) for q in split_queues(["a"], 4)] == [["a"]]


def test_memory_rule_stops_before_the_share_would_pass():
    assert recycle_reason(0.1, 250 * MiB, 40 * MiB, 300 * MiB, 1.0, auto=False) is None
    assert recycle_reason(0.1, 270 * MiB, 40 * MiB, 300 * MiB, 1.0, auto=False) == MEMORY
    # Also after a process's first node, also with a fixed node limit.
    assert recycle_reason(None, 280 * MiB, 40 * MiB, 300 * MiB, None, auto=False) == MEMORY


def test_cost_rule_restarts_only_after_nodes_dearer_than_a_fresh_start():
    # Ski rental: a restart (fresh start + first node: 1.0 s) is paid only once the recent
    # nodes cost more each.
    assert recycle_reason(0.9, MiB, MiB, GiB, 1.0, auto=True) is None
    assert recycle_reason(1.2, MiB, MiB, GiB, 1.0, auto=True) == COST
    # Not on a fixed node limit, not before any fresh start was measured.
    assert recycle_reason(1.2, MiB, MiB, GiB, 1.0, auto=False) is None
    assert recycle_reason(1.2, MiB, MiB, GiB, None, auto=True) is None
    # The recent cost: the last two nodes after the first (which holds the start-up); one
    # dear node (a garbage collection) alone does not make a restart.
    assert recent_cost([5.0]) is None
    assert recent_cost([5.0, 0.2]) is None
    assert recent_cost([5.0, 0.2, 0.4]) == pytest.approx(0.3)
    assert recent_cost([5.0, 0.2, 0.4, 1.6]) == pytest.approx(1.0)
    assert recycle_reason(recent_cost([1.0, 0.2, 1.5]), MiB, MiB, GiB, 1.0, auto=True) is None


def test_stealing_balances_and_only_when_sooner():
    # Victim: 9 left at 1 s each; a fresh process costs 3 s then 1 s per node: take 3 from the
    # tail (victim done at 6 s, thief at 3 + 2 = 5 s: both sooner than 9 s).
    assert steal_count(9, 1.0, 3.0, 1.0) == 3
    # A fresh start costs more than the victim's whole rest: not worth it.
    assert steal_count(2, 1.0, 3.0, 1.0) == 0
    assert steal_count(0, 1.0, 0.1, 0.1) == 0
    # One node per process (fresh start per node): half each.
    assert steal_count(8, 1.0, 1.0, 1.0) == 4


def test_costs_learn_fresh_starts_and_growth():
    costs = Costs()
    assert costs.fresh_cost() is None
    assert costs.first_memory() == 512 * MiB  # nothing measured: Colmena's guess
    assert costs.growth_after(1, 100 * MiB, None) == 100 * MiB  # unknown: as much again
    costs.observe(1, 2.0, 100 * MiB, None)
    costs.observe(2, 0.2, 130 * MiB, 30 * MiB)
    costs.observe(1, 3.0, 120 * MiB, None)
    costs.observe(1, 4.0, 110 * MiB, None)
    assert costs.fresh_cost() == 3.0  # the median
    assert costs.first_memory() == 120 * MiB
    assert costs.growth_after(1, 100 * MiB, None) == 30 * MiB  # what a second node added
    assert costs.growth_after(3, 200 * MiB, 10 * MiB) == 10 * MiB  # its own last growth
    assert costs.node_cost() == 0.2


def test_workers_start_within_the_budget():
    # First workers: budget // first-process memory (512 MiB unmeasured), at least one.
    assert first_workers(jobs=2, queues=2, budget=600 * MiB, first_memory=512 * MiB) == 1
    assert first_workers(jobs=2, queues=2, budget=300 * MiB, first_memory=512 * MiB) == 1
    assert first_workers(jobs=4, queues=3, budget=8 * GiB, first_memory=512 * MiB) == 3
    # Later: when measured room allows one more whose share still holds two nodes.
    room = {"jobs": 2, "budget": 600 * MiB, "first_memory": 150 * MiB, "growth": 100 * MiB}
    assert may_start_worker(running=1, used=150 * MiB, **room)
    assert not may_start_worker(running=1, used=500 * MiB, **room)
    assert not may_start_worker(running=2, used=150 * MiB, **room)
    assert not may_start_worker(running=1, used=150 * MiB, **{**room, "growth": 200 * MiB})


# -- real evaluation -----------------------------------------------------------------

MANY = """
let
  pkgs = import @NIXPKGS@ { };
  node = i: {
    name = "node-${toString i}";
    value = { name, pkgs, ... }: {
      networking.hostName = name;
      environment.etc."id".text = "node ${toString i}\\n";
      environment.systemPackages = [ pkgs.hello ];
    };
  };
in
{ meta.nixpkgs = pkgs; } // builtins.listToAttrs (map node (builtins.genList (i: i + 1) @COUNT@))
"""


def open_hive(path: Path) -> Hive:
    return Hive(locate(str(path), path.parent), NixFlags())


def queue_procs(run):
    return [p for p in run.processes if not p.alone]


def test_a_node_limit_caps_each_process(tmp_path):
    hive = open_hive(write_hive(tmp_path, MANY.replace("@COUNT@", "20")))
    names = asyncio.run(hive.node_names())
    assert len(names) == 20
    run = asyncio.run(
        evaluate_and_build(hive, names, EvalSettings(node_limit=3), BuildSettings(jobs=2))
    )
    procs = queue_procs(run.evaluation)
    assert all(1 <= len(p.names) <= 3 for p in procs)
    assert sorted(n for p in procs for n in p.names) == sorted(names)
    assert all(p.peak_rss > 0 for p in procs)
    assert [r.name for r in run.nodes] == names
    for r in run.nodes:
        assert r.ok, r.failure
        assert r.out_path is not None
        assert (Path(r.out_path) / "etc" / "id").read_text() == f"node {r.name.split('-')[1]}\n"


BROKEN = """
let pkgs = import @NIXPKGS@ { }; in
{
  meta.nixpkgs = pkgs;
  defaults = { name, ... }: { networking.hostName = name; };
  a = { };
  b = { pkgs, ... }: { environment.systemPackages = [ pkgs.doesNotExist ]; };
  c = { };
  d = { assertions = [ { assertion = false; message = "d is not allowed here"; } ]; };
  e = { };
  f = { environment.etc.x.text = throw "f throws on purpose"; };
  g = { };
}
"""


@pytest.mark.parametrize("limit", [0, 4, None])
def test_broken_nodes_fail_alone_with_their_own_message(tmp_path, limit):
    hive = open_hive(write_hive(tmp_path, BROKEN))
    names = asyncio.run(hive.node_names())
    run = asyncio.run(evaluate_and_build(hive, names, EvalSettings(node_limit=limit), None))
    by_name = {r.name: r for r in run.nodes}
    assert sorted(n for n, r in by_name.items() if r.ok) == ["a", "c", "e", "g"]
    messages = {n: f"{r.failure}" for n, r in by_name.items() if not r.ok}
    assert "doesNotExist" in messages["b"]
    assert "d is not allowed here" in messages["d"]
    assert "f throws on purpose" in messages["f"]
    # The others' toplevels were evaluated: their drv files exist.
    for n in "aceg":
        drv = by_name[n].drv_path
        assert drv is not None and Path(drv).exists()


def test_one_broken_node_among_twenty_fails_alone(tmp_path):
    # node-7's error is not one tryEval catches: its evaluator dies there, node-7 is evaluated
    # alone for its message, and the rest of its queue goes on in a new evaluator.
    body = MANY.replace("@COUNT@", "20").replace(
        "environment.systemPackages = [ pkgs.hello ];",
        "environment.systemPackages = [ (if i == 7 then pkgs.noSuchPackage else pkgs.hello) ];",
    )
    hive = open_hive(write_hive(tmp_path, body))
    names = asyncio.run(hive.node_names())
    run = asyncio.run(evaluate(hive, names, EvalSettings(jobs=1)))
    assert run.failed == ["node-7"]
    assert "noSuchPackage" in (run.results["node-7"].error or "")
    assert sum(1 for r in run.results.values() if r.ok) == 19
    died = [p for p in run.processes if p.why == DIED]
    assert len(died) == 1 and not died[0].ok
    assert [p.names for p in run.processes if p.alone] == [("node-7",)]
    assert len(queue_procs(run)) == 2


SHARED = """
let
  pkgs = import @NIXPKGS@ { };
  big = import ./big.nix;
  node = i: {
    name = "node-${toString i}";
    value = { name, ... }: {
      networking.hostName = name;
      environment.etc."id".text = big."a${toString i}";
    };
  };
in
{ meta.nixpkgs = pkgs; } // builtins.listToAttrs (map node (builtins.genList (i: i + 1) 12))
"""


def test_nodes_sharing_a_big_parsed_file_share_evaluators(tmp_path):
    # Parsing big.nix dominates; each node reads one attribute of it: no node ever costs as
    # much as a fresh start, so no worker restarts and 12 nodes take far fewer processes.
    lines = (f'  a{i} = "value {i} {"x" * 40}";' for i in range(60000))
    (tmp_path / "big.nix").write_text("{\n" + "\n".join(lines) + "\n}\n")
    hive = open_hive(write_hive(tmp_path, SHARED))
    names = asyncio.run(hive.node_names())
    run = asyncio.run(evaluate(hive, names, EvalSettings(jobs=2)))
    assert not run.failed
    procs = queue_procs(run)
    assert len(procs) <= 3, [(p.names, p.why) for p in procs]
    assert sum(len(p.names) for p in procs) == 12
    # One trace point per node, memory sampled at each.
    assert all(len(p.points) == len(p.names) for p in procs)
    assert all(rss > 0 for p in procs for _, _, rss in p.points)


HEAVY = """
let
  pkgs = import @NIXPKGS@ { };
  node = i: {
    name = "node-${toString i}";
    value = { name, ... }: {
      imports = [ @NIXPKGS@/nixos/modules/bench-heavy.nix ];
      networking.hostName = name;
      environment.etc."node-id".text = "node ${toString i}\n";
    };
  };
in
{ meta.nixpkgs = pkgs; } // builtins.listToAttrs (map node (builtins.genList (i: i + 1) @COUNT@))
"""


def test_heap_heavy_workers_are_recycled_on_memory(tmp_path, caplog):
    # Each heavy node adds ~100 MiB to its evaluator: with 400M one evaluator cannot hold
    # many, so it is stopped after a node (never in the middle) and a fresh one goes on.
    hive = open_hive(write_hive(tmp_path, HEAVY.replace("@COUNT@", "6")))
    names = asyncio.run(hive.node_names())
    with caplog.at_level(logging.INFO, logger="waggle"):
        run = asyncio.run(evaluate(hive, names, EvalSettings(memory=400 * MiB, jobs=1)))
    # -v says when each worker starts, each node, and each restart with its reason.
    logged = caplog.messages
    assert "evaluation: worker 1 starts on 6 node(s) (node-1 .. node-6)" in logged
    assert any(m.startswith("evaluation: worker 1: node-1 done in ") for m in logged)
    assert any("evaluator stopped after" in m and "(memory)" in m for m in logged), logged
    assert not run.failed
    procs = queue_procs(run)
    assert [p.why for p in procs if p.why == MEMORY], [(p.names, p.why) for p in procs]
    assert len(procs) >= 2
    assert sum(len(p.names) for p in procs) == 6
    assert run.peak_rss_total <= run.budget.budget


def test_memory_stays_inside_a_small_budget_on_two_workers(tmp_path):
    hive = open_hive(write_hive(tmp_path, HEAVY.replace("@COUNT@", "8")))
    names = asyncio.run(hive.node_names())
    run = asyncio.run(evaluate(hive, names, EvalSettings(memory=600 * MiB, jobs=2)))
    assert not run.failed
    assert run.peak_rss_total <= 600 * MiB
    assert any(p.why == MEMORY for p in run.processes)
    assert run.peak_rss_total > 0


def dear_nodes_hive(count: int, dear: str, work: int) -> str:
    """A hive of `count` nodes where those matching the Nix condition `dear` (on `i`) sum
    `work` numbers while evaluating and the others 10."""
    return f"""
let
  pkgs = import @NIXPKGS@ {{ }};
  work = n: toString (builtins.foldl' builtins.add 0 (builtins.genList (x: x) n));
  node = i: {{
    name = "node-${{toString i}}";
    value = {{ name, ... }}: {{
      networking.hostName = name;
      environment.etc."id".text = "node ${{toString i}} ${{work (if {dear} then {work} else 10)}}\\n";
    }};
  }};
in
{{ meta.nixpkgs = pkgs; }} // builtins.listToAttrs (map node (builtins.genList (i: i + 1) {count}))
"""


COSTLY = dear_nodes_hive(6, "i == 3", 3000000)


def test_a_node_dearer_than_a_fresh_start_restarts_its_worker(tmp_path):
    # node-3 costs ~10x a fresh evaluator's start and first node (node-2 and node-3 together
    # more than twice that): the worker restarts after it.
    hive = open_hive(write_hive(tmp_path, COSTLY))
    names = asyncio.run(hive.node_names())
    run = asyncio.run(evaluate(hive, names, EvalSettings(jobs=1)))
    assert not run.failed
    procs = queue_procs(run)
    assert [p.why for p in procs] == [COST, "finished"], [(p.names, p.why) for p in procs]
    # (node-4 may finish before the stop takes effect: its line is still taken.)
    assert procs[0].names[:3] == ("node-1", "node-2", "node-3")
    assert sorted(procs[0].names + procs[1].names) == names
    # With a fixed node limit the cost rule is off.
    fixed = asyncio.run(evaluate(hive, names, EvalSettings(jobs=1, node_limit=0)))
    assert [p.why for p in fixed.processes] == ["finished"]


def nix_evaluators() -> list[psutil.Process]:
    """This test process's live nix-instantiate children."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.name() == "nix-instantiate" and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def no_evaluator_left(within: float = 5.0) -> bool:
    """A killed process may take a moment to be gone."""
    deadline = time.monotonic() + within
    while nix_evaluators():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_worker_killed_mid_queue_loses_no_node(tmp_path):
    hive = open_hive(write_hive(tmp_path, MANY.replace("@COUNT@", "8")))
    names = asyncio.run(hive.node_names())
    seen: list[str] = []

    def on_result(ev: NodeEval) -> None:
        seen.append(ev.name)
        if len(seen) == 3:
            for p in nix_evaluators():
                p.kill()

    run = asyncio.run(evaluate(hive, names, EvalSettings(jobs=1), on_result))
    assert not run.failed
    assert sorted(seen) == sorted(names)  # each once
    died = [p for p in run.processes if p.why == DIED]
    assert len(died) == 1
    # Killed after the third result (a line or two more may have been on their way).
    finished = died[0].names
    assert finished[:3] == tuple(names[:3]) and len(finished) < len(names)
    assert [p.names for p in run.processes if p.alone] == [(names[len(finished)],)]


def test_a_node_without_progress_times_out_alone(tmp_path):
    # node-2 reads a FIFO nobody writes: it waits forever (no CPU, no memory). It fails with
    # the timeout; its queue goes on in a new evaluator.
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    body = MANY.replace("@COUNT@", "4").replace(
        'environment.etc."id".text = "node ${toString i}\\n";',
        f'environment.etc."id".text = if i == 2 then builtins.readFile {fifo} else "node ${{toString i}}\\n";',
    )
    assert str(fifo) in body
    hive = open_hive(write_hive(tmp_path, body))
    names = asyncio.run(hive.node_names())
    run = asyncio.run(evaluate(hive, names, EvalSettings(jobs=1, timeout=2.0)))
    assert run.failed == ["node-2"]
    assert run.results["node-2"].error == "evaluation timed out after 2 s"
    assert [p.why for p in run.processes] == ["timeout", "finished"]
    assert no_evaluator_left()


def test_cancelling_leaves_no_evaluator_running(tmp_path):
    hive = open_hive(write_hive(tmp_path, HEAVY.replace("@COUNT@", "8")))
    names = asyncio.run(hive.node_names())

    async def main() -> None:
        first = asyncio.Event()
        task = asyncio.create_task(
            evaluate(hive, names, EvalSettings(jobs=2), lambda _ev: first.set())
        )
        await asyncio.wait_for(first.wait(), 60)
        assert nix_evaluators()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert no_evaluator_left()


def test_builds_start_while_later_nodes_evaluate(tmp_path):
    # One worker: the first node's build must be done before the last node's evaluation.
    hive = open_hive(
        write_hive(
            tmp_path,
            MANY.replace("@COUNT@", "6").replace(
                'environment.etc."id".text = "node ${toString i}\\n";',
                'environment.etc."id".text = "node ${toString i} ${toString (builtins.length (builtins.genList (x: x) (i * 300000)))}\\n";',
            ),
        )
    )
    names = asyncio.run(hive.node_names())
    run = asyncio.run(evaluate_and_build(hive, names, EvalSettings(jobs=1), BuildSettings(jobs=2)))
    assert all(r.ok for r in run.nodes)
    first = next(r for r in run.nodes if r.name == "node-1")
    build = next(s for s in first.stages if s.stage.value == "build")
    assert build.started_at + build.seconds < run.evaluation.finished_at
    last = next(r for r in run.nodes if r.name == "node-6")
    assert build.started_at + build.seconds < last.stages[0].started_at + last.stages[0].seconds


UNEVEN = dear_nodes_hive(8, "i <= 4", 1500000)


def test_an_idle_worker_steals_the_tail_of_a_slow_queue(tmp_path):
    # Worker 1 gets the four dear nodes, worker 2 the four cheap ones. Worker 2 is done while
    # worker 1 is still on its first node (its cost is at least the time it has taken so
    # far): worker 2 takes the tail; worker 1's evaluator stops when it reaches it.
    hive = open_hive(write_hive(tmp_path, UNEVEN))
    names = asyncio.run(hive.node_names())
    seen: list[str] = []
    run = asyncio.run(evaluate(hive, names, EvalSettings(jobs=2), lambda ev: seen.append(ev.name)))
    assert not run.failed
    assert sorted(seen) == sorted(names)  # each once
    by_worker = {w: [n for p in run.processes if p.worker == w for n in p.names] for w in (1, 2)}
    assert "node-4" in by_worker[2], by_worker
    assert any(p.worker == 1 and p.why == "stolen" for p in run.processes), [
        (p.worker, p.names, p.why) for p in run.processes
    ]
