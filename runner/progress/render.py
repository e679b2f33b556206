"""Renderers: pure functions of the view state (or one event) and a clock.

`render_live` gives the live view's screen lines; `render_plain_event` one plain
log line per event; the rest are the pieces the outputs share (failure tails,
totals, heartbeat, CI group headers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from runner.events import Event, EventKind
from runner.progress.model import (
    Counts,
    NodeView,
    Phase,
    ViewState,
    outcome_text,
    stage_end_text,
    start_text,
)
from runner.progress.text import (
    BOLD,
    CYAN,
    DIM,
    GREEN,
    RED,
    UNICODE,
    Glyphs,
    cell_width,
    clean,
    clean_lines,
    format_duration,
    pad_left,
    sgr,
    truncate,
)
from runner.results import Status

TIME_WIDTH = 5  # "1m05s"
MIN_LABEL = 5  # as Colmena's DEFAULT_LABEL_WIDTH

Segment = tuple[str, tuple[str, ...]]  # text and its SGR styles


def _fit(segments: Sequence[Segment], width: int, *, color: bool, ellipsis: str) -> str:
    """Segments joined by single spaces, cut to `width` cells; trailing blanks dropped."""
    out: list[str] = []
    used = 0
    parts = list(segments)
    while parts and not parts[-1][0].strip():
        parts.pop()
    for i, (text, styles) in enumerate(parts):
        sep = " " if i else ""
        room = width - used - len(sep)
        if room <= 0:
            break
        piece = truncate(text, room, ellipsis)
        out.append(sep + sgr(piece, *styles, color=color))
        used += len(sep) + cell_width(piece)
        if piece != text:
            break
    return "".join(out)


def label_width(state: ViewState, width: int) -> int:
    """The name column: the longest name (at least 5), at most a third of the line."""
    longest = max([MIN_LABEL, *(cell_width(n) for n in state.nodes)])
    return max(1, min(longest, max(MIN_LABEL, width // 3)))


_STYLE: dict[Phase, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # phase: (glyph style, message style)
    Phase.WAITING: ((DIM,), (DIM,)),
    Phase.RUNNING: ((CYAN,), ()),
    Phase.OK: ((GREEN,), ()),
    Phase.SKIPPED: ((DIM,), (DIM,)),
    Phase.FAILED: ((RED, BOLD), (RED,)),
}


def _glyph(phase: Phase, now: float, glyphs: Glyphs) -> str:
    if phase is Phase.RUNNING:
        return glyphs.spin(now)
    return {
        Phase.WAITING: glyphs.waiting,
        Phase.OK: glyphs.ok,
        Phase.SKIPPED: glyphs.skipped,
        Phase.FAILED: glyphs.failed,
    }[phase]


@dataclass(frozen=True)
class Columns:
    """How the live view's lines are laid out: the screen's width, the name column's width,
    colour, the status marks."""

    width: int
    label: int
    color: bool
    glyphs: Glyphs = UNICODE


def render_node_line(node: NodeView, *, now: float, columns: Columns) -> str:
    """`  sigma ⠹    7s copying path …`: name, status mark, elapsed, latest message."""
    label, glyphs = columns.label, columns.glyphs
    glyph_style, message_style = _STYLE[node.phase]
    elapsed = node.elapsed(now)
    message = node.message or ("waiting" if node.phase is Phase.WAITING else "")
    segments: list[Segment] = [
        (pad_left(truncate(node.name, label, glyphs.ellipsis), label), (BOLD,)),
        (_glyph(node.phase, now, glyphs), glyph_style),
        (pad_left("" if elapsed is None else format_duration(elapsed), TIME_WIDTH), (DIM,)),
        (message, message_style),
    ]
    return _fit(segments, columns.width, color=columns.color, ellipsis=glyphs.ellipsis)


def _hidden_text(hidden: Sequence[NodeView]) -> str:
    counts = Counts.of(hidden).nonzero("running", "succeeded", "skipped", "failed", "waiting")
    return f"+{len(hidden)} more: {counts}"


def _visible(nodes: Sequence[NodeView], slots: int) -> set[str]:
    """Which nodes get a line when not all fit: failed and running first, finished last.

    When failed and running nodes alone overflow, running ones keep at least half
    the lines and the most recent failures are shown.
    """
    if slots <= 0:
        return set()
    failed = sorted(
        (n for n in nodes if n.phase is Phase.FAILED),
        key=lambda n: -(n.ended_at or 0.0),
    )
    running = [n for n in nodes if n.phase is Phase.RUNNING]
    waiting = [n for n in nodes if n.phase is Phase.WAITING]
    finished = sorted(
        (n for n in nodes if n.phase in (Phase.OK, Phase.SKIPPED)),
        key=lambda n: -(n.ended_at or 0.0),
    )
    if len(failed) + len(running) > slots:
        keep_running = min(len(running), max(slots - len(failed), slots // 2))
        running = running[:keep_running]
        failed = failed[: slots - keep_running]
    chosen = [*failed, *running, *waiting, *finished][:slots]
    return {n.name for n in chosen}


def render_footer(state: ViewState, *, now: float, columns: Columns) -> str:
    """The counts line, in the node lines' columns; its mark spins until all nodes ended."""
    glyphs = columns.glyphs
    counts = state.counts()
    if counts.total and counts.finished:
        glyph, style = (glyphs.failed, (RED, BOLD)) if counts.failed else (glyphs.ok, (GREEN,))
    else:
        glyph, style = glyphs.spin(now), (CYAN,)
    segments: list[Segment] = [
        (" " * columns.label, ()),
        (glyph, style),
        (pad_left(format_duration(state.elapsed(now)), TIME_WIDTH), (DIM,)),
        (counts.describe(), (BOLD,)),
    ]
    return _fit(segments, columns.width, color=columns.color, ellipsis=glyphs.ellipsis)


def render_live(
    state: ViewState,
    *,
    now: float,
    width: int,
    height: int | None,
    color: bool,
    glyphs: Glyphs = UNICODE,
) -> list[str]:
    """The live view's screen: node lines, maybe a `+N more` line, then the footer.

    At most `height` lines (None: no limit) of at most `width` cells each. When
    the nodes do not fit, finished nodes (then waiting ones) fold into the
    `+N more: …` line; running and failed nodes keep their lines.
    """
    width = max(1, width)
    label = label_width(state, width)
    columns = Columns(width, label, color, glyphs)
    nodes = list(state.nodes.values())
    footer = render_footer(state, now=now, columns=columns)
    if height is not None and height <= 1:
        return [footer] if height == 1 else []
    if height is None or len(nodes) + 1 <= height:
        shown, hidden = nodes, []
    else:
        keep = _visible(nodes, height - 2)
        shown = [n for n in nodes if n.name in keep]
        hidden = [n for n in nodes if n.name not in keep]
    lines = [render_node_line(n, now=now, columns=columns) for n in shown]
    if hidden:
        more: list[Segment] = [
            (" " * label, ()),
            (" ", ()),
            (" " * TIME_WIDTH, ()),
            (_hidden_text(hidden), (DIM,)),
        ]
        lines.append(_fit(more, width, color=color, ellipsis=glyphs.ellipsis))
    lines.append(footer)
    return lines


# ---- plain mode -------------------------------------------------------------------------


def event_text(event: Event) -> tuple[list[str], tuple[str, ...]] | None:
    """The text lines of one event in the plain log and their style; None: not shown."""
    kind = event.kind
    if kind is EventKind.QUEUED:
        return None
    if kind is EventKind.STAGE_START:
        return [start_text(event.stage, event.message)], ()
    if kind is EventKind.LOG:
        text = clean(event.message).rstrip()
        return ([text], ()) if text.strip() else None
    if kind is EventKind.STAGE_END:
        r = event.result
        if r is None:
            return None
        style = {Status.OK: (GREEN,), Status.FAILED: (RED,), Status.SKIPPED: (DIM,)}[r.status]
        more = [line for line in clean_lines(r.message) if line.strip()][1:]
        return [stage_end_text(r), *more], style
    nr = event.node_result
    if nr is None:
        return None
    if not nr.ok:
        return [outcome_text(nr)], (RED, BOLD)
    return [outcome_text(nr)], (
        (DIM,) if any(s.status is Status.SKIPPED for s in nr.stages) else (GREEN, BOLD)
    )


def timestamp(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def plain_prefix(node: str, *, color: bool, label_width: int = 0) -> str:
    return sgr(pad_left(node, label_width), BOLD, color=color) + " | "


def render_plain_event(
    event: Event, *, color: bool, timestamps: bool, label_width: int = 0
) -> str | None:
    """`web1 | activate failed: …`: one line per event (more for a multi-line message).

    Colmena's format: the node right-aligned to `label_width`, ` | `, the text.
    With `timestamps`, each line starts with the event's local time `HH:MM:SS `.
    Queued events and blank log lines give None.
    """
    rendered = event_text(event)
    if rendered is None:
        return None
    lines, style = rendered
    prefix = plain_prefix(event.node, color=color, label_width=label_width)
    if timestamps:
        prefix = sgr(timestamp(event.time), DIM, color=color) + " " + prefix
    return "\n".join(prefix + sgr(line, *style, color=color) for line in lines)


def node_duration(node: NodeView, now: float) -> str:
    """From the node's first stage to its end (or `now`, when it has not ended)."""
    end = node.ended_at if node.ended_at is not None else now
    start = node.started_at if node.started_at is not None else node.first_seen
    return format_duration(max(0.0, end - start))


def node_outcome(node: NodeView) -> str:
    if node.result is not None:
        return outcome_text(node.result)
    if node.failure is not None:
        return f"failed at {node.failure.stage}: {node.failure.message}".rstrip(": ")
    return "did not finish"


def group_header(node: NodeView, now: float) -> str:
    """`web1 — succeeded (12s)`: the title of a node's folded log in CI."""
    return f"{node.name} — {node_outcome(node)} ({node_duration(node, now)})"


def failure_tail(node: NodeView, lines: int = 20) -> list[str]:
    """The last lines worth reading about a failure: the failed stage's detail (Nix's
    error, the activation log) when it has one, else the node's last log lines."""
    detail = clean_lines(node.failure.detail) if node.failure is not None else []
    if any(line.strip() for line in detail):
        return detail[-lines:]
    return list(node.log)[-lines:]


def render_failures(state: ViewState, *, color: bool, lines: int = 20) -> list[str]:
    """The failed nodes' section: a header per node and the tail of its log."""
    failed = state.failed()
    if not failed:
        return []
    label = max(cell_width(n.name) for n in failed)
    out = [
        sgr(
            f"Failed nodes ({len(failed)}): {', '.join(n.name for n in failed)}",
            RED,
            BOLD,
            color=color,
        )
    ]
    for n in failed:
        out.append(sgr(f"{n.name}: {node_outcome(n)}", RED, color=color))
        tail = failure_tail(n, lines)
        prefix = plain_prefix(n.name, color=color, label_width=label)
        out.extend(f"  {prefix}{line}".rstrip() for line in tail)
    return out


def render_totals(state: ViewState, *, now: float) -> str:
    """`5 nodes: 3 succeeded, 1 skipped, 1 failed in 1m05s`."""
    c = state.counts()
    counts = c.nonzero("succeeded", "skipped", "failed", "running", "waiting")
    noun = "node" if c.total == 1 else "nodes"
    return f"{c.total} {noun}: {counts or 'nothing to do'} in {format_duration(state.elapsed(now))}"


def render_heartbeat(state: ViewState, *, now: float, names: int = 5) -> str:
    """`waggle: 2 running, … (3m00s); running: web1 (activate 2m01s), web2 (push 5s)`."""
    running = [n for n in state.nodes.values() if n.phase is Phase.RUNNING]
    text = f"waggle: {state.counts().describe()} ({format_duration(state.elapsed(now))})"
    if running:
        shown = [
            f"{n.name} ({n.stage} {format_duration(n.elapsed(now) or 0.0)})"
            if n.stage is not None
            else n.name
            for n in running[:names]
        ]
        more = f", +{len(running) - names} more" if len(running) > names else ""
        text += f"; running: {', '.join(shown)}{more}"
    return text
