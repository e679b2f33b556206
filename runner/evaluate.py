"""Evaluation in RAM-sized chunks.

Nodes are evaluated to their toplevel drvPath/outPath, many per `nix-instantiate`
process. The planner decides how many nodes go into each process and how many
processes run at once:

- The memory budget is the available memory (psutil), capped by the cgroup v2
  limit, minus a reserve; `--eval-memory` overrides it.
- While a chunk runs, Waggle samples the evaluator's process tree (RSS) and
  reads a trace line per finished node, so each chunk yields points
  (node index, seconds, bytes). From all points so far the planner fits
  time(k) = startup + a*k + c*k^2 and memory(k) = base + m*k, starting from a
  conservative 512 MiB per node, and picks the chunk size that finishes the
  remaining nodes soonest on the available cores within the budget.
- A chunk whose process fails is split in two and retried, so a broken node
  fails alone with its own Nix error while the others still evaluate; a node
  whose evaluation throws (caught by tryEval) is re-evaluated alone for its
  message.

Results are handed to a callback as soon as each chunk finishes, so builds of
finished chunks run while later chunks evaluate.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from runner import nix
from runner.hive.hive import Hive
from runner.process import Completed

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_RESERVE = 1 * GiB
DEFAULT_NODE_MEMORY = 512 * MiB  # before anything is measured (Colmena's guess)
MIN_BUDGET = 256 * MiB
PROBE_CHUNK = 2  # first chunks stay small until time and memory are measured
DONE_MARK = "trace: waggle-node-done "


# -- memory budget -----------------------------------------------------------


def cgroup_room(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Smallest (memory.max - memory.current) over this process's cgroup v2 ancestry."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None
    best: int | None = None
    directory = root / rel.lstrip("/")
    while True:
        try:
            limit = (directory / "memory.max").read_text().strip()
            if limit != "max":
                current = int((directory / "memory.current").read_text().strip())
                room = max(0, int(limit) - current)
                best = room if best is None else min(best, room)
        except (OSError, ValueError):
            pass
        if directory == root or directory.parent == directory:
            return best
        directory = directory.parent


@dataclass(frozen=True)
class MemoryBudget:
    available: int
    cgroup_room: int | None
    reserve: int
    budget: int
    overridden: bool = False

    @classmethod
    def measure(cls, override: int | None = None, reserve: int = DEFAULT_RESERVE) -> MemoryBudget:
        available = psutil.virtual_memory().available
        room = cgroup_room()
        if override is not None:
            return cls(available, room, 0, override, overridden=True)
        usable = available if room is None else min(available, room)
        return cls(available, room, reserve, max(MIN_BUDGET, usable - reserve))


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '2048' (MiB) -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t) * MiB
    except ValueError as e:
        raise ValueError(f"{text!r} is not a size like 4G or 512M") from e
    if value <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    return int(value)


# -- settings, results ---------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    node_limit: int | None = None  # None: auto; 0: all nodes in one chunk; N: N per chunk
    memory: int | None = None  # --eval-memory override of the budget, bytes
    jobs: int = 0  # concurrent evaluator processes; 0: one per core
    timeout: float = 1800.0  # per evaluator process


@dataclass(frozen=True)
class NodeEval:
    name: str
    drv_path: str | None
    out_path: str | None
    error: str | None  # one line
    detail: str  # Nix's full message on failure
    seconds: float
    started_at: float = 0.0  # epoch seconds when its evaluator started

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ChunkStat:
    names: tuple[str, ...]
    seconds: float
    peak_rss: int
    ok: bool
    points: tuple[tuple[int, float, int], ...]  # (node index from 1, seconds, rss)


@dataclass(frozen=True)
class EvalRun:
    results: dict[str, NodeEval]
    chunks: tuple[ChunkStat, ...]
    budget: MemoryBudget
    peak_rss_total: int  # highest sum of concurrently running evaluators
    finished_at: float  # epoch seconds when the last evaluator ended

    @property
    def failed(self) -> list[str]:
        return [n for n, r in self.results.items() if not r.ok]


# -- the cost model and planner ------------------------------------------------


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    n = len(rhs)
    a = [[*row, rhs[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit_polynomial(points: Sequence[tuple[float, float]], degree: int) -> list[float] | None:
    """Least-squares coefficients [c0, c1, ...] of y = c0 + c1 x + c2 x^2."""
    size = degree + 1
    matrix = [[sum(x ** (i + j) for x, _ in points) for j in range(size)] for i in range(size)]
    rhs = [sum(y * x**i for x, y in points) for i in range(size)]
    return _solve(matrix, rhs)


@dataclass
class CostModel:
    """What one evaluator process costs for k nodes, learnt from chunks so far."""

    time_points: list[tuple[float, float]] = field(default_factory=list)
    mem_points: list[tuple[float, float]] = field(default_factory=list)
    peaks: list[tuple[int, int]] = field(default_factory=list)
    startup: float = 0.0
    per_node: float = 1.0
    growth: float = 0.0
    mem_base: float = 0.0
    mem_per_node: float = float(DEFAULT_NODE_MEMORY)
    measured: bool = False
    largest: int = 0  # the biggest chunk measured so far

    def growth_cap(self) -> int:
        """The biggest chunk worth trying next.

        Costs that grow with the heap only show in chunks big enough to have
        one, so sizes grow step by step: twice the biggest measured chunk, or
        four times when the process start dominates (as when many shared files
        are parsed once per process) and each extra step costs a start.
        """
        factor = 4 if self.startup >= self.per_node * self.largest else 2
        return max(1, self.largest * factor)

    def observe(self, stat: ChunkStat) -> None:
        self.largest = max(self.largest, len(stat.names))
        if stat.points:
            self.time_points += [(float(i), t) for i, t, _ in stat.points]
            self.mem_points += [(float(i), float(r)) for i, _, r in stat.points if r > 0]
        if stat.peak_rss > 0:
            self.peaks.append((len(stat.names), stat.peak_rss))
        self._refit()

    def _refit(self) -> None:
        xs = {x for x, _ in self.time_points}
        if not xs:
            return
        self.measured = True
        coeffs = None
        if len(xs) >= 3:
            quadratic = fit_polynomial(self.time_points, 2)
            if quadratic is not None and quadratic[2] >= 0:
                coeffs = quadratic
        if coeffs is None and len(xs) >= 2:
            linear = fit_polynomial(self.time_points, 1)
            coeffs = [*linear, 0.0] if linear is not None else None
        if coeffs is None:  # only single-node chunks: no way to split startup from work
            mean = sum(y for _, y in self.time_points) / len(self.time_points)
            coeffs = [0.0, mean, 0.0]
        self.startup, self.per_node, self.growth = (max(0.0, c) for c in coeffs)
        self.per_node = max(self.per_node, 1e-3)
        # Memory: slope from the samples, then raised so every observed peak fits.
        mxs = {x for x, _ in self.mem_points}
        slope = None
        if len(mxs) >= 2:
            lin = fit_polynomial(self.mem_points, 1)
            slope = lin[1] if lin is not None else None
        if slope is None or slope <= 0:
            slope = max((p / k for k, p in self.peaks), default=float(DEFAULT_NODE_MEMORY))
        self.mem_per_node = max(slope, 1.0 * MiB)
        self.mem_base = max((p - self.mem_per_node * k for k, p in self.peaks), default=0.0)
        self.mem_base = max(self.mem_base, 0.0)

    def seconds(self, k: int) -> float:
        return self.startup + self.per_node * k + self.growth * k * k

    def memory(self, k: int) -> float:
        return self.mem_base + self.mem_per_node * k


@dataclass
class Planner:
    settings: EvalSettings
    budget: MemoryBudget
    total: int
    model: CostModel = field(default_factory=CostModel)

    @property
    def workers(self) -> int:
        return self.settings.jobs or (os.cpu_count() or 1)

    def fits_alongside(self, size: int, running_memory: float) -> bool:
        """Whether a chunk of `size` may start next to what is running now."""
        return running_memory + self.model.memory(size) <= self.budget.budget

    def next_size(self, remaining: int, running: int = 0) -> int:
        """Nodes for the next chunk, with `running` evaluators already busy."""
        limit = self.settings.node_limit
        if limit is not None:
            return remaining if limit == 0 else min(limit, remaining)
        if not self.model.measured:
            free = max(1, self.workers - running)
            even = math.ceil(remaining / free)
            return max(1, min(even, PROBE_CHUNK, self.max_size_for_memory()))
        return self.best_size(remaining)

    def max_size_for_memory(self) -> int:
        m = self.model
        return max(1, int((self.budget.budget - m.mem_base) // max(m.mem_per_node, 1.0)))

    def best_size(self, remaining: int) -> int:
        """The chunk size with the least estimated evaluator time per node.

        Cost per node of a chunk of k is time(k) / (k * evaluators that fit in
        the budget side by side). A bigger chunk must win by 3% to be taken:
        near-ties go to the smaller, safer chunk. The last round shares what
        is left evenly across the evaluators.
        """
        m = self.model
        cap = min(remaining, self.max_size_for_memory(), m.growth_cap())

        def parallel(k: int) -> int:
            side_by_side = int(self.budget.budget // max(m.memory(k), 1.0))
            return max(1, min(self.workers, side_by_side))

        best_k, best = 1, m.seconds(1) / parallel(1)
        for k in range(2, cap + 1):
            cost = m.seconds(k) / (k * parallel(k))
            if cost < best * 0.97:
                best_k, best = k, cost
        p = parallel(best_k)
        if remaining <= best_k * p:
            return max(1, math.ceil(remaining / p))
        return best_k


# -- running -------------------------------------------------------------------

OnResult = Callable[[NodeEval], Awaitable[None] | None]
OnStart = Callable[[Sequence[str]], None]


@dataclass
class _Chunk:
    names: tuple[str, ...]
    single: bool = False  # evaluate without tryEval, for the node's own message


class Evaluator:
    def __init__(
        self,
        hive: Hive,
        settings: EvalSettings,
        on_result: OnResult | None = None,
        on_start: OnStart | None = None,
    ) -> None:
        self.hive = hive
        self.settings = settings
        self.on_result = on_result
        self.on_start = on_start
        self.budget = MemoryBudget.measure(settings.memory)
        self.results: dict[str, NodeEval] = {}
        self.stats: list[ChunkStat] = []
        self._running_memory = 0.0
        self._running_rss: dict[int, int] = {}
        self.peak_total = 0

    async def run(self, names: Sequence[str]) -> EvalRun:
        planner = Planner(self.settings, self.budget, len(names))
        pending: deque[str] = deque(names)
        retries: deque[_Chunk] = deque()
        running: dict[asyncio.Task[list[_Chunk]], float] = {}
        try:
            await self._loop(planner, pending, retries, running)
        finally:
            # Cancelled (Ctrl-C, SIGTERM) or failed: no evaluator outlives the run.
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)
        return EvalRun(self.results, tuple(self.stats), self.budget, self.peak_total, time.time())

    async def _loop(
        self,
        planner: Planner,
        pending: deque[str],
        retries: deque[_Chunk],
        running: dict[asyncio.Task[list[_Chunk]], float],
    ) -> None:
        while pending or retries or running:
            while (pending or retries) and len(running) < planner.workers:
                if retries:
                    chunk = retries[0]
                else:
                    size = planner.next_size(len(pending), len(running))
                    chunk = _Chunk(tuple(pending[i] for i in range(size)))
                need = planner.model.memory(len(chunk.names))
                if running and not planner.fits_alongside(len(chunk.names), self._running_memory):
                    break
                if retries:
                    retries.popleft()
                else:
                    for _ in chunk.names:
                        pending.popleft()
                self._running_memory += need
                task = asyncio.create_task(self._run_chunk(chunk, planner))
                running[task] = need
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                self._running_memory -= running.pop(task)
                retries.extend(task.result())

    async def _finish(self, result: NodeEval) -> None:
        self.results[result.name] = result
        if self.on_result is not None:
            maybe = self.on_result(result)
            if maybe is not None:
                await maybe

    async def _run_chunk(self, chunk: _Chunk, planner: Planner) -> list[_Chunk]:
        """Evaluate one chunk; returns chunks to retry (bisected halves, singles)."""
        started, started_at = time.monotonic(), time.time()
        out = await self._evaluate(chunk, planner)
        elapsed = time.monotonic() - started
        if not out.completed.ok:
            return await self._failed(chunk, out.completed, elapsed, started_at)
        return await self._results(chunk, out.value, elapsed, started_at)

    async def _evaluate(self, chunk: _Chunk, planner: Planner) -> nix.EvalOutput:
        """One evaluator process for the chunk, its memory and per-node times recorded."""
        points: list[tuple[int, float, int]] = []
        key = id(chunk)

        def on_line(line: str, seconds: float, rss: int) -> None:
            if line.startswith(DONE_MARK):
                points.append((len(points) + 1, seconds, rss))
            self._running_rss[key] = rss
            self.peak_total = max(self.peak_total, sum(self._running_rss.values()))

        expr = (
            self.hive.one_expr(chunk.names[0])
            if chunk.single
            else self.hive.chunk_expr(chunk.names)
        )
        if self.on_start is not None and not chunk.single:
            self.on_start(chunk.names)
        out = await nix.eval_json(
            expr,
            self.hive.flags,
            flake=self.hive.is_flake,
            read_write=True,
            timeout=self.settings.timeout,
            on_stderr_line=on_line,
            sample_memory=True,
            check=False,
        )
        self._running_rss.pop(key, None)
        done = out.completed
        self.peak_total = max(self.peak_total, done.peak_rss)
        stat = ChunkStat(chunk.names, done.duration, done.peak_rss, done.ok, tuple(points))
        self.stats.append(stat)
        if done.ok and not chunk.single:
            planner.model.observe(stat)
        return out

    async def _failed(
        self, chunk: _Chunk, done: Completed, elapsed: float, started_at: float
    ) -> list[_Chunk]:
        """A chunk whose evaluator failed: timed out (every node fails), one node's error,
        or two halves to retry (the broken node is not known yet)."""
        if done.timed_out:
            for name in chunk.names:
                await self._finish(
                    NodeEval(
                        name,
                        None,
                        None,
                        f"evaluation timed out after {self.settings.timeout:g} s",
                        "",
                        elapsed,
                    )
                )
            return []
        if len(chunk.names) == 1:
            await self._finish(
                NodeEval(
                    chunk.names[0],
                    None,
                    None,
                    nix.first_error_line(done.stderr),
                    nix.error_text(done.stderr),
                    elapsed,
                    started_at,
                )
            )
            return []
        mid = len(chunk.names) // 2
        return [_Chunk(chunk.names[:mid]), _Chunk(chunk.names[mid:])]

    async def _results(
        self, chunk: _Chunk, value: Any, elapsed: float, started_at: float
    ) -> list[_Chunk]:
        """Each node's drvPath and outPath from a chunk that evaluated; the nodes that a
        `tryEval` caught come back as single chunks to retry for their own message."""
        if chunk.single:
            value = {chunk.names[0]: value}
        retry: list[_Chunk] = []
        per_node = elapsed / len(chunk.names)
        for name in chunk.names:
            entry = value.get(name) if isinstance(value, dict) else None
            if isinstance(entry, dict) and "drv" in entry and "out" in entry:
                result = NodeEval(
                    name, str(entry["drv"]), str(entry["out"]), None, "", per_node, started_at
                )
            elif not chunk.single:
                retry.append(_Chunk((name,), single=True))
                continue
            else:
                result = NodeEval(
                    name, None, None, f"unexpected evaluator output: {entry!r:.200}", "", per_node
                )
            await self._finish(result)
        return retry


async def evaluate(
    hive: Hive,
    names: Sequence[str],
    settings: EvalSettings,
    on_result: OnResult | None = None,
    on_start: OnStart | None = None,
) -> EvalRun:
    return await Evaluator(hive, settings, on_result, on_start).run(names)
