"""Evaluation by streaming workers, recycled by cost and memory.

Nodes are evaluated to their toplevel drvPath/outPath by `--eval-jobs` workers
(default: one per core, within the memory budget). The node names are split
into contiguous queues, one per worker. A worker runs one `nix-instantiate`
process on its queue (`evalQueue` in hive/nix/query.nix): the nodes are forced
one after another in the queue's order, and after each one a trace line
`waggle-node-done {json}` carries its drvPath and outPath (or that tryEval
caught a throw). Each result is taken from that line the moment it is printed,
handed to `on_result` (builds start per node) and never lost when the process
is stopped or dies later.

The memory budget is the available memory (psutil), capped by the cgroup v2
limit, minus a reserve; `--eval-memory` overrides it. At first no more workers
start than the budget holds evaluators of 512 MiB (until the first finished
node measures what a fresh evaluator takes); once measured room allows it,
the others start. A worker's share of the budget is the budget divided by the
workers running.

Recycling. After each finished node, Waggle decides whether the process goes
on or is stopped and a fresh one started on the rest of the queue:
  (a) memory: its tree's RSS (sampled at the trace line) plus what the last
      node added would pass its share of the budget;
  (b) cost (`--eval-node-limit auto` only): its last two nodes (not counting
      its first, which holds the start-up) took longer on average than a fresh
      process's start-up plus first node, as measured in this run (the median
      time from spawn to the first finished node). A node's cost grows with
      the evaluator's heap (the garbage collector walks all of it), so once
      nodes cost more than a fresh start, a fresh process is cheaper from then
      on. Two nodes, not one: a single node that happened to hold a garbage
      collection would restart workers whose nodes cost about a fresh start;
  (c) `--eval-node-limit N`: after N nodes.
This is the ski-rental rule: a restart (cost R) is paid only after two nodes
have cost more than 2R together, so the restarts together cost less than the
nodes that caused them, and the run is never much worse than about 2x the
best fixed setting: against a setting that restarts earlier, what we lose is
bounded by the two nodes per restart that cost more than R each; against one
that restarts later or never, each of its nodes past that point costs it more
than R, which we pay once. In practice it is close to the best: where
start-up dominates (nodes share large files parsed once per process), no node
costs as much as a fresh start and each worker keeps one process for its whole
queue; where the heap dominates, the worker restarts soon after the growth
passes a fresh start.

Work stealing. A worker whose queue is empty first takes over the queue of a
worker that has not started, else takes the tail of the longest remaining
queue of a running worker (never the node it is on), as many nodes as make
both finish soonest: k nodes when max((r - k) * c, fresh + (k - 1) * c) is
least and less than r * c (r: the victim's remaining nodes; c: its last
node's seconds, else a typical node's, and at least what its current node has
taken so far; fresh: a fresh start and first node, at least c). The victim's
process is stopped when it reaches the stolen part; a node reported twice
keeps its first result.

Broken nodes fail alone: a node tryEval caught is re-evaluated alone (evalOne,
no tryEval) for its own message. A process that dies (an error tryEval does
not catch, a kill from outside) names the node it was on (the first without a
line): that node is evaluated alone (after a kill from outside it then just
succeeds) and the rest of the queue goes on in a new process. A node that
makes no progress for `timeout` seconds fails with "evaluation timed out" and
its queue goes on. Cancellation (Ctrl-C, SIGTERM) leaves no evaluator running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
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

log = logging.getLogger("waggle")

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_RESERVE = 1 * GiB
DEFAULT_NODE_MEMORY = 512 * MiB  # a fresh evaluator, before anything is measured (Colmena's guess)
MIN_BUDGET = 256 * MiB
DONE_MARK = "trace: waggle-node-done "

# Why an evaluator process ended.
FINISHED = "finished"  # its queue is done
LIMIT = "limit"  # --eval-node-limit N nodes
MEMORY = "memory"  # one more node would pass its share of the budget
COST = "cost"  # its last node cost more than a fresh start and first node
STOLEN = "stolen"  # the rest of its queue went to another worker
DIED = "died"  # exited with an error or was killed: the node it was on is evaluated alone
TIMEOUT = "timeout"  # a node made no progress for the timeout
ALONE = "alone"  # one node evaluated alone (no tryEval) for its own message
RESTARTS = (MEMORY, COST)
COST_WINDOW = 2  # nodes whose mean cost is weighed against a fresh start (one is too noisy)


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
    node_limit: int | None = None  # None: auto; 0: no limit; N: at most N nodes per process
    memory: int | None = None  # --eval-memory override of the budget, bytes
    jobs: int = 0  # workers (evaluator processes at once); 0: one per core
    timeout: float = 1800.0  # seconds a node may go without progress


@dataclass(frozen=True)
class NodeEval:
    name: str
    drv_path: str | None
    out_path: str | None
    error: str | None  # one line
    detail: str  # Nix's full message on failure
    seconds: float
    started_at: float = 0.0  # epoch seconds when its evaluation started

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ProcessStat:
    """One evaluator process of a run."""

    worker: int
    alone: bool  # one node without tryEval, for its own message
    names: tuple[str, ...]  # the nodes it finished, in order
    start: float  # seconds after the evaluation started
    seconds: float
    peak_rss: int
    ok: bool  # ended by itself without an error, or was stopped by Waggle's rules
    points: tuple[tuple[int, float, int], ...]  # (node index from 1, seconds, rss) per node
    why: str  # FINISHED, LIMIT, MEMORY, COST, STOLEN, DIED, TIMEOUT or ALONE


@dataclass(frozen=True)
class EvalRun:
    results: dict[str, NodeEval]
    processes: tuple[ProcessStat, ...]
    budget: MemoryBudget
    peak_rss_total: int  # highest sum of the peaks of evaluators running at the same time
    finished_at: float  # epoch seconds when the last evaluator ended

    @property
    def failed(self) -> list[str]:
        return [n for n, r in self.results.items() if not r.ok]

    @property
    def restarts(self) -> list[ProcessStat]:
        """Processes stopped so that a fresh one went on (memory, cost)."""
        return [p for p in self.processes if p.why in RESTARTS]


# -- the decision rules ----------------------------------------------------------


def split_queues(names: Sequence[str], parts: int) -> list[deque[str]]:
    """Contiguous queues whose sizes differ by at most one."""
    parts = max(1, min(parts, len(names)))
    size, extra = divmod(len(names), parts)
    queues, at = [], 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        queues.append(deque(names[at : at + n]))
        at += n
    return queues


def recent_cost(seconds: Sequence[float]) -> float | None:
    """Mean seconds of a process's last COST_WINDOW nodes, not counting its first (which
    holds the start-up); None until it has finished that many."""
    later = seconds[1:]
    return sum(later[-COST_WINDOW:]) / COST_WINDOW if len(later) >= COST_WINDOW else None


def recycle_reason(
    recent: float | None,
    rss: int,
    growth: int,
    share: float,
    fresh: float | None,
    *,
    auto: bool,
) -> str | None:
    """Why a process that has just finished a node should be replaced by a fresh one on the
    rest of its queue (None: it goes on).

    MEMORY when its RSS plus the growth of one more node would pass its share; COST (auto
    only) when its recent nodes (`recent_cost`) took longer than a fresh start and first
    node (`fresh`).
    """
    if rss + growth > share:
        return MEMORY
    if auto and recent is not None and fresh is not None and recent > fresh:
        return COST
    return None


def steal_count(remaining: int, victim_node: float, fresh: float, thief_node: float) -> int:
    """How many nodes a thief takes from the tail of a victim's `remaining` ones (not the
    one it is on): the k for which both finish soonest, max((remaining - k) * victim_node,
    fresh + (k - 1) * thief_node), if that is sooner than the victim alone; else 0."""
    best_k, best = 0, remaining * victim_node
    for k in range(1, remaining + 1):
        finish = max((remaining - k) * victim_node, fresh + (k - 1) * thief_node)
        if finish < best:
            best_k, best = k, finish
    return best_k


def first_workers(*, jobs: int, queues: int, budget: int, first_memory: int) -> int:
    """Workers to start at once: as many as the budget holds fresh evaluators, at least one."""
    return max(1, min(jobs, queues, budget // max(first_memory, 1)))


def may_start_worker(
    *, running: int, jobs: int, budget: int, used: int, first_memory: int, growth: int
) -> bool:
    """Whether one more worker may start next to `running` ones using `used` bytes now: a
    fresh evaluator fits in what is left, and each share still holds one of two nodes."""
    if running >= jobs:
        return False
    return used + first_memory <= budget and first_memory + growth <= budget / (running + 1)


@dataclass
class Costs:
    """What this run's evaluators measured so far, for the rules above."""

    fresh: list[float] = field(default_factory=list)  # spawn to first finished node, s
    first_rss: list[int] = field(default_factory=list)  # RSS at the first finished node
    second_growth: list[int] = field(default_factory=list)  # RSS a second node added
    later: list[float] = field(default_factory=list)  # seconds of nodes after the first

    def observe(self, node: int, seconds: float, rss: int, growth: int | None) -> None:
        if node == 1:
            self.fresh.append(seconds)
            if rss > 0:
                self.first_rss.append(rss)
            return
        self.later.append(seconds)
        if node == 2 and growth is not None and rss > 0:
            self.second_growth.append(max(0, growth))

    def fresh_cost(self) -> float | None:
        return statistics.median(self.fresh) if self.fresh else None

    def first_memory(self) -> int:
        return max(self.first_rss) if self.first_rss else DEFAULT_NODE_MEMORY

    def growth_after(self, node: int, rss: int, last_growth: int | None) -> int:
        """Estimated RSS one more node adds to a process at its `node`-th node: its own last
        growth; after a first node, what second nodes added elsewhere, else as much again."""
        if node >= 2 and last_growth is not None:
            return max(0, last_growth)
        if self.second_growth:
            return int(statistics.median(self.second_growth))
        return rss

    def node_cost(self) -> float | None:
        """Median seconds of a node after a process's first."""
        return statistics.median(self.later) if self.later else None


def peak_of(stats: Sequence[ProcessStat]) -> int:
    """The highest sum of the peaks of processes that ran at the same time."""
    edges = sorted(
        [(p.start, 1, p.peak_rss) for p in stats]
        + [(p.start + p.seconds, 0, -p.peak_rss) for p in stats]
    )
    total = best = 0
    for _, _, delta in edges:
        total += delta
        best = max(best, total)
    return best


# -- running -------------------------------------------------------------------

OnResult = Callable[[NodeEval], Awaitable[None] | None]
OnStart = Callable[[Sequence[str]], None]


@dataclass
class _Proc:
    """A queue evaluator process while it runs."""

    plan: list[str]  # the names it was started on, in order
    spawned: float  # monotonic
    start: float  # seconds after the evaluation started
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    done: list[str] = field(default_factory=list)
    points: list[tuple[int, float, int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per finished node
    last_at: float = 0.0  # monotonic: spawn or the last finished node
    last_wall: float = 0.0  # the same, epoch seconds
    last_rss: int = 0
    last_growth: int | None = None
    why: str | None = None  # set when Waggle stops it

    @property
    def next_name(self) -> str | None:
        return self.plan[len(self.done)] if len(self.done) < len(self.plan) else None


@dataclass
class _Worker:
    index: int
    queue: deque[str]
    task: asyncio.Task[None] | None = None
    ended: bool = False
    alone: list[str] = field(default_factory=list)  # to evaluate alone for their message
    last_node: float | None = None  # seconds of its last node after a process's first
    proc: _Proc | None = None  # its queue process while one runs
    processes: int = 0


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
        self.stats: list[ProcessStat] = []
        self.costs = Costs()
        self.workers: list[_Worker] = []
        self._rss: dict[int, int] = {}  # id of a running process -> its current RSS
        self._announced: set[str] = set()
        self._callbacks: list[asyncio.Future[None]] = []
        self._t0 = time.monotonic()

    @property
    def jobs(self) -> int:
        return self.settings.jobs or (os.cpu_count() or 1)

    @property
    def auto(self) -> bool:
        return self.settings.node_limit is None

    def _running(self) -> list[_Worker]:
        return [w for w in self.workers if w.task is not None and not w.ended]

    def _share(self) -> float:
        return self.budget.budget / max(1, len(self._running()))

    async def run(self, names: Sequence[str]) -> EvalRun:
        self.workers = [_Worker(i + 1, q) for i, q in enumerate(split_queues(names, self.jobs))]
        if names:
            count = first_workers(
                jobs=self.jobs,
                queues=len(self.workers),
                budget=self.budget.budget,
                first_memory=self.costs.first_memory(),
            )
            for worker in self.workers[:count]:
                self._start_worker(worker)
        try:
            await self._wait_all()
        finally:
            # Cancelled (Ctrl-C, SIGTERM) or failed: no evaluator outlives the run.
            pending = [w.task for w in self.workers if w.task is not None] + self._callbacks
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        peak = peak_of(self.stats)
        return EvalRun(self.results, tuple(self.stats), self.budget, peak, time.time())

    async def _wait_all(self) -> None:
        while True:
            tasks = [w.task for w in self.workers if w.task is not None and not w.task.done()]
            if not tasks:
                break
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        for task in [w.task for w in self.workers if w.task is not None]:
            task.result()
        if self._callbacks:
            await asyncio.gather(*self._callbacks)

    def _start_worker(self, worker: _Worker) -> None:
        worker.task = asyncio.create_task(self._work(worker))
        log.info(
            "evaluation: worker %d starts on %d node(s) (%s .. %s)",
            worker.index,
            len(worker.queue),
            worker.queue[0],
            worker.queue[-1],
        )

    async def _work(self, worker: _Worker) -> None:
        try:
            while worker.queue or self._take_over(worker) or self._steal(worker):
                await self._run_queue(worker)
                await self._run_alone(worker)
            await self._run_alone(worker)
        finally:
            worker.ended = True
        log.info("evaluation: worker %d is done (%d process(es))", worker.index, worker.processes)

    # -- sharing work ------------------------------------------------------------
    def _take_over(self, worker: _Worker) -> bool:
        """The whole queue of a worker that has not started."""
        for other in self.workers:
            if other.task is None and other.queue:
                worker.queue, other.queue = other.queue, deque()
                log.info(
                    "evaluation: worker %d takes over worker %d's %d node(s), which had not"
                    " started",
                    worker.index,
                    other.index,
                    len(worker.queue),
                )
                return True
        return False

    def _steal(self, thief: _Worker) -> bool:
        """The tail of the longest remaining queue, when that finishes sooner (`steal_count`)."""
        victims = [w for w in self._running() if w is not thief and len(w.queue) > 1]
        if not victims:
            return False
        victim = max(victims, key=lambda w: len(w.queue))
        fresh = self.costs.fresh_cost()
        # The victim's nodes cost what its last did (else a typical node), and at least as
        # long as the one it is on has taken so far; the thief's will cost the same (its
        # queue's neighbours), and its first no less than a fresh start.
        current = victim.proc
        elapsed = time.monotonic() - current.last_at if current is not None else 0.0
        estimate = victim.last_node or self.costs.node_cost() or fresh or 1.0
        victim_node = max(estimate, elapsed)
        fresh = max(fresh if fresh is not None else victim_node, victim_node)
        thief_node = fresh if self.settings.node_limit == 1 else victim_node
        remaining = len(victim.queue) - 1
        count = steal_count(remaining, victim_node, fresh, thief_node)
        if count == 0:
            return False
        taken = [victim.queue.pop() for _ in range(count)][::-1]
        thief.queue.extend(taken)
        log.info(
            "evaluation: worker %d takes %d node(s) (%s .. %s) from worker %d: %d left there at"
            " %.2f s each, a fresh start %.2f s",
            thief.index,
            count,
            taken[0],
            taken[-1],
            victim.index,
            remaining,
            victim_node,
            fresh,
        )
        return True

    def _maybe_start_workers(self) -> None:
        for worker in self.workers:
            if worker.task is not None or not worker.queue:
                continue
            used = sum(self._rss.values())
            first = self.costs.first_memory()
            if not may_start_worker(
                running=len(self._running()),
                jobs=self.jobs,
                budget=self.budget.budget,
                used=used,
                first_memory=first,
                growth=self.costs.growth_after(1, first, None),
            ):
                return
            self._start_worker(worker)

    # -- results -------------------------------------------------------------------
    def _announce(self, name: str) -> None:
        if self.on_start is not None and name not in self._announced:
            self._announced.add(name)
            self.on_start([name])

    def _finish(self, result: NodeEval) -> None:
        if result.name in self.results:
            return  # reported twice (a stolen node): the first result stays
        self.results[result.name] = result
        if self.on_result is not None:
            maybe = self.on_result(result)
            if maybe is not None:
                self._callbacks.append(asyncio.ensure_future(maybe))

    # -- one queue process -------------------------------------------------------------
    async def _run_queue(self, worker: _Worker) -> None:
        limit = self.settings.node_limit or 0
        plan = list(worker.queue)[:limit] if limit > 0 else list(worker.queue)
        now = time.monotonic()
        proc = _Proc(plan, now, now - self._t0, last_at=now, last_wall=time.time())
        worker.processes += 1
        worker.last_node = None
        log.info(
            "evaluation: worker %d: evaluator %d on %d node(s) from %s",
            worker.index,
            worker.processes,
            len(plan),
            plan[0],
        )
        self._announce(plan[0])
        watchdog = asyncio.create_task(self._watch(proc))
        worker.proc = proc
        try:
            out = await nix.eval_json(
                self.hive.queue_expr(plan),
                self.hive.flags,
                flake=self.hive.is_flake,
                read_write=True,
                on_stderr_line=lambda line, _t, rss: self._on_line(worker, proc, line, rss),
                sample_memory=True,
                check=False,
                stop=proc.stop,
            )
        finally:
            watchdog.cancel()
            worker.proc = None
            self._rss.pop(id(proc), None)
        self._ended(worker, proc, out.completed)

    async def _watch(self, proc: _Proc) -> None:
        """Stop a process whose node makes no progress for the timeout."""
        while not proc.stop.is_set():
            left = proc.last_at + self.settings.timeout - time.monotonic()
            if left <= 0:
                proc.why = proc.why or TIMEOUT
                proc.stop.set()
                return
            await asyncio.sleep(left)

    def _on_line(self, worker: _Worker, proc: _Proc, line: str, rss: int) -> None:
        if rss > 0:
            self._rss[id(proc)] = rss
        if not line.startswith(DONE_MARK):
            return
        try:
            data = json.loads(line.removeprefix(DONE_MARK))
        except json.JSONDecodeError:
            return
        if not isinstance(data, dict) or data.get("name") not in proc.plan[len(proc.done) :]:
            return
        name = str(data["name"])
        seconds, started_at = self._node_done(worker, proc, name, rss)
        if data.get("error") is True:
            if name not in self.results:
                worker.alone.append(name)  # tryEval caught it: alone, for its own message
        elif isinstance(data.get("drv"), str) and isinstance(data.get("out"), str):
            self._finish(NodeEval(name, data["drv"], data["out"], None, "", seconds, started_at))
        else:
            worker.alone.append(name)
        log.info(
            "evaluation: worker %d: %s done in %.2f s (evaluator at %.0f MiB)",
            worker.index,
            name,
            seconds,
            rss / MiB,
        )
        self._next(worker, proc)
        self._maybe_start_workers()

    def _node_done(self, worker: _Worker, proc: _Proc, name: str, rss: int) -> tuple[float, float]:
        """Book a finished node: its seconds and when it started (epoch)."""
        now, wall = time.monotonic(), time.time()
        seconds, started_at = now - proc.last_at, proc.last_wall
        proc.last_at, proc.last_wall = now, wall
        while proc.next_name is not None and proc.next_name != name:
            proc.done.append(proc.next_name)  # not expected: Nix goes in order
        proc.done.append(name)
        index = len(proc.done)
        growth = rss - proc.last_rss if index >= 2 and rss > 0 and proc.last_rss > 0 else None
        proc.last_growth, proc.last_rss = growth, rss or proc.last_rss
        proc.points.append((index, now - proc.spawned, rss))
        proc.seconds.append(seconds)
        self.costs.observe(index, seconds, rss, growth)
        if index >= 2:
            worker.last_node = seconds
        if worker.queue and worker.queue[0] == name:
            worker.queue.popleft()
        return seconds, started_at

    def _next(self, worker: _Worker, proc: _Proc) -> None:
        """After a finished node: go on, or stop the process (why) for a fresh one."""
        following = proc.next_name
        if proc.why is not None or following is None:
            return
        if not worker.queue or worker.queue[0] != following:
            self._stop(worker, proc, STOLEN, "the rest of its queue went to another worker")
            return
        index = len(proc.done)
        growth = self.costs.growth_after(index, proc.last_rss, proc.last_growth)
        share = self._share()
        fresh = self.costs.fresh_cost()
        recent = recent_cost(proc.seconds)
        why = recycle_reason(recent, proc.last_rss, growth, share, fresh, auto=self.auto)
        if why == MEMORY:
            self._stop(
                worker,
                proc,
                why,
                f"at {proc.last_rss / MiB:.0f} MiB, {growth / MiB:.0f} MiB more for the next"
                f" node would pass its share of {share / MiB:.0f} MiB",
            )
        elif why == COST:
            self._stop(
                worker,
                proc,
                why,
                f"its last {COST_WINDOW} nodes took {recent or 0:.2f} s each, more than a fresh"
                f" evaluator's start and first node ({fresh or 0:.2f} s)",
            )
        else:
            self._announce(following)

    def _stop(self, worker: _Worker, proc: _Proc, why: str, because: str) -> None:
        proc.why = why
        proc.stop.set()
        log.info(
            "evaluation: worker %d: evaluator stopped after %s (%s): %s",
            worker.index,
            proc.done[-1],
            why,
            because,
        )

    def _ended(self, worker: _Worker, proc: _Proc, done: Completed) -> None:
        """Book a queue process that ended; a node it died or stalled on leaves the queue."""
        following = proc.next_name
        on = following if worker.queue and worker.queue[0] == following else None
        why = proc.why
        if why is None:
            if done.ok and on is None:
                why = LIMIT if proc.done and worker.queue else FINISHED
            else:
                why = DIED
        if why == DIED and on is not None:
            worker.queue.popleft()
            worker.alone.append(on)
            log.info(
                "evaluation: worker %d: its evaluator died on %s (%s); %s is evaluated alone,"
                " the rest of its queue in a new evaluator",
                worker.index,
                on,
                _exit_text(done),
                on,
            )
        elif why == TIMEOUT and on is not None:
            worker.queue.popleft()
            self._finish(self._timed_out(on, time.monotonic() - proc.last_at, proc.last_wall))
        self._stat(worker.index, False, proc, done, why)

    def _stat(self, worker: int, alone: bool, proc: _Proc, done: Completed, why: str) -> None:
        self.stats.append(
            ProcessStat(
                worker,
                alone,
                tuple(proc.done),
                proc.start,
                done.duration,
                done.peak_rss,
                done.ok or (not alone and why in (MEMORY, COST, STOLEN, LIMIT, FINISHED)),
                tuple(proc.points),
                why,
            )
        )

    def _timed_out(self, name: str, seconds: float, started_at: float) -> NodeEval:
        message = f"evaluation timed out after {self.settings.timeout:g} s"
        return NodeEval(name, None, None, message, "", seconds, started_at)

    # -- a node alone --------------------------------------------------------------
    async def _run_alone(self, worker: _Worker) -> None:
        """Evaluate the worker's broken nodes one by one, without tryEval, for their own
        messages (or, after a kill from outside, their results)."""
        while worker.alone:
            name = worker.alone.pop(0)
            if name in self.results:
                continue
            self._announce(name)
            now = time.monotonic()
            proc = _Proc([name], now, now - self._t0, last_at=now, last_wall=time.time())
            out = await nix.eval_json(
                self.hive.one_expr(name),
                self.hive.flags,
                flake=self.hive.is_flake,
                read_write=True,
                timeout=self.settings.timeout,
                sample_memory=True,
                check=False,
            )
            done = out.completed
            self._finish(self._alone_result(name, out, proc.last_wall))
            proc.done.append(name)
            proc.points.append((1, done.duration, done.peak_rss))
            self._stat(worker.index, True, proc, done, ALONE)
            log.info(
                "evaluation: worker %d: %s evaluated alone (%s)",
                worker.index,
                name,
                _exit_text(done),
            )

    def _alone_result(self, name: str, out: nix.EvalOutput, started_at: float) -> NodeEval:
        done = out.completed
        value: Any = out.value
        if done.timed_out:
            return self._timed_out(name, done.duration, started_at)
        if not done.ok:
            first = nix.first_error_line(done.stderr)
            if first == "no output" and done.returncode < 0:
                first = f"the evaluator was killed by signal {-done.returncode}"
            return NodeEval(
                name, None, None, first, nix.error_text(done.stderr), done.duration, started_at
            )
        if isinstance(value, dict) and isinstance(value.get("drv"), str):
            drv, out_path = str(value["drv"]), str(value.get("out"))
            return NodeEval(name, drv, out_path, None, "", done.duration, started_at)
        message = f"unexpected evaluator output: {value!r:.200}"
        return NodeEval(name, None, None, message, "", done.duration, started_at)


def _exit_text(done: Completed) -> str:
    if done.timed_out:
        return "timed out"
    if done.returncode < 0:
        return f"killed by signal {-done.returncode}"
    return f"exit status {done.returncode}" if done.returncode else "ok"


async def evaluate(
    hive: Hive,
    names: Sequence[str],
    settings: EvalSettings,
    on_result: OnResult | None = None,
    on_start: OnStart | None = None,
) -> EvalRun:
    return await Evaluator(hive, settings, on_result, on_start).run(names)
