"""The plain log: one line per event, for CI logs, pipes and `--plain`/`-v`.

Without a CI provider every event is printed as it comes (`node | message`).
With `provider="github"` or `"gitlab"` each node's lines are held back until the
node ends and printed as one block, so concurrent nodes never interleave inside
a block:

- GitHub Actions: a success is one folded `::group::<node> — succeeded (12s)` …
  `::endgroup::`. GitHub cannot show a group unfolded, so a failure is not put in
  a group: an `::error title=<node>::<outcome>` annotation (for the first 10
  failed nodes, GitHub's per-step limit), a header line, then its lines, open.
- GitLab CI: a collapsible section per node, `[collapsed=true]` for successes
  and open for failures (GitLab reads `collapsed` only at `section_start`, which
  is why the lines are held back until the outcome is known).

At the end (on exit): the failed nodes' last log lines and a totals line.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal, TextIO

from typing_extensions import override

from runner.events import Event, EventKind
from runner.github import ANNOTATION_LIMIT, annotation
from runner.progress.model import NodeView, Phase
from runner.progress.output import Output
from runner.progress.render import (
    group_header,
    node_outcome,
    render_failures,
    render_heartbeat,
    render_plain_event,
    render_totals,
)
from runner.progress.text import BOLD, DIM, RED, sgr

Provider = Literal["github", "gitlab"]


def github_block(
    node: NodeView, lines: Sequence[str], *, color: bool, now: float, annotate: bool = True
) -> list[str]:
    """A finished node's log for GitHub Actions: folded when it succeeded, open when not."""
    header = group_header(node, now)
    if node.phase is not Phase.FAILED and node.phase.finished:
        return [f"::group::{header}", *lines, "::endgroup::"]
    out = []
    if annotate and node.phase is Phase.FAILED:
        out.append(annotation("error", node.name, node_outcome(node)))
    style = (RED, BOLD) if node.phase is Phase.FAILED else (BOLD,)
    return [*out, sgr(header, *style, color=color), *lines]


_SECTION_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def gitlab_section_name(node: NodeView) -> str:
    """Unique per run and of the characters GitLab allows: `waggle_3_web1.example.com`."""
    return f"waggle_{node.order}_{_SECTION_UNSAFE.sub('_', node.name)}"


def gitlab_block(node: NodeView, lines: Sequence[str], *, color: bool, now: float) -> list[str]:
    """A finished node's log as a GitLab collapsible section, collapsed when it succeeded."""
    name = gitlab_section_name(node)
    start = int(node.first_seen)
    end = int(node.ended_at if node.ended_at is not None else now)
    collapsed = node.phase.finished and node.phase is not Phase.FAILED
    options = "[collapsed=true]" if collapsed else ""
    style = (RED, BOLD) if node.phase is Phase.FAILED else (BOLD,)
    header = sgr(group_header(node, now), *style, color=color)
    return [
        f"\x1b[0Ksection_start:{start}:{name}{options}\r\x1b[0K{header}",
        *lines,
        f"\x1b[0Ksection_end:{end}:{name}\r\x1b[0K",
    ]


class _Buffer:
    def __init__(self, limit: int) -> None:
        self.lines: deque[str] = deque(maxlen=limit)
        self.dropped = 0

    def add(self, text: str) -> None:
        for line in text.split("\n"):
            if len(self.lines) == self.lines.maxlen:
                self.dropped += 1
            self.lines.append(line)

    def take(self, color: bool) -> list[str]:
        lines = list(self.lines)
        if self.dropped:
            note = f"… {self.dropped} earlier lines not shown"
            lines.insert(0, sgr(note, DIM, color=color))
        return lines


class PlainLog(Output):
    """A Sink writing the plain log to `stream`; a context manager around the run."""

    def __init__(
        self,
        stream: TextIO,
        *,
        color: bool = False,
        timestamps: bool = False,
        provider: Provider | None = None,
        label_width: int = 0,
        annotate: bool = True,
        heartbeat: float | None = None,
        clock: Callable[[], float] = time.time,
        started_at: float | None = None,
        tail_lines: int = 20,
        max_buffered_lines: int = 10_000,
    ) -> None:
        super().__init__(
            stream, color=color, clock=clock, started_at=started_at, tail_lines=tail_lines
        )
        self.timestamps = timestamps
        self.provider = provider
        self.label_width = label_width
        self.annotate = annotate
        self.heartbeat = heartbeat
        self.max_buffered_lines = max_buffered_lines
        self._buffers: dict[str, _Buffer] = {}
        self._annotations = 0
        self._last_write = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @override
    def __call__(self, event: Event) -> None:
        with self.lock:
            self.state.apply(event)
            line = render_plain_event(
                event, color=self.color, timestamps=self.timestamps, label_width=self.label_width
            )
            if self.provider is None:
                if line is not None:
                    self._write([line])
                return
            buffer = self._buffers.setdefault(event.node, _Buffer(self.max_buffered_lines))
            if line is not None:
                buffer.add(line)
            if event.kind is EventKind.NODE_END:
                node = self.state.nodes[event.node]
                self._write(self._block(node, self._buffers.pop(event.node).take(self.color)))

    def _block(self, node: NodeView, lines: list[str]) -> list[str]:
        if self.provider == "github":
            annotate = self.annotate and self._annotations < ANNOTATION_LIMIT
            if annotate and node.phase is Phase.FAILED:
                self._annotations += 1
            return github_block(node, lines, color=self.color, now=self.clock(), annotate=annotate)
        return gitlab_block(node, lines, color=self.color, now=self.clock())

    @override
    def write_above(self, text: str) -> None:
        with self.lock:
            self._write(text.rstrip("\n").split("\n"))

    @override
    def open(self) -> None:
        with self.lock:
            if self.state.started_at is None:
                self.state.started_at = self.clock()
            self._last_write = self.clock()
        if self.heartbeat is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="waggle-heartbeat", daemon=True)
            self._thread.start()

    @override
    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self.lock:
            if self._closed:
                return
            self._closed = True
            out: list[str] = []
            for name, buffer in list(self._buffers.items()):  # nodes that never ended
                node = self.state.nodes[name]
                lines = buffer.take(self.color)
                if self.provider == "github":
                    out += github_block(
                        node, lines, color=self.color, now=self.clock(), annotate=False
                    )
                else:
                    out += gitlab_block(node, lines, color=self.color, now=self.clock())
            self._buffers.clear()
            failures = render_failures(self.state, color=self.color, lines=self.tail_lines)
            if failures:
                out += ["", *failures]
            if self.state.nodes:
                out += ["", render_totals(self.state, now=self.clock())]
            self._write(out)

    def _beat(self) -> None:
        assert self.heartbeat is not None
        while not self._stop.wait(min(1.0, self.heartbeat)):
            with self.lock:
                now = self.clock()
                running = self.state.counts().running
                if running and now - self._last_write >= self.heartbeat:
                    self._write([render_heartbeat(self.state, now=now)])

    def _write(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        try:
            self.stream.write("".join(f"{line}\n" for line in lines))
            self.stream.flush()
        except (OSError, ValueError):
            pass
        self._last_write = self.clock()
