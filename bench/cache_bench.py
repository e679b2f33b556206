"""Benchmark part: deploying through a binary cache against a direct push (`bench/deploy.py
--cache N`).

N fresh fleet hosts; a hive of N nodes whose systems share a 64 MiB blob (random, so no
compression helps) and differ in a small part of their own. Each round builds a new blob
(so nothing is on the hosts or in the cache yet), builds the systems, then times `waggle
apply switch --parallel N`: once pushing directly, once with `--cache file://DIR` (signed)
and the hosts fetching from that directory served over HTTP on 127.0.0.1 by a separate
`python -m http.server` process. Bytes leaving the deployer: the push stages' `bytes_sent`
plus, with the cache, `run.cache_bytes_uploaded` (from the JSON report).

Targets: bytes leaving the deployer with the cache at most 1.1x one closure (against N
closures direct), wall time no worse than the direct push.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.binary_cache import BinaryCache
from tests.fleet import Fleet, free_first_octet

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "fixtures" / "nixpkgs"
HIVE = """
let
  pkgs = import {standin} {{ }};
  blob = pkgs.runCommand "bench-blob-{unique}" {{ }} ''
    mkdir -p $out/share; head -c 67108864 /dev/urandom > $out/share/blob
  '';
in
{{
  meta.nixpkgs = pkgs;
  defaults = {{ name, ... }}: {{
    networking.hostName = name;
    environment.etc.blob.source = blob;
    environment.etc.own.text = "${{name}} {unique}\\n";
  }};
}} // builtins.listToAttrs (map (i: {{ name = "host${{toString i}}"; value = {{ }}; }})
  (builtins.genList (i: i + 1) {count}))
"""


def _waggle(cwd: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    took = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"waggle {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return took, done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _round(tmp: Path, fleet: Fleet, n: int, cache: BinaryCache | None) -> dict[str, Any]:
    hive_dir = tmp / f"hive-{uuid.uuid4().hex[:8]}"
    hive_dir.mkdir()
    unique = uuid.uuid4().hex[:12]
    (hive_dir / "hive.nix").write_text(HIVE.format(standin=STANDIN, unique=unique, count=n))
    _waggle(hive_dir, "build")  # builds are not timed
    report = hive_dir / "report.json"
    args = ["apply", "switch", "-p", str(n), "--ssh-config", str(fleet.ssh_config)]
    args += ["--report-json", str(report)]
    server = None
    if cache is not None:
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
            cwd=cache.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        args += ["--cache", f"{cache.file_url}?compression=none"]
        args += ["--cache-substituter", f"http://127.0.0.1:{port}"]
        args += ["--cache-key", str(cache.secret_key), "--cache-public-key", cache.public_key]
    try:
        seconds, _ = _waggle(hive_dir, *args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    data = json.loads(report.read_text())
    pushes = [s for node in data["nodes"] for s in node["stages"] if s["stage"] == "push"]
    direct = sum(int(s["facts"].get("bytes_sent", 0)) for s in pushes)
    uploaded = data["run"].get("cache_bytes_uploaded") or 0
    closure = max(int(s["facts"].get("closure_bytes", 0)) for s in pushes)
    fell_back = sum(1 for s in pushes if str(s["facts"].get("cache", "used")) != "used")
    return {
        "seconds": seconds,
        "direct": direct,
        "uploaded": uploaded,
        "closure": closure,
        "fell_back": fell_back,
    }


def cache_bench(tmp: Path, n: int, repeat: int = 1) -> None:
    os.environ.setdefault("NIX_CONFIG", "substituters =")
    with Fleet.start(tmp / "fleet-cache", n, first_octet=free_first_octet(n, 60)) as fleet:
        best: dict[str, dict[str, Any]] = {}
        for _ in range(max(1, repeat)):
            for label in ("direct", "cache"):
                cache = BinaryCache.create(tmp / f"cache-{uuid.uuid4().hex[:8]}")
                r = _round(tmp, fleet, n, cache if label == "cache" else None)
                if label not in best or r["seconds"] < best[label]["seconds"]:
                    best[label] = r
    mib = 2**20
    print(f"\n{n} hosts, a {best['direct']['closure'] / mib:.0f} MiB closure each (64 MiB shared)")
    print(f"{'push':>7} {'wall s':>7} {'direct MiB':>11} {'to cache MiB':>13} {'leaving MiB':>12}"
          f" {'vs 1 closure':>13} {'fallbacks':>9}")  # fmt: skip
    for label in ("direct", "cache"):
        r = best[label]
        leaving = r["direct"] + r["uploaded"]
        print(f"{label:>7} {r['seconds']:>7.2f} {r['direct'] / mib:>11.1f} {r['uploaded'] / mib:>13.1f}"
              f" {leaving / mib:>12.1f} {leaving / r['closure']:>12.2f}x {r['fell_back']:>9}")  # fmt: skip
    cached, direct = best["cache"], best["direct"]
    bytes_ratio = (cached["direct"] + cached["uploaded"]) / cached["closure"]
    time_ratio = cached["seconds"] / direct["seconds"]
    print(
        f"cache: {bytes_ratio:.2f}x one closure leaves the deployer (target <= 1.10: "
        f"{'ok' if bytes_ratio <= 1.10 else 'MISSED TARGET'}); wall {time_ratio:.2f}x the direct "
        f"push (target <= 1.00: {'ok' if time_ratio <= 1.0 else 'MISSED TARGET'})"
    )
