"""Benchmark: Waggle's closure push against nix-copy-closure.

Builds one system with the stand-in, then copies its closure to fresh fleet
hosts (empty stores) with (a) Waggle's push (missing paths asked over the
host's asyncssh connection, `nix-store --export` streamed into
`nix-store --import`) and (b) `nix-copy-closure --to` (OpenSSH). Prints the
best of `--repeat` runs of each. Needs root (the fleet).

    .venv/bin/python bench/push.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.deploy.push import push_closure
from runner.hosts.ssh import SshHost, SshSettings, SshTarget
from tests.fleet import Fleet, free_first_octet

SYSTEM = (
    f"(import {ROOT}/tests/fixtures/nixpkgs/nixos/lib/eval-config.nix {{ modules = [ ({{ pkgs, ... }}: {{"
    ' networking.hostName = "bench"; environment.systemPackages = with pkgs; [ hello curl jq git nginx htop'
    # 64 MiB of incompressible data, so bytes matter as well as round trips
    ' (runCommand "blob-1.0" { } "mkdir -p $out/share; head -c 67108864 /dev/urandom > $out/share/blob") ];'
    " }) ]; }).config.system.build.toplevel"
)


async def waggle_push(fleet: Fleet, name: str, path: str) -> tuple[float, int]:
    host = SshHost(
        SshTarget(name, name, user="root"), SshSettings(config_files=(str(fleet.ssh_config),))
    )
    start = time.monotonic()
    result = await push_closure(host, path, substitute=False)
    seconds = time.monotonic() - start
    await host.close()
    return seconds, result.paths_sent


def copy_closure(fleet: Fleet, name: str, path: str) -> float:
    start = time.monotonic()
    subprocess.run(
        ["nix-copy-closure", "--to", name, path],
        env={**os.environ, "NIX_SSHOPTS": f"-F {fleet.ssh_config}"},
        check=True,
        capture_output=True,
    )
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("NIX_CONFIG", "substituters =")
    path = subprocess.run(
        ["nix-build", "--no-out-link", "-E", SYSTEM], capture_output=True, text=True, check=True
    ).stdout.strip()
    closure = subprocess.run(
        ["nix-store", "-qR", path], capture_output=True, text=True, check=True
    ).stdout.split()
    size = int(
        subprocess.run(
            ["du", "-sbc", *closure], capture_output=True, text=True, check=True
        ).stdout.split()[-2]
    )
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores; closure: {len(closure)} paths, {size / 2**20:.1f} MiB"
    )
    times: dict[str, list[float]] = {"waggle push": [], "nix-copy-closure": []}
    with tempfile.TemporaryDirectory() as tmp:
        n = 2 * args.repeat
        with Fleet.start(Path(tmp), n, first_octet=free_first_octet(n), etc="overlay") as fleet:
            names = fleet.names
            for i in range(args.repeat):
                seconds, sent = asyncio.run(waggle_push(fleet, names[2 * i], path))
                assert sent == len(closure)
                times["waggle push"].append(seconds)
                times["nix-copy-closure"].append(copy_closure(fleet, names[2 * i + 1], path))
    best = {k: min(v) for k, v in times.items()}
    for label, seconds in best.items():
        print(f"{label:>18}: {seconds:.3f} s (best of {args.repeat})")
    print(f"ratio waggle/nix-copy-closure: {best['waggle push'] / best['nix-copy-closure']:.2f}")


if __name__ == "__main__":
    main()
