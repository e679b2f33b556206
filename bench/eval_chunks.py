"""Benchmark: evaluation chunk size 1 vs auto vs all-in-one.

Generates hives of 8, 32 and 64 nodes whose nodes share a deliberately heavy
module set from the nixpkgs stand-in (nixos/modules/bench-heavy.nix), then
evaluates every node's toplevel with `--eval-node-limit 1`, `auto` and `0`
through Waggle's evaluator and prints wall time, peak memory (sum of the
evaluator process trees running at once) and the ratio to the fastest setting.

    .venv/bin/python bench/eval_chunks.py [--sizes 8,32,64] [--repeat 1]

Target: auto within 10% of the fastest setting, its peak inside its budget.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.evaluate import EvalSettings, evaluate
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.nix import NixFlags

STANDIN = ROOT / "tests" / "fixtures" / "nixpkgs"

HIVE = """
let
  pkgs = import {standin} {{ }};
  node = i: {{
    name = "node-${{toString i}}";
    value = {{ name, ... }}: {{
      imports = [ {standin}/nixos/modules/bench-heavy.nix ];
      networking.hostName = name;
      environment.etc."node-id".text = "node ${{toString i}}\\n";
    }};
  }};
in
{{ meta.nixpkgs = pkgs; }} // builtins.listToAttrs (map node (builtins.genList (i: i + 1) {count}))
"""

SETTINGS = {
    "1": EvalSettings(node_limit=1),
    "auto": EvalSettings(),
    "all": EvalSettings(node_limit=0),
}


async def measure(
    hive: Hive, names: list[str], settings: EvalSettings
) -> tuple[float, int, int, int]:
    start = time.monotonic()
    run = await evaluate(hive, names, settings)
    seconds = time.monotonic() - start
    if run.failed:
        raise SystemExit(f"evaluation failed for {run.failed}")
    return seconds, run.peak_rss_total, run.budget.budget, len(run.chunks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="8,32,64")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting; the best counts")
    args = parser.parse_args()
    os.environ.setdefault("NIX_CONFIG", "substituters =")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"hive-{count}.nix"
            path.write_text(HIVE.format(standin=STANDIN, count=count))
            hive = Hive(locate(str(path), Path(tmp)), NixFlags())
            names = asyncio.run(hive.node_names())
            results = {}
            for label, settings in SETTINGS.items():
                best = None
                for _ in range(args.repeat):
                    r = asyncio.run(measure(hive, names, settings))
                    best = r if best is None or r[0] < best[0] else best
                assert best is not None
                results[label] = best
            fastest = min(r[0] for r in results.values())
            for label, (seconds, peak, budget, chunks) in results.items():
                rows.append((count, label, seconds, peak, budget, chunks, seconds / fastest))
    print(
        f"{'nodes':>5} {'limit':>5} {'wall s':>7} {'peak MiB':>9} {'procs':>5} {'vs fastest':>10}"
    )
    for count, label, seconds, peak, budget, chunks, ratio in rows:
        flag = ""
        if label == "auto":
            flag = "  ok" if ratio <= 1.10 and peak <= budget else "  MISSED TARGET"
        print(
            f"{count:>5} {label:>5} {seconds:>7.2f} {peak / 2**20:>9.0f} {chunks:>5} {ratio:>9.2f}x{flag}"
        )


if __name__ == "__main__":
    main()
