"""What both outputs are: a Sink of events, a context manager, and a place to log to."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Self, TextIO

from typing_extensions import override

from runner.events import Event
from runner.progress.model import ViewState


class Output(ABC):
    """A Sink (`output(event)`) that owns its stream between `__enter__` and `__exit__`.

    Events may come from any thread (the pipeline's event loop); the output
    applies them under its own lock. While it is open, anything else for the same
    stream goes through `write_above` (or `log_handler()`), so it never lands in the
    middle of a redraw or of a CI log group.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        color: bool,
        clock: Callable[[], float],
        started_at: float | None,
        tail_lines: int,
    ) -> None:
        self.state = ViewState(started_at, tail_lines=tail_lines)
        self.lock = threading.RLock()
        self.stream = stream
        self.color = color
        self.clock = clock
        self.tail_lines = tail_lines

    @abstractmethod
    def __call__(self, event: Event) -> None: ...

    @abstractmethod
    def write_above(self, text: str) -> None:
        """Print `text` (a line or more) above the live view or between log groups."""

    def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_handler(self, level: int = logging.NOTSET) -> logging.Handler:
        """A logging handler writing through `write_above`: install it instead of a
        StreamHandler on the same stream while the output is open."""
        return OutputHandler(self, level)


class OutputHandler(logging.Handler):
    def __init__(self, output: Output, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.output = output

    @override
    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.output.write_above(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)
