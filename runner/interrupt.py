"""Stopping a run on SIGINT or SIGTERM (Ctrl-C, a cancelled CI job).

Both signals are handled alike: the running command's task is cancelled, so
every `await` below it unwinds. On the way out, local processes are killed by
process group and tree (`runner.process`), connections are closed, and the
application layer writes its reports with the unfinished nodes marked as
interrupted. Activations already started on hosts are detached and finish (or
roll back) by themselves. The exit status is 128 + the signal's number.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []


def received() -> int | None:
    """The first stopping signal this process got, if any."""
    return _received[0] if _received else None


def reason() -> str:
    """Why unfinished work stopped, for reports: "interrupted by SIGTERM"."""
    signum = received()
    return f"interrupted by {signal.Signals(signum).name}" if signum else "interrupted"


def exit_status(default: int) -> int:
    signum = received()
    return 128 + signum if signum else default


async def cancelled_on_signals(work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; the first SIGINT or SIGTERM cancels it (a second one cancels again)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        _received.append(signum)
        task.cancel()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await work
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
