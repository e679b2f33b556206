"""Pushing a closure to a host: only the paths the host lacks.

Asks the host which paths of the closure are missing (`nix-store
--check-validity --print-invalid`, paths on stdin), optionally lets the host
substitute them from its own caches first, then streams `nix-store --export`
of the rest into `nix-store --import` over the host's SSH connection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from runner import nix, process
from runner.errors import WaggleError
from runner.hosts import Host


class PushError(WaggleError):
    exit_code = 1


@dataclass(frozen=True)
class PushResult:
    paths_total: int
    paths_sent: int
    bytes_sent: int
    seconds: float
    closure_bytes: int = 0

    def facts(self) -> tuple[tuple[str, int | float | str], ...]:
        return (
            ("paths_total", self.paths_total),
            ("paths_sent", self.paths_sent),
            ("bytes_sent", self.bytes_sent),
            ("closure_bytes", self.closure_bytes),
        )

    def describe(self) -> str:
        if not self.paths_sent:
            return f"nothing to copy ({self.paths_total} paths already there)"
        return f"{self.paths_sent} of {self.paths_total} paths, {self.bytes_sent / 2**20:.1f} MiB"


async def missing_paths(host: Host, paths: Sequence[str], *, timeout: float) -> list[str]:
    """The paths of `paths` that are not valid in the host's store, in the given order."""
    done = await host.run(
        ["xargs", "-r", "nix-store", "--check-validity", "--print-invalid"],
        input_data="".join(f"{p}\n" for p in paths).encode(),
        timeout=timeout,
    )
    if not done.ok:
        raise PushError(f"asking {host.name} for missing paths: {done.describe()}")
    invalid = set(done.stdout.split())
    return [p for p in paths if p in invalid]


async def push_closure(
    host: Host, root: str, *, substitute: bool = True, timeout: float = 3600.0
) -> PushResult:
    start = time.monotonic()
    deadline = start + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PushError(f"push to {host.name} timed out after {timeout:g} s")
        return left

    closure = await nix.closure(root)
    closure_bytes = await nix.closure_size(closure)
    missing = await missing_paths(host, closure, timeout=remaining())
    if missing and substitute:
        # Let the host fetch what its own substituters have; failures are fine,
        # whatever is still missing is sent below.
        await host.run(
            ["xargs", "-r", "nix-store", "--realise"],
            input_data="".join(f"{p}\n" for p in missing).encode(),
            timeout=remaining(),
        )
        missing = await missing_paths(host, missing, timeout=remaining())
    if not missing:
        return PushResult(len(closure), 0, 0, time.monotonic() - start, closure_bytes)
    sent = 0
    async with process.reading(["nix-store", "--export", *missing]) as exporter:
        stdout = exporter.stdout

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal sent
            while True:
                block = await stdout.read(256 * 1024)
                if not block:
                    return
                sent += len(block)
                yield block

        done = await host.run_fed(["nix-store", "--import"], chunks(), timeout=remaining())
        status, stderr = await exporter.wait()
    if status != 0:
        raise PushError(
            f"nix-store --export failed with exit status {status}: {stderr.strip()[-300:]}"
        )
    if not done.ok:
        raise PushError(f"nix-store --import on {host.name}: {done.describe()}")
    return PushResult(len(closure), len(missing), sent, time.monotonic() - start, closure_bytes)
