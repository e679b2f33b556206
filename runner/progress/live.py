"""The live terminal view: one line per node, redrawn in place ten times a second.

Drawing is plain ANSI/VT100: the frame is rewritten from its first line each tick
(cursor up; each line erased whole, then written; erase-below at the end), in a
single write, wrapped in synchronized-output marks where the terminal knows them,
so there is no flicker and no full-screen clear. Erasing the whole line (EL 2, not
erase-to-end) also drops the "wrapped" mark a reflowing terminal (tmux) puts on a
row; a stale mark would make the terminal join two of our lines on the next resize. Autowrap is off while the
view is open, so a line whose width the terminal counts differently from us is
cut at the margin instead of wrapping and shifting the frame.

Resize: each tick reads the terminal size (an ioctl), so a resize is seen within
one tick without a SIGWINCH handler (signal handlers can only be set from the
main thread, and asyncio may own them). When the terminal got narrower, terminals
that reflow (tmux, VTE, kitty, iTerm2) may have wrapped the previous frame's lines
onto more rows, so the cursor moves up by the rows the previous frame takes at the
new width; on terminals that clip instead this overshoots by a few rows and erases
some lines of earlier output above the view, which beats leaving stale copies.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable
from typing import TextIO

from typing_extensions import override

from runner.events import Event
from runner.progress.output import Output
from runner.progress.render import render_failures, render_live
from runner.progress.text import UNICODE, Glyphs, rows_at, visible_width

HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
NO_AUTOWRAP = "\x1b[?7l"
AUTOWRAP = "\x1b[?7h"
SYNC_BEGIN = "\x1b[?2026h"  # synchronized output (ignored where unknown)
SYNC_END = "\x1b[?2026l"
ERASE_LINE = "\x1b[2K"
ERASE_BELOW = "\x1b[J"

Size = tuple[int, int]  # columns, rows


def terminal_size(stream: TextIO, fallback: Size = (80, 24)) -> Size:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return fallback
    columns, rows = size.columns or fallback[0], size.lines or fallback[1]
    return columns, rows


class LiveView(Output):
    """A Sink drawing the run live on a terminal; a context manager around the run.

    On exit the live frame is replaced by a static summary: every node's final
    line, the footer, then the failed nodes' last log lines. The cursor and
    autowrap are restored even when the run raised.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        color: bool,
        glyphs: Glyphs = UNICODE,
        fps: float = 10.0,
        clock: Callable[[], float] = time.time,
        size: Callable[[], Size] | None = None,
        started_at: float | None = None,
        tail_lines: int = 20,
    ) -> None:
        super().__init__(
            stream, color=color, clock=clock, started_at=started_at, tail_lines=tail_lines
        )
        self.glyphs = glyphs
        self.interval = 1.0 / fps
        self.size: Callable[[], Size] = size or (lambda: terminal_size(stream))
        self._active = False
        self._widths: list[int] = []  # cells of each line of the frame on screen
        self._columns = 0  # terminal width when that frame was drawn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # `lock` guards the state, `_io` the terminal. Events only wait for the state
        # lock, never for terminal output, so a paused terminal (Ctrl-S) cannot block
        # the pipeline's event loop.
        self._io = threading.RLock()

    @override
    def __call__(self, event: Event) -> None:
        with self.lock:
            self.state.apply(event)

    def _render(self, columns: int, rows: int | None) -> list[str]:
        with self.lock:
            return render_live(
                self.state,
                now=self.clock(),
                width=max(1, columns - 1),
                height=None if rows is None else max(1, rows - 1),
                color=self.color,
                glyphs=self.glyphs,
            )

    @override
    def open(self) -> None:
        with self.lock:
            if self.state.started_at is None:
                self.state.started_at = self.clock()
        with self._io:
            self._active = True
            self._write(HIDE_CURSOR + NO_AUTOWRAP)
            self._draw()
        atexit.register(self._restore)  # should the program end without closing the view
        self._stop.clear()
        self._thread = threading.Thread(target=self._tick, name="waggle-live-view", daemon=True)
        self._thread.start()

    def _restore(self) -> None:
        with self._io:
            if self._active:
                self._active = False
                self._write("\n" + AUTOWRAP + SHOW_CURSOR)

    @override
    def close(self) -> None:
        atexit.unregister(self._restore)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._io:
            if not self._active:
                return
            self._active = False
            columns, _ = self.size()
            lines: list[str] = []
            with self.lock:
                if self.state.nodes:
                    lines = self._render(columns, None)
                    failures = render_failures(self.state, color=self.color, lines=self.tail_lines)
                    if failures:
                        lines += ["", *failures]
            text = "".join(f"{line}\n" for line in lines)
            self._write(self._home(columns) + ERASE_BELOW + AUTOWRAP + SHOW_CURSOR + text)
            self._widths = []

    def refresh(self) -> None:
        """Draw the current state now (the timer does this every tick)."""
        with self._io:
            if self._active:
                self._draw()

    @override
    def write_above(self, text: str) -> None:
        with self._io:
            if not self._active:
                self._write(text.rstrip("\n") + "\n")
                return
            columns, _ = self.size()
            self._write(
                SYNC_BEGIN
                + self._home(columns)
                + ERASE_BELOW
                + AUTOWRAP
                + text.rstrip("\n")
                + "\n"
                + NO_AUTOWRAP
            )
            self._widths = []
            self._draw(sync_begun=True)

    # ---- drawing (under the terminal lock) --------------------------------------------

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except (OSError, ValueError):  # the stream went away: stop drawing
                return

    def _home(self, columns: int) -> str:
        """From the cursor (end of the frame's last line) to the frame's first column."""
        if not self._widths:
            return "\r"
        if columns < self._columns:
            rows = sum(rows_at(w, columns) for w in self._widths)
        else:
            rows = len(self._widths)
        return "\r" + (f"\x1b[{rows - 1}A" if rows > 1 else "")

    def _draw(self, *, sync_begun: bool = False) -> None:
        columns, rows = self.size()
        lines = self._render(columns, rows)
        body = "\r\n".join(ERASE_LINE + line for line in lines) + ERASE_BELOW
        self._write(("" if sync_begun else SYNC_BEGIN) + self._home(columns) + body + SYNC_END)
        self._widths = [visible_width(line) for line in lines]
        self._columns = columns

    def _write(self, data: str) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream or a gone terminal: nothing to show
            pass
