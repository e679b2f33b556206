"""Pushing a closure to a host: only the paths the host lacks.

Asks the host which paths of the closure are missing (`nix-store
--check-validity --print-invalid`, paths on stdin), optionally lets the host
substitute them from its own caches first, then streams `nix-store --export`
of the rest into `nix-store --import` over the host's SSH connection.

Every step is bounded by the push timeout. The host's substitution is bounded
on its own as well (short connect and stall timeouts, one attempt per file, a
time limit enforced on the host with `timeout`), and it is only asked for the
paths a binary cache can have: not derivations, and not paths built on this
machine (`ultimate` in the local store) that carry neither a signature nor a
content address. Those were built here because no cache had them, and no cache
can serve them unless someone signed and uploaded this very build. Whatever the
host could not substitute is pushed.

When the import on the host ends before it took the whole stream (a full or
read-only store, a rejected path) or the push times out, the local exporter is
killed rather than waited for: it would be blocked writing into a full pipe.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from runner import nix, process
from runner.errors import WaggleError
from runner.hosts import Host

SUBSTITUTE_TIMEOUT = 120.0
"""Seconds the host's own substitution may take at most (within the push timeout)."""

SUBSTITUTE_OPTIONS = (
    # An unreachable or firewalled cache: give up connecting after 3 s (Nix: no limit).
    *("--option", "connect-timeout", "3"),
    # A cache that accepts and never answers: 5 s without a byte (Nix: 300 s).
    *("--option", "stalled-download-timeout", "5"),
    # One try per file (Nix: 5, with backoff, about 4 s for a refused connection).
    # A file that fails is pushed instead.
    *("--option", "download-attempts", "1"),
    "--keep-going",
)

PATH_INFO = ("nix", "--extra-experimental-features", "nix-command", "path-info", "--json")

KILL_GRACE = 3
"""Seconds the host's `timeout` waits after SIGTERM before it sends SIGKILL."""

EXPORT_GRACE = 10.0
"""Seconds the local exporter may take to exit once the host imported everything."""


class PushError(WaggleError):
    exit_code = 1


Fact = tuple[str, int | float | str]


@dataclass(frozen=True)
class PushResult:
    paths_total: int
    paths_sent: int
    bytes_sent: int
    seconds: float
    closure_bytes: int = 0
    substitute_seconds: float = 0.0  # the host's own substitution (0 when skipped)
    paths_substituted: int = 0  # missing paths the host fetched from its own caches

    def facts(self, *, closure: bool = True) -> tuple[Fact, ...]:
        """The report facts; without `closure_bytes` when the closure is not the system's."""
        size: tuple[Fact, ...] = (("closure_bytes", self.closure_bytes),) if closure else ()
        return (
            ("paths_total", self.paths_total),
            ("paths_sent", self.paths_sent),
            ("bytes_sent", self.bytes_sent),
            *size,
            ("substitute_seconds", round(self.substitute_seconds, 3)),
            ("paths_substituted", self.paths_substituted),
        )

    def describe(self) -> str:
        if not self.paths_sent:
            text = f"nothing to copy ({self.paths_total} paths already there)"
        else:
            text = (
                f"{self.paths_sent} of {self.paths_total} paths, {self.bytes_sent / 2**20:.1f} MiB"
            )
        if self.paths_substituted:
            text += f", {self.paths_substituted} from the host's caches"
        return text


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


async def cacheable(paths: Sequence[str], *, timeout: float = 120) -> list[str]:
    """The paths of `paths` a binary cache may have, in the given order.

    Left out: derivations (caches serve outputs), and outputs built on this machine that
    are neither signed nor content-addressed (`nix path-info`: `ultimate`, no `signatures`,
    no `ca`). Substituted, imported, added and fixed-output paths stay. If the local
    store cannot say (a Nix without `path-info`), every output stays.
    """
    outputs = [p for p in paths if not p.endswith(".drv")]
    if not outputs:
        return []
    try:
        done = await process.run([*PATH_INFO, *outputs], timeout=timeout)
    except OSError:  # e.g. an argument list too long for this system
        return outputs
    if not done.ok:
        return outputs
    try:
        data: Any = json.loads(done.stdout)
    except json.JSONDecodeError:
        return outputs
    # A list of objects with "path" (Nix 2.8), or an object keyed by path (later Nix).
    items = data.items() if isinstance(data, dict) else ((i.get("path"), i) for i in data)
    built_here = {
        path
        for path, info in items
        if isinstance(info, dict)
        and info.get("ultimate")
        and not info.get("signatures")
        and not info.get("ca")
    }
    return [p for p in outputs if p not in built_here]


async def _substitute(host: Host, paths: Sequence[str], *, budget: float) -> float:
    """Let the host fetch `paths` from its own substituters within `budget`; the seconds taken.

    Failures are fine: what is still missing is pushed. The time limit is enforced on the
    host (`timeout` kills the substitution, so no stray `nix-store` holds path locks that
    the import would wait for); the local limit only catches a host that does not answer.
    """
    start = time.monotonic()
    limit = max(1, int(budget) - KILL_GRACE - 1)
    await host.run(
        [
            *("timeout", "-k", str(KILL_GRACE), str(limit)),
            *("xargs", "-r", "nix-store", "--realise", *SUBSTITUTE_OPTIONS),
        ],
        input_data="".join(f"{p}\n" for p in paths).encode(),
        timeout=budget,
    )
    return time.monotonic() - start


async def push_closure(
    host: Host,
    root: str,
    *,
    substitute: bool = True,
    timeout: float = 3600.0,
    substitute_timeout: float = SUBSTITUTE_TIMEOUT,
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
    substitute_seconds, substituted = 0.0, 0
    if missing and substitute:
        candidates = await cacheable(missing)
        if candidates:
            budget = min(substitute_timeout, remaining())
            substitute_seconds = await _substitute(host, candidates, budget=budget)
            still = await missing_paths(host, missing, timeout=remaining())
            substituted = len(missing) - len(still)
            missing = still

    def result(sent_paths: int, sent_bytes: int) -> PushResult:
        return PushResult(
            len(closure),
            sent_paths,
            sent_bytes,
            time.monotonic() - start,
            closure_bytes,
            substitute_seconds,
            substituted,
        )

    if not missing:
        return result(0, 0)
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
        if done.ok:  # the import took the whole stream: the exporter is ending
            status, stderr = await exporter.wait(timeout=EXPORT_GRACE)
        else:  # the exporter may be blocked writing into a full pipe: never wait for it
            status, stderr = await exporter.kill()
    if status > 0:  # the exporter failed by itself: that is why the import failed, if it did
        raise PushError(
            f"nix-store --export failed with exit status {status}: {stderr.strip()[-300:]}"
        )
    if done.timed_out:
        raise PushError(f"push to {host.name} timed out after {timeout:g} s")
    if not done.ok:
        raise PushError(f"nix-store --import on {host.name}: {done.describe()}")
    if status != 0:
        raise PushError(f"nix-store --export did not end within {EXPORT_GRACE:g} s")
    return result(len(missing), sent)
