"""The process runner: timeouts kill the whole group, stderr streams, memory is sampled."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from runner import process
from runner.errors import ToolMissingError


def test_output_and_status():
    done = asyncio.run(process.run(["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err")
    assert not done.ok


def test_stdin():
    done = asyncio.run(process.run(["cat"], input_data=b"hello"))
    assert done.stdout == "hello"


def test_timeout_kills_children(tmp_path):
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    done = asyncio.run(
        process.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=0.5)
    )
    assert done.timed_out and time.monotonic() - start < 10
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and time.monotonic() < deadline:
        if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.05)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_stderr_lines_stream_with_time_and_memory():
    seen = []
    script = "echo one >&2; sleep 0.3; echo two >&2"
    done = asyncio.run(
        process.run(
            ["sh", "-c", script],
            on_stderr_line=lambda line, t, rss: seen.append((line, t, rss)),
            sample_memory=True,
        )
    )
    assert [s[0] for s in seen] == ["one", "two"]
    assert seen[1][1] - seen[0][1] >= 0.25
    assert done.peak_rss > 0


def test_missing_program():
    with pytest.raises(ToolMissingError, match="no-such-program"):
        asyncio.run(process.run(["no-such-program"]))


def test_stop_event_kills_the_group_and_says_so(tmp_path):
    # Stopping from outside (the evaluator recycles a worker): the whole group dies at once,
    # what was printed so far is kept, and the result says it was stopped (not a failure of
    # its own, not a timeout).
    pidfile = tmp_path / "pid"
    seen: list[str] = []

    async def main() -> process.Completed:
        stop = asyncio.Event()

        def on_line(line: str, _t: float, _rss: int) -> None:
            seen.append(line)
            if line == "ready":
                stop.set()

        script = f"sleep 60 & echo $! > {pidfile}; echo ready >&2; wait"
        return await process.run(["sh", "-c", script], on_stderr_line=on_line, stop=stop)

    start = time.monotonic()
    done = asyncio.run(main())
    assert time.monotonic() - start < 5
    assert done.stopped and not done.timed_out and not done.ok
    assert seen == ["ready"]
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and time.monotonic() < deadline:
        if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.05)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_process_that_ends_before_the_stop_is_not_stopped():
    async def main() -> process.Completed:
        return await process.run(["sh", "-c", "echo hi"], stop=asyncio.Event())

    done = asyncio.run(main())
    assert done.ok and not done.stopped and done.stdout == "hi\n"
