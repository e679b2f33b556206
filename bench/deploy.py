"""Benchmark: deploying to 1, 4, 16 and 32 local fleet hosts.

For each fleet size N (fresh hosts, empty stores each time) it times:
- `waggle apply switch --parallel N` (all hosts at once),
- `waggle apply switch --parallel 1` (one after another),
- a no-op re-deploy (must send zero paths and activate nothing),
- the floor: a minimal script running the same commands with perfect
  parallelism (one nix-instantiate for all nodes, then per host in parallel:
  nix-store --export | ssh nix-store --import, ssh nix-env --set, ssh
  switch-to-configuration), with OpenSSH.
and prints wall times and the ratios. Then, for the magic rollback (`--rollback-hosts N`,
default 32 hosts at once, best of `--repeat`):
- what a confirmed switch adds: `apply switch` against `apply switch --no-rollback`, each
  time to a new system on every host (the confirmations' new connections included), and the
  confirm stages' own seconds from the JSON report;
- what a rollback takes: every host's health check fails at once (the deployer asks for
  the rollback), and every host blocks new logins so that nobody can confirm (the hosts go
  back by themselves after `--confirm-timeout 2`): wall time, the rollback stages' seconds
  and the hosts' own time for it (the `host_seconds` fact).
Then, against Colmena's way (`--compare N`, default 32 fresh hosts, in one run): Waggle's
first deploy and no-op (`apply switch --parallel N`, defaults otherwise), Colmena-style
(`nix-copy-closure --to` then `ssh nix-env --set` and `ssh switch-to-configuration`, 10
hosts at a time, as Colmena's default parallelism) and the perfect-parallel floor above,
each on a plain fleet and on one whose hosts have a slow login shell (root's ~/.bashrc,
which bash reads for every SSH command, sleeps 50 ms: pyenv, conda or nvm cost that), plus
the evaluation alone (`waggle build` of the built hive). Needs root (the fleet).

    .venv/bin/python bench/deploy.py [--sizes 1,4,16,32] [--rollback-hosts 32] [--repeat 3]
        [--compare 32] [--cache [32]]

`--cache N`: a direct push against one through a binary cache (bench/cache_bench.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cache_bench import cache_bench
from tests.fleet import Fleet, free_first_octet

STANDIN = ROOT / "tests" / "fixtures" / "nixpkgs"
HIVE = """
let pkgs = import {standin} {{ }}; in
{{
  meta.nixpkgs = pkgs;
  defaults = {{ name, pkgs, ... }}: {{
    networking.hostName = name;
    environment.systemPackages = [ pkgs.hello pkgs.curl pkgs.jq ];
    environment.etc.motd.text = "bench ${{name}}\\n";
  }};
}} // builtins.listToAttrs (map (i: {{ name = "host${{toString i}}"; value = {{ }}; }}) (builtins.genList (i: i + 1) {count}))
"""
WAGGLE = [sys.executable, "-m", "runner"]
ROLLBACK_HIVE = """
let pkgs = import {standin} {{ }}; in
{{
  meta.nixpkgs = pkgs;
  defaults = {{ name, pkgs, ... }}: {{
    networking.hostName = name;
    environment.systemPackages = [ pkgs.hello pkgs.curl pkgs.jq ];
    environment.etc.release.text = "{release}";
    {extra}
  }};
}} // builtins.listToAttrs (map (i: {{ name = "host${{toString i}}"; value = {{ }}; }}) (builtins.genList (i: i + 1) {count}))
"""
FAILING_CHECK = (
    'deployment.healthChecks.cmd = [ { description = "never"; cmd = [ "false" ];'
    " period = 0.1; timeout = 0.1; } ];"
)


def timed(argv: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done


def evaluate(hive: Path) -> dict[str, str]:
    """Every node's system, evaluated in one nix-instantiate and realised (a cached build)."""
    import json

    expr = (
        f"let q = import {ROOT}/runner/hive/nix/query.nix "
        f"(import {ROOT}/runner/hive/nix/eval.nix {{ rawHive = import {hive}; }}); "
        "in builtins.listToAttrs (map (n: { name = n; value = q.evalOne n; }) q.nodeNames)"
    )
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", "-E", expr],
        capture_output=True,
        text=True,
        check=True,
    )
    systems = {n: v["out"] for n, v in json.loads(out.stdout).items()}
    subprocess.run(
        ["nix-store", "--realise", *[json.loads(out.stdout)[n]["drv"] for n in systems]],
        capture_output=True,
        check=True,
    )
    return systems


def floor(hive: Path, fleet: Fleet) -> float:
    """The same work by the simplest possible script, all hosts in parallel."""
    start = time.monotonic()
    systems = evaluate(hive)
    cfg = str(fleet.ssh_config)

    def one(name: str) -> None:
        p = systems[name]
        closure = subprocess.run(
            ["nix-store", "-qR", p], capture_output=True, text=True, check=True
        ).stdout.split()
        export = subprocess.Popen(["nix-store", "--export", *closure], stdout=subprocess.PIPE)
        subprocess.run(
            ["ssh", "-F", cfg, name, "nix-store", "--import"],
            stdin=export.stdout,
            capture_output=True,
            check=True,
        )
        export.wait()
        subprocess.run(
            ["ssh", "-F", cfg, name, "nix-env", "-p", "/nix/var/nix/profiles/system", "--set", p],
            capture_output=True,
            check=True,
        )
        subprocess.run(
            ["ssh", "-F", cfg, name, f"{p}/bin/switch-to-configuration", "switch"],
            capture_output=True,
            check=True,
        )

    with concurrent.futures.ThreadPoolExecutor(len(systems)) as pool:
        list(pool.map(one, systems))
    return time.monotonic() - start


SLOW_SHELL = "sleep 0.05\n"  # root's ~/.bashrc on the slow-shell fleet
COLMENA_PARALLEL = 10


def slow_shells(fleet: Fleet) -> None:
    """Every host's root gets a ~/.bashrc that sleeps 50 ms (each SSH command pays it)."""
    for name in fleet.names:
        (fleet[name].root / "root" / ".bashrc").write_text(SLOW_SHELL)


def colmena_style(hive: Path, fleet: Fleet) -> float:
    """Colmena's way with OpenSSH: the evaluation, then per host nix-copy-closure,
    nix-env --set and switch-to-configuration, each its own ssh; 10 hosts at a time."""
    cfg = str(fleet.ssh_config)
    env = {**os.environ, "NIX_SSHOPTS": f"-F {cfg}"}
    start = time.monotonic()
    systems = evaluate(hive)

    def one(name: str) -> None:
        p = systems[name]
        for argv in (
            ["nix-copy-closure", "--to", name, p],
            ["ssh", "-F", cfg, name, "nix-env", "-p", "/nix/var/nix/profiles/system", "--set", p],
            ["ssh", "-F", cfg, name, f"{p}/bin/switch-to-configuration", "switch"],
        ):
            subprocess.run(argv, capture_output=True, check=True, env=env)

    with concurrent.futures.ThreadPoolExecutor(COLMENA_PARALLEL) as pool:
        list(pool.map(one, systems))
    return time.monotonic() - start


def compare_bench(tmp: Path, n: int) -> None:
    """Waggle against Colmena-style and the floor on `n` fresh hosts, plain and slow-shell."""
    hive_dir = tmp / "compare"
    hive_dir.mkdir()
    hive = hive_dir / "hive.nix"
    hive.write_text(HIVE.format(standin=STANDIN, count=n))
    timed([*WAGGLE, "build"], hive_dir)  # built once, outside the timings
    evaluation, _ = timed([*WAGGLE, "build"], hive_dir)  # evaluation and a validity check
    rows: dict[str, dict[str, float]] = {}
    for variant in ("plain", "slow shell"):
        row = rows[variant] = {}
        for what in ("waggle", "colmena", "floor"):
            directory = tmp / f"fleet-{variant.replace(' ', '-')}-{what}"
            with Fleet.start(directory, n, first_octet=free_first_octet(n), etc="overlay") as f:
                if variant == "slow shell":
                    slow_shells(f)
                if what == "waggle":
                    argv = [*WAGGLE, "apply", "switch", "--ssh-config", str(f.ssh_config)]
                    argv += ["--parallel", str(n)]
                    row["waggle"], _ = timed(argv, hive_dir)
                    row["no-op"], done = timed(argv, hive_dir)
                    lines = [line for line in done.stdout.splitlines() if line.strip()]
                    assert all("\tunchanged\t" in line for line in lines), done.stdout
                elif what == "colmena":
                    row["colmena"] = colmena_style(hive, f)
                else:
                    row["floor"] = floor(hive, f)
    print(
        f"\n{n} fresh hosts, one run; evaluation alone (waggle build, cached): {evaluation:.2f} s"
    )
    print(
        f"{'fleet':<11} {'waggle s':>8} {'colmena-style s':>15} {'floor s':>8}"
        f" {'waggle/colmena':>14} {'no-op s':>8} {'no-op - eval':>12}"
    )
    for variant, r in rows.items():
        print(
            f"{variant:<11} {r['waggle']:>8.2f} {r['colmena']:>15.2f} {r['floor']:>8.2f}"
            f" {r['waggle'] / r['colmena']:>13.2f}x {r['no-op']:>8.2f} {r['no-op'] - evaluation:>11.2f}s"
        )
    slow, plain = rows["slow shell"], rows["plain"]
    print(
        f"slow shell / plain: waggle {slow['waggle'] / plain['waggle']:.2f}x,"
        f" no-op {slow['no-op'] / plain['no-op']:.2f}x (target <= 1.2x);"
        " waggle/colmena target <= 0.5x; no-op target <= evaluation + 1 s"
    )


def _stage_seconds(report: Path, stage: str, fact: str | None = None) -> list[float]:
    import json

    found = []
    for node in json.loads(report.read_text())["nodes"]:
        for s in node["stages"]:
            if s["stage"] == stage:
                found.append(float(s["facts"][fact]) if fact else float(s["seconds"]))
    return found


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"median {values[len(values) // 2]:.2f} s, max {values[-1]:.2f} s"


def rollback_bench(tmp: Path, n: int, repeat: int) -> None:
    """What the magic rollback costs on `n` hosts at once (see the module doc)."""
    hive_dir = tmp / "rollback"
    hive_dir.mkdir()
    hive = hive_dir / "hive.nix"

    def write(release: str, extra: str = "") -> None:
        hive.write_text(
            ROLLBACK_HIVE.format(standin=STANDIN, count=n, release=release, extra=extra)
        )
        timed([*WAGGLE, "build"], hive_dir)  # built outside the timings

    with Fleet.start(
        tmp / "fleet-rollback", n, first_octet=free_first_octet(n), etc="overlay"
    ) as f:
        base = ["apply", "switch", "--ssh-config", str(f.ssh_config), "--no-substitute"]
        base += ["--parallel", str(n)]
        write("first")
        timed([*WAGGLE, *base, "--no-rollback"], hive_dir)  # every host has a previous system
        plain: list[float] = []
        confirmed: list[float] = []
        confirm_stages: list[float] = []
        for i in range(repeat):
            write(f"plain-{i}")
            plain.append(timed([*WAGGLE, *base, "--no-rollback"], hive_dir)[0])
            write(f"confirmed-{i}")
            report = hive_dir / f"confirmed-{i}.json"
            confirmed.append(timed([*WAGGLE, *base, "--report-json", str(report)], hive_dir)[0])
            confirm_stages += _stage_seconds(report, "confirm")
        assert len(confirm_stages) == n * repeat, "every host must have been confirmed"
        added = min(confirmed) - min(plain)
        print(f"\nmagic rollback, {n} hosts at once (best of {repeat}):")
        print(
            f"  switch --no-rollback {min(plain):.2f} s, switch (confirmed) {min(confirmed):.2f} s:"
        )
        print(f"  a confirmed switch adds {added:.2f} s (target <= 0.5 s)")
        print(f"  confirm stages: {_spread(confirm_stages)}")
        for label, extra, flags in (
            ("a failed health check (rollback asked for)", FAILING_CHECK, []),
            ("no confirmation (logins blocked, confirm timeout 2 s)",
             "standin.activation.blockLogins = 60;", ["--confirm-timeout", "2"]),
        ):  # fmt: skip
            write(f"bad-{len(label)}", extra)
            report = hive_dir / f"bad-{len(label)}.json"
            argv = [*WAGGLE, *base, *flags, "--report-json", str(report)]
            start = time.monotonic()
            done = subprocess.run(argv, cwd=hive_dir, capture_output=True, text=True, check=False)
            wall = time.monotonic() - start
            assert done.returncode == 1, done.stdout + done.stderr
            rolled = _stage_seconds(report, "rollback")
            assert len(rolled) == n, done.stdout
            print(f"  rollback after {label}: the run took {wall:.2f} s;")
            print(f"    rollback stages {_spread(rolled)};")
            print(f"    on the hosts {_spread(_stage_seconds(report, 'rollback', 'host_seconds'))}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,4,16,32")
    parser.add_argument("--rollback-hosts", type=int, default=32, help="0: skip")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare", type=int, default=32, help="hosts; 0: skip")
    parser.add_argument("--cache", type=int, nargs="?", const=32, default=0, metavar="HOSTS",
                        help="also direct push vs a binary cache (default 32 hosts)")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("NIX_CONFIG", "substituters =")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",") if s.strip()):
            hive_dir = Path(tmp) / f"hive{n}"
            hive_dir.mkdir()
            hive = hive_dir / "hive.nix"
            hive.write_text(HIVE.format(standin=STANDIN, count=n))
            timed([*WAGGLE, "build"], hive_dir)  # systems built once, outside the timings
            result = {}
            for label, extra in (
                ("parallel", ["--parallel", str(n)]),
                ("serial", ["--parallel", "1"]),
            ):
                with Fleet.start(
                    Path(tmp) / f"fleet-{n}-{label}",
                    n,
                    first_octet=free_first_octet(n),
                    etc="overlay",
                ) as fleet:
                    cfg = ["--ssh-config", str(fleet.ssh_config), "--no-substitute"]
                    result[label], _ = timed([*WAGGLE, "apply", "switch", *cfg, *extra], hive_dir)
                    if label == "parallel":
                        result["noop"], done = timed(
                            [*WAGGLE, "apply", "switch", *cfg, *extra], hive_dir
                        )
                        lines = [line for line in done.stdout.splitlines() if line.strip()]
                        assert all("\tunchanged\t" in line for line in lines), done.stdout
                        assert done.stderr.count("nothing to copy") == n, done.stderr
            with Fleet.start(
                Path(tmp) / f"fleet-{n}-floor", n, first_octet=free_first_octet(n), etc="overlay"
            ) as fleet:
                result["floor"] = floor(hive, fleet)
            rows.append((n, result))
    one_host = rows[0][1]["parallel"] if rows and rows[0][0] == 1 else None
    print(
        f"{'hosts':>5} {'parallel s':>10} {'serial s':>9} {'no-op s':>8} {'floor s':>8} {'vs floor':>9} {'vs 1 host':>9}"
    )
    for n, r in rows:
        vs_one = f"{r['parallel'] / one_host:.2f}x" if one_host else "-"
        print(
            f"{n:>5} {r['parallel']:>10.2f} {r['serial']:>9.2f} {r['noop']:>8.2f} {r['floor']:>8.2f} "
            f"{r['parallel'] / r['floor']:>8.2f}x {vs_one:>9}"
        )
    if args.compare > 0:
        with tempfile.TemporaryDirectory() as tmp:
            compare_bench(Path(tmp), args.compare)
    if args.rollback_hosts > 0:
        with tempfile.TemporaryDirectory() as tmp:
            rollback_bench(Path(tmp), args.rollback_hosts, args.repeat)
    if args.cache > 0:
        with tempfile.TemporaryDirectory() as tmp:
            cache_bench(Path(tmp), args.cache)


if __name__ == "__main__":
    main()
