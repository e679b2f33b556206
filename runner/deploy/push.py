"""Pushing a closure to a host: only the paths the host lacks.

The paths the host lacks come from the run's query (runner/deploy/hoststate.py, answered by
the host lock's channel), or from `missing_paths` (`nix-store --check-validity
--print-invalid`, paths on stdin). Then ONE command (runner/scripts/push-import.sh) lets the
host substitute the paths a cache can have from its own substituters, says which are still
missing, and imports the `nix-store --export` stream of what is left: the substitution
costs no extra round trip, and none at all when nothing is cacheable. (On a host that is
not `duplex`, e.g. LocalHost, `missing_paths` and the substitution run as commands of their own
before the import: `substitute_paths`.)

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

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runner import nix, process
from runner.errors import NixError, WaggleError
from runner.hosts import DuplexHost, Host, RemoteResult, duplex
from runner.scripts import script

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

IMPORT_SCRIPT = script("push-import.sh")  # sh -c IMPORT sh LIMIT GRACE BYTES MORE [OPTION...]

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
    fetched: tuple[str, ...] = ()  # those paths (from its caches, or the run's --cache)
    fetched_bytes: int | None = None  # their NAR bytes (None: not known here)

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


@dataclass(frozen=True)
class Closure:
    """A closure to push, from one `nix path-info --recursive --json`."""

    paths: tuple[str, ...]  # dependencies first
    nar_bytes: int
    built_here: frozenset[str] | None  # outputs no cache can have (see cacheable); None: unknown
    sizes: Mapping[str, int] = field(default_factory=dict)  # NAR size per path, when known

    def size_of(self, paths: Sequence[str]) -> int | None:
        """The NAR bytes of `paths` (of this closure); None when the sizes are not known."""
        if not paths:
            return 0
        if not self.sizes:
            return None
        return sum(self.sizes.get(p, 0) for p in paths)


def _built_here(infos: Sequence[nix.PathInfo]) -> frozenset[str]:
    return frozenset(i.path for i in infos if i.ultimate and not i.signatures and not i.ca)


def _dependencies_first(infos: Sequence[nix.PathInfo]) -> list[str]:
    """The paths ordered so that every path comes after the paths it refers to."""
    refs = {i.path: [r for r in i.references if r != i.path] for i in infos}
    ordered: list[str] = []
    state: dict[str, bool] = {}  # False: being visited, True: placed
    for top in sorted(refs):
        stack = [(top, iter(refs[top]))]
        state.setdefault(top, False)
        while stack:
            path, children = stack[-1]
            child = next((c for c in children if c in refs and c not in state), None)
            if child is None:
                stack.pop()
                if not state.get(path):
                    state[path] = True
                    ordered.append(path)
            else:
                state[child] = False
                stack.append((child, iter(refs[child])))
    return ordered


BATCH_WINDOW = 0.02
"""Seconds closure requests wait for others (nodes whose builds end together): they share
one `nix path-info` (a local process costs ~25 ms of CPU; 32 nodes, 32 processes)."""

_BATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future[Any]]] = (
    weakref.WeakKeyDictionary()
)


def _closure_from(root: str, infos: Mapping[str, nix.PathInfo]) -> Closure | None:
    """`root`'s closure out of path-info records that hold it (None: some are missing)."""
    seen, todo = {root}, [root]
    sizes: dict[str, int] = {}
    while todo:
        info = infos.get(todo.pop())
        if info is None or info.nar_size is None:
            return None
        sizes[info.path] = info.nar_size
        for ref in info.references:
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    mine = [infos[p] for p in sorted(seen)]
    return Closure(tuple(_dependencies_first(mine)), sum(sizes.values()), _built_here(mine), sizes)


async def _path_infos(roots: Sequence[str], timeout: float) -> dict[str, nix.PathInfo]:
    """The path-info records of the closures of `roots` ({} when path-info cannot say)."""
    with contextlib.suppress(OSError, NixError):
        return await nix.path_info(roots, recursive=True, timeout=timeout)
    return {}


async def _batch(pending: dict[str, asyncio.Future[Any]], timeout: float) -> None:
    """After BATCH_WINDOW: one path-info for every root asked for meanwhile."""
    await asyncio.sleep(BATCH_WINDOW)
    batch = dict(pending)
    pending.clear()
    try:
        infos = await _path_infos(list(batch), timeout)
    except BaseException as e:  # cancelled, or a bug: every waiter hears of it
        for future in batch.values():
            if not future.done():
                future.set_exception(e)
        raise
    for root, future in batch.items():
        if not future.done():
            future.set_result(_closure_from(root, infos))


async def closure_of(root: str, *, timeout: float = 300) -> Closure:
    """`root`'s closure with its size and what was built here: one local `nix path-info`,
    shared by the requests of BATCH_WINDOW (two `nix-store` queries when path-info cannot
    say)."""
    pending = _BATCHES.setdefault(asyncio.get_running_loop(), {})
    future = pending.get(root)
    if future is None:
        if not pending:
            task = asyncio.create_task(_batch(pending, timeout))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        future = pending[root] = asyncio.get_running_loop().create_future()
    found: Closure | None = await asyncio.shield(future)
    if found is not None:
        return found
    paths = await nix.closure(root)
    return Closure(tuple(paths), await nix.closure_size(paths), None)


def cacheable(paths: Sequence[str], built_here: frozenset[str] | None) -> list[str]:
    """The paths of `paths` a binary cache may have, in the given order.

    Left out: derivations (caches serve outputs), and outputs built on this machine that
    are neither signed nor content-addressed (`built_here`, from the closure's `nix
    path-info`: `ultimate`, no `signatures`, no `ca`; see `closure_of`). Substituted,
    imported, added and fixed-output paths stay. If the local store could not say
    (`built_here` None: a Nix without `path-info`), every output stays.
    """
    outputs = [p for p in paths if not p.endswith(".drv")]
    return outputs if built_here is None else [p for p in outputs if p not in built_here]


def _lines(paths: Sequence[str]) -> bytes:
    return "".join(f"{p}\n" for p in paths).encode()


def _host_limit(budget: float) -> int:
    """Seconds the host's `timeout` gives the substitution within `budget` (its KILL after
    KILL_GRACE more, and a second for the answer, included)."""
    return max(1, int(budget) - KILL_GRACE - 1)


async def substitute_paths(
    host: Host,
    paths: Sequence[str],
    *,
    budget: float,
    options: Sequence[str] = SUBSTITUTE_OPTIONS,
) -> float:
    """Ask the host to fetch `paths` from its own substituters within `budget`, as a command
    of its own; the seconds taken. `options` go to that `nix-store --realise` only (e.g.
    `--option extra-substituters URL` for one more cache; SUBSTITUTE_OPTIONS bound it).

    Failures are fine: what is still missing is pushed. The time limit is enforced on the
    host (`timeout` kills the substitution, so no stray `nix-store` holds path locks that
    the import would wait for); the local limit only catches a host that does not answer.
    (A push to a duplex host does the same inside its import command: `import_argv`.)
    """
    start = time.monotonic()
    await host.run(
        [
            *("timeout", "-k", str(KILL_GRACE), str(_host_limit(budget))),
            *("xargs", "-r", "nix-store", "--realise", *options),
        ],
        input_data=_lines(paths),
        timeout=budget,
    )
    return time.monotonic() - start


def import_argv(
    candidates: Sequence[str],
    more: int,
    *,
    budget: float,
    options: Sequence[str] = SUBSTITUTE_OPTIONS,
) -> list[str]:
    """The import command (push-import.sh): substitute `candidates` first (within `budget`,
    with `options` for that `nix-store --realise` only), then import; `more` is the number
    of other paths that will be sent."""
    nbytes = len(_lines(candidates))
    limit = _host_limit(budget) if candidates else 0
    argv = ["sh", "-c", IMPORT_SCRIPT, "sh", str(limit), str(KILL_GRACE), str(nbytes), str(more)]
    return [*argv, *options]


@dataclass
class _Import:
    """One import command: the host's substitution answer (`missing:` ... `ready`), then the
    export of what it still lacks, streamed into its `nix-store --import`."""

    missing: list[str]  # in closure order
    candidates: list[str]  # of those, the ones the host tries to substitute first
    begun: float = field(default_factory=time.monotonic)
    still: list[str] | None = None  # candidates still missing, once the host says so
    listing: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    substitute_seconds: float = 0.0
    sent: int = 0
    exporter: process.Reading | None = None

    def line(self, text: str) -> None:
        if self.ready.is_set():
            return
        if text == "missing:":
            self.listing, self.still = True, []
        elif text == "ready" and self.listing:
            self.substitute_seconds = time.monotonic() - self.begun
            self.ready.set()
        elif self.listing and self.still is not None and text.startswith("/"):
            self.still.append(text.strip())

    def to_send(self) -> list[str]:
        if not self.candidates:
            return self.missing
        still, tried = set(self.still or ()), set(self.candidates)
        return [p for p in self.missing if p not in tried or p in still]

    async def chunks(self, stack: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
        if self.candidates:
            yield _lines(self.candidates)
            await self.ready.wait()  # the command ends first: this feed is cancelled
        paths = self.to_send()
        if not paths:
            return
        self.exporter = await stack.enter_async_context(nix.export(paths))
        stdout = self.exporter.stdout
        while True:
            block = await stdout.read(256 * 1024)
            if not block:
                return
            self.sent += len(block)
            yield block


async def _import_duplex(
    host: DuplexHost,
    missing: list[str],
    candidates: list[str],
    *,
    budget: float,
    timeout: float,
    options: Sequence[str],
) -> tuple[_Import, RemoteResult, tuple[int, str] | None]:
    """Substitute, then import, in one command; (its state, its result, the exporter's
    exit status and stderr, if one was started)."""
    job = _Import(missing, candidates)
    more = len(missing) - len(candidates)
    argv = import_argv(candidates, more, budget=budget, options=options)
    async with contextlib.AsyncExitStack() as stack:
        done = await host.run_fed(argv, job.chunks(stack), timeout=timeout, on_line=job.line)
        exporter = job.exporter
        if exporter is None:
            return job, done, None
        if done.ok:  # the import took the whole stream: the exporter is ending
            ended = await exporter.wait(timeout=EXPORT_GRACE)
        else:  # the exporter may be blocked writing into a full pipe: never wait for it
            ended = await exporter.kill()
    return job, done, ended


async def _import_plain(
    host: Host, missing: list[str], *, timeout: float
) -> tuple[int, RemoteResult, tuple[int, str]]:
    """`nix-store --export` of `missing` streamed into the host's `nix-store --import`."""
    sent = 0
    async with nix.export(missing) as exporter:
        stdout = exporter.stdout

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal sent
            while True:
                block = await stdout.read(256 * 1024)
                if not block:
                    return
                sent += len(block)
                yield block

        done = await host.run_fed(["nix-store", "--import"], chunks(), timeout=timeout)
        if done.ok:
            ended = await exporter.wait(timeout=EXPORT_GRACE)
        else:
            ended = await exporter.kill()
    return sent, done, ended


def _check_import(
    host: Host, done: RemoteResult, ended: tuple[int, str] | None, timeout: float
) -> None:
    """Raise PushError for an import that failed (the exporter's own failure first)."""
    status, stderr = ended if ended is not None else (0, "")
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


def _candidates(
    lacking: Sequence[str], info: Closure, *, substitute: bool, from_cache: bool
) -> list[str]:
    """The paths the host is asked to substitute: every output it lacks when they are in
    the run's cache, else those a cache can have (`cacheable`), or none."""
    if from_cache:
        return cacheable(lacking, None)
    return cacheable(lacking, info.built_here) if substitute else []


async def push_closure(
    host: Host,
    root: str,
    *,
    substitute: bool = True,
    timeout: float = 3600.0,
    substitute_timeout: float = SUBSTITUTE_TIMEOUT,
    closure: Closure | None = None,
    missing: Sequence[str] | None = None,
    substitute_options: Sequence[str] = SUBSTITUTE_OPTIONS,
    from_cache: bool = False,
) -> PushResult:
    """Push `root`'s closure (`closure`, if known already: `closure_of(root)`); `missing`:
    the paths the host lacks, if known already (the run's query). With `from_cache` (the
    closure is in the run's binary cache, which `substitute_options` add for this command),
    the host is asked to substitute every path it lacks, built here or not."""
    start = time.monotonic()
    deadline = start + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PushError(f"push to {host.name} timed out after {timeout:g} s")
        return left

    info = closure if closure is not None else await closure_of(root)
    paths, closure_bytes = list(info.paths), info.nar_bytes
    lacking = (
        list(missing)
        if missing is not None
        else await missing_paths(host, paths, timeout=remaining())
    )
    candidates = _candidates(lacking, info, substitute=substitute, from_cache=from_cache)

    def result(sent: Sequence[str], sent_bytes: int, seconds: float = 0.0) -> PushResult:
        pushed = set(sent)
        fetched = tuple(p for p in lacking if p not in pushed)
        return PushResult(
            len(paths),
            len(sent),
            sent_bytes,
            time.monotonic() - start,
            closure_bytes,
            seconds,
            len(lacking) - len(sent),
            fetched,
            info.size_of(fetched),
        )

    if not lacking:
        return result([], 0)
    budget = min(substitute_timeout, remaining())
    if duplex(host):
        job, done, ended = await _import_duplex(
            host,
            lacking,
            candidates,
            budget=budget,
            timeout=remaining(),
            options=substitute_options,
        )
        _check_import(host, done, ended, timeout)
        if not job.ready.is_set() and candidates:
            raise PushError(f"nix-store --import on {host.name}: no answer about its substitution")
        return result(job.to_send(), job.sent, job.substitute_seconds)
    seconds = 0.0
    if candidates:  # a command each: substitute, then ask again what is missing
        seconds = await substitute_paths(
            host, candidates, budget=budget, options=substitute_options
        )
        lacking_now = await missing_paths(host, lacking, timeout=remaining())
    else:
        lacking_now = lacking
    if not lacking_now:
        return result([], 0, seconds)
    sent, done, ended = await _import_plain(host, lacking_now, timeout=remaining())
    _check_import(host, done, ended, timeout)
    return result(lacking_now, sent, seconds)
