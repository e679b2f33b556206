"""The chunk planner (unit) and chunked evaluation with real nix."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runner.build import BuildSettings, evaluate_and_build
from runner.evaluate import (
    ChunkStat,
    CostModel,
    EvalSettings,
    GiB,
    MemoryBudget,
    MiB,
    Planner,
    cgroup_room,
    fit_polynomial,
    parse_size,
)
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.nix import NixFlags
from tests.conftest import write_hive


def budget(size: int) -> MemoryBudget:
    return MemoryBudget(available=size, cgroup_room=None, reserve=0, budget=size)


def chunk(k: int, seconds, mem) -> ChunkStat:
    points = tuple((i, seconds(i), int(mem(i))) for i in range(1, k + 1))
    return ChunkStat(tuple(f"n{i}" for i in range(k)), seconds(k), int(mem(k)), True, points)


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


def test_fit_polynomial_recovers_coefficients():
    pts = [(float(x), 1 + 0.5 * x + 0.25 * x * x) for x in range(1, 8)]
    c = fit_polynomial(pts, 2)
    assert c is not None
    assert c == pytest.approx([1, 0.5, 0.25], abs=1e-6)


def test_first_chunks_are_small_probes():
    planner = Planner(EvalSettings(jobs=2), budget(20 * GiB), 64)
    assert planner.next_size(64) == 2
    assert planner.next_size(2, running=1) == 2
    assert planner.next_size(3, running=1) == 2


def test_shared_startup_cost_favours_big_chunks():
    # Startup dominates (as with nixpkgs parsed once per process): big steps up.
    planner = Planner(EvalSettings(jobs=2), budget(20 * GiB), 64)
    planner.model.observe(chunk(4, lambda i: 1.0 + 0.05 * i, lambda i: 100 * MiB + 10 * MiB * i))
    assert planner.model.growth_cap() == 16
    assert planner.next_size(56) == 16
    planner.model.observe(chunk(14, lambda i: 1.0 + 0.05 * i, lambda i: 100 * MiB + 10 * MiB * i))
    assert planner.next_size(28) == 14  # the rest in one round on both cores


def test_linear_cost_grows_chunks_step_by_step():
    planner = Planner(EvalSettings(jobs=2), budget(20 * GiB), 64)
    planner.model.observe(chunk(2, lambda i: 0.02 + 0.2 * i, lambda i: 100 * MiB * i))
    assert planner.model.growth_cap() == 4
    # Hardly any start-up cost: bigger chunks gain little, so stay small.
    assert planner.next_size(60) == 2


def test_growing_heap_favours_small_chunks():
    # Per-node cost grows with the heap (GC): small chunks on both cores.
    planner = Planner(EvalSettings(jobs=2), budget(20 * GiB), 64)
    planner.model.observe(chunk(4, lambda i: 0.05 + 0.3 * i + 0.2 * i * i, lambda i: 50 * MiB * i))
    assert planner.next_size(56) == 1


def test_memory_budget_bounds_chunk_size():
    planner = Planner(EvalSettings(jobs=2), budget(1 * GiB), 64)
    planner.model.observe(chunk(4, lambda i: 1.0 + 0.01 * i, lambda i: 200 * MiB * i))
    size = planner.next_size(60)
    assert planner.model.memory(size) <= 1 * GiB
    assert size <= 5


def test_unmeasured_default_is_conservative():
    model = CostModel()
    assert model.memory(4) == 4 * 512 * MiB
    planner = Planner(EvalSettings(jobs=2), budget(1 * GiB), 10)
    assert planner.next_size(10) == 2


def test_explicit_limits():
    assert Planner(EvalSettings(node_limit=3), budget(GiB), 20).next_size(20) == 3
    assert Planner(EvalSettings(node_limit=0), budget(GiB), 20).next_size(20) == 20


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


def test_twenty_nodes_build_in_chunks_of_three(tmp_path):
    hive = open_hive(write_hive(tmp_path, MANY.replace("@COUNT@", "20")))
    names = asyncio.run(hive.node_names())
    assert len(names) == 20
    run = asyncio.run(
        evaluate_and_build(hive, names, EvalSettings(node_limit=3), BuildSettings(jobs=2))
    )
    sizes = sorted(len(c.names) for c in run.evaluation.chunks)
    assert sizes == [2] + [3] * 6
    assert all(c.peak_rss > 0 for c in run.evaluation.chunks)
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


@pytest.mark.parametrize("limit", [0, 4])
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


def test_auto_planner_measures_memory_and_time(tmp_path):
    hive = open_hive(write_hive(tmp_path, MANY.replace("@COUNT@", "12")))
    names = asyncio.run(hive.node_names())
    run = asyncio.run(evaluate_and_build(hive, names, EvalSettings(), None))
    assert all(r.ok for r in run.nodes)
    first = run.evaluation.chunks[0]
    assert len(first.names) <= 2
    # One trace point per node, memory sampled at each.
    assert len(first.points) == len(first.names)
    assert all(rss > 0 for _, _, rss in first.points)
    assert run.evaluation.peak_rss_total <= run.evaluation.budget.budget


def test_builds_start_while_later_chunks_evaluate(tmp_path):
    # One evaluator, chunks of 2: the first chunk's builds must be under way
    # (indeed done) before the last chunk's evaluation has finished.
    hive = open_hive(
        write_hive(
            tmp_path,
            MANY.replace("@COUNT@", "8").replace(
                'environment.etc."id".text = "node ${toString i}\\n";',
                'environment.etc."id".text = "node ${toString i} ${toString (builtins.length (builtins.genList (x: x) (i * 60000)))}\\n";',
            ),
        )
    )
    names = asyncio.run(hive.node_names())
    run = asyncio.run(
        evaluate_and_build(hive, names, EvalSettings(node_limit=2, jobs=1), BuildSettings(jobs=2))
    )
    assert all(r.ok for r in run.nodes)
    first_chunk = run.evaluation.chunks[0].names
    builds = [
        s for r in run.nodes if r.name in first_chunk for s in r.stages if s.stage.value == "build"
    ]
    assert len(builds) == 2
    assert all(b.started_at + b.seconds < run.evaluation.finished_at for b in builds)
