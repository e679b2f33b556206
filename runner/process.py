"""The one place that starts local processes.

Everything that runs a program (nix, ssh helpers, key commands) calls
`run`. It enforces a timeout, kills the whole process group on timeout or
cancellation so nothing is left behind, can stream stderr lines to a callback
while the program runs, and can sample the peak memory of the process tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import psutil

from runner.errors import ToolMissingError

StderrCallback = Callable[[str, float, int], None]
"""Called with (line, seconds since start, current RSS of the tree in bytes)."""

SAMPLE_INTERVAL = 0.05


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    peak_rss: int
    timed_out: bool
    stopped: bool = False  # killed because the caller's `stop` event was set

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.stopped


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class _Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.current = 0
        self.peak = 0

    def sample(self) -> int:
        rss = tree_rss(self.pid)
        if rss:
            self.current = rss
            self.peak = max(self.peak, rss)
        return self.current

    async def loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the process, its group and every descendant.

    Descendants are collected first: Nix runs builders in sessions of their
    own, so a builder is not in nix-store's process group and would outlive it.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


async def _spawn(
    argv: Sequence[str],
    *,
    stdin: int,
    env: Mapping[str, str] | None,
    cwd: str | None = None,
) -> asyncio.subprocess.Process:
    """Start argv in a session of its own (so its whole group can be killed), stdout and
    stderr piped; ToolMissingError naming the program when it is not there."""
    full_env = None if env is None else {**os.environ, **env}
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise ToolMissingError(f"{argv[0]} is not installed or not on PATH") from e


async def _read_stderr(
    proc: asyncio.subprocess.Process, lines: list[str], on_line: Callable[[str], None]
) -> None:
    """Collect the process's stderr into `lines`, handing each line to `on_line` as it comes."""
    assert proc.stderr is not None
    while True:
        raw = await proc.stderr.readline()
        if not raw:
            return
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        on_line(line)


async def _communicate(
    proc: asyncio.subprocess.Process,
    input_data: bytes | None,
    stderr_lines: list[str],
    on_stderr_line: Callable[[str], None],
) -> bytes:
    """Feed stdin, read stdout to its end, wait for stderr (`_read_stderr`) and the exit;
    stdout's bytes."""
    stderr_task = asyncio.create_task(_read_stderr(proc, stderr_lines, on_stderr_line))
    if input_data is not None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(input_data)
            await proc.stdin.drain()
        proc.stdin.close()
    assert proc.stdout is not None
    out = await proc.stdout.read()
    await stderr_task
    await proc.wait()
    return out


async def run(
    argv: Sequence[str],
    *,
    input_data: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    on_stderr_line: StderrCallback | None = None,
    sample_memory: bool = False,
    stop: asyncio.Event | None = None,
) -> Completed:
    """Run argv to completion; never raises for a non-zero exit status.

    When `stop` is set before the process ends, its group is killed and the result says
    `stopped` (with whatever it printed until then).
    """
    start = time.monotonic()
    stdin = asyncio.subprocess.PIPE if input_data is not None else asyncio.subprocess.DEVNULL
    proc = await _spawn(argv, stdin=stdin, env=env, cwd=cwd)
    sampler = _Sampler(proc.pid)
    sampler_task = asyncio.create_task(sampler.loop()) if sample_memory else None
    stderr_lines: list[str] = []

    def on_line(line: str) -> None:
        if on_stderr_line is not None:
            rss = sampler.sample() if sample_memory else 0
            on_stderr_line(line, time.monotonic() - start, rss)

    timed_out = stopped = False
    stdout = b""
    try:
        communicating = _communicate(proc, input_data, stderr_lines, on_line)
        if stop is None:
            stdout = await asyncio.wait_for(communicating, timeout)
        else:
            stdout, stopped = await _until_stopped(proc, communicating, stop, timeout)
    except TimeoutError:
        timed_out = True
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
    except BaseException:
        _kill_group(proc)
        # Reaped while the loop runs (bounded): a transport left behind warns at exit.
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(proc.wait()), REAP_TIMEOUT)
        raise
    finally:
        if sampler_task is not None:
            sampler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler_task
    return Completed(
        argv=tuple(argv),
        returncode=proc.returncode if proc.returncode is not None else -9,
        stdout=stdout.decode(errors="replace"),
        stderr="\n".join(stderr_lines),
        duration=time.monotonic() - start,
        peak_rss=sampler.peak,
        timed_out=timed_out,
        stopped=stopped,
    )


async def _until_stopped(
    proc: asyncio.subprocess.Process,
    communicating: Awaitable[bytes],
    stop: asyncio.Event,
    timeout: float | None,
) -> tuple[bytes, bool]:
    """Await `communicating` unless `stop` is set first: then kill the group and let the
    pipes drain (bounded by REAP_TIMEOUT). Stdout and whether it was stopped."""
    talking = asyncio.ensure_future(communicating)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {talking, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if talking in done:
            return talking.result(), False
        if not done:
            raise TimeoutError
        _kill_group(proc)
        try:
            return await asyncio.wait_for(asyncio.shield(talking), REAP_TIMEOUT), True
        except TimeoutError:
            return b"", True
    finally:
        stopping.cancel()
        talking.cancel()


REAP_TIMEOUT = 5.0
"""Seconds a killed process (and its pipes) may take to be gone."""


@dataclass
class Reading:
    """A running process whose stdout is read as a stream."""

    proc: asyncio.subprocess.Process
    stdout: asyncio.StreamReader
    _stderr: asyncio.Task[bytes]

    async def wait(self, timeout: float | None = None) -> tuple[int, str]:
        """Exit status and stderr, once stdout is consumed.

        Past `timeout` the process group is killed (see `kill`): a process still writing
        into a pipe that nobody reads any more would never end by itself.
        """
        try:
            status = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return await self.kill()
        return status, await self._stderr_text()

    async def kill(self) -> tuple[int, str]:
        """Kill the process group unless the process has ended; reap it; status and stderr.

        Bounded by REAP_TIMEOUT. Whatever is left on stdout is discarded (asyncio reaps a
        process only once its pipes are closed). A process that ended by itself keeps its own
        exit status; a killed one has -SIGKILL.
        """
        if self.proc.returncode is None:
            _kill_group(self.proc)

        async def reap() -> int:
            while await self.stdout.read(1 << 16):
                pass
            return await self.proc.wait()

        try:
            status = await asyncio.wait_for(reap(), REAP_TIMEOUT)
        except (TimeoutError, OSError, RuntimeError):  # RuntimeError: stdout read elsewhere
            code = self.proc.returncode
            status = code if code is not None else -signal.SIGKILL
        return status, await self._stderr_text()

    async def _stderr_text(self) -> str:
        try:
            data = await asyncio.wait_for(asyncio.shield(self._stderr), REAP_TIMEOUT)
        except (TimeoutError, OSError):
            return ""
        return data.decode(errors="replace")


@contextlib.asynccontextmanager
async def reading(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None
) -> AsyncIterator[Reading]:
    """Start argv with its stdout as a stream (e.g. `nix-store --export` piped to a host).

    Stderr is collected in the background; when the block is left the process group is
    killed if the process has not ended, and reaped (bounded: `Reading.kill`).
    """
    proc = await _spawn(argv, stdin=asyncio.subprocess.DEVNULL, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.create_task(proc.stderr.read())
    running = Reading(proc, proc.stdout, stderr_task)
    try:
        yield running
    finally:
        if proc.returncode is None:
            await running.kill()
        if not stderr_task.done():
            stderr_task.cancel()
