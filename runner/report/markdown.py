"""`--report-md PATH` and the GitHub step summary: the run as GitHub-flavoured markdown.

Layout:

    ## Waggle: apply switch — 3 ok, 1 failed, 2 unchanged (of 6 nodes) in 42 s

    Hive `./hive.nix` at commit `abc1234`, goal `switch`, started 2025-01-01 12:00:00 UTC.
    (With --shard: "Shard 2/3 (waggle.shard/1): 4 nodes of the 10 selected; ...".)

    | Node | Status | eval | build | push | activate | Pushed | Closure |
    | :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: |
    | **web2** | ❌ failed | 1.2 s | 3.0 s | 0.8 s | ❌ 4.1 s | 12/340 paths, 3.0 MiB | 1.1 GiB |
    | web1 | ✅ ok | ... |

    ### ❌ web2: activate failed

    **activate:** switch-to-configuration failed (exit 4)

    <details><summary>web2 activate: log (last 50 of 1234 lines)</summary>

    ```
    ...
    ```

    </details>

Failed nodes come first in the table and have a section each; the other nodes follow in
selection order. With `--waves` the table has a Wave column and is grouped by wave (failed
nodes first within each), and a note above it gives each wave's counts and why later waves
were not reached ("Wave 1 exceeded the failure budget (1 failed): 5 nodes not reached"). A stage cell holds its duration ("❌ 4.1 s" if it failed), "skipped (reason)"
or "—" if the node never got there. "Pushed" appears when the run pushes (facts `paths_sent`, `paths_total`,
`bytes_sent` of the push stage), "Closure" when a stage has a non-zero `closure_bytes` fact.

With a size `limit` (UTF-8 bytes), log tails shrink first (50 lines of up to 1000
characters, then 30, 15, 8, 3 shorter lines), then the last failed nodes lose their tail,
then their section, then table rows go from the end; a note says what was left out. The
result is never cut inside a character, a table row or a code block, and still has every
node row unless the table alone is over the limit.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.report import (
    NodeStatus,
    human_bytes,
    human_seconds,
    iso_utc,
    node_status,
    one_line,
    report_stages,
    stage_result,
    status_counts,
    tail_lines,
)
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status
from runner.shard import RULE as SHARD_RULE

STEP_SUMMARY_LIMIT = 1024 * 1024  # GitHub: "supports content up to a size of 1024k" per step
STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"

_ICON: dict[NodeStatus, str] = {
    "ok": "✅",
    "failed": "❌",
    "unchanged": "⚪",
    "skipped": "⏭️",
}
# (lines, characters per line) of log tails, tried in order until the report fits.
_TAIL_LEVELS: tuple[tuple[int, int], ...] = (
    (50, 1000),
    (30, 400),
    (15, 200),
    (8, 160),
    (3, 120),
)
_NOT_SELECTED_SHOWN = 20
_MESSAGE_CHARS = 2000
_ESCAPE = re.compile(r"([\\`*_\[\]<>|~&])")
_FENCE_LINE = re.compile(r"^ {0,3}(`{3,})([^`]*)$")


@dataclass(frozen=True)
class _Shape:
    """How much of the report to render; failed nodes count in table order."""

    tail: tuple[int, int] = _TAIL_LEVELS[0]  # log tails: (lines, characters per line)
    tails: int | None = None  # how many failed nodes get a log tail; None: all
    sections: int | None = None  # how many failed nodes get a section; None: all
    rows: int | None = None  # how many table rows; None: all


def markdown(summary: RunSummary, *, limit: int | None = None) -> str:
    """The markdown report; with `limit`, at most that many UTF-8 bytes (see module doc)."""
    report = _Report(summary, limit)
    if limit is None:
        return report.render(_Shape())
    for tail in _TAIL_LEVELS:  # shorter log tails
        text = report.render(_Shape(tail))
        if _size(text) <= limit:
            return text
    last, failed, nodes = _TAIL_LEVELS[-1], len(report.failed), len(report.nodes)
    # then log tails for fewer failed nodes, then sections for fewer, then fewer table rows
    shrunk = (
        _fit(report, lambda k: _Shape(last, tails=k), failed, limit)
        or _fit(report, lambda k: _Shape(last, tails=0, sections=k), failed, limit)
        or _fit(report, lambda k: _Shape(last, tails=0, sections=0, rows=k), nodes, limit)
    )
    return shrunk or _cut(_headline(summary) + "\n", limit)  # tiny limit: part of the headline


def _fit(report: _Report, shape: Callable[[int], _Shape], most: int, limit: int) -> str | None:
    """The report in `shape(k)` for the largest k in 0..most that fits in `limit` bytes
    (the size grows with k); None if not even k = 0 fits."""
    lo, hi = -1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _size(report.render(shape(mid))) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return None if lo < 0 else report.render(shape(lo))


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _cut(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes of `text`, never half a character."""
    return text.encode("utf-8")[: max(0, limit)].decode("utf-8", errors="ignore")


def escape(text: str, max_chars: int = 500) -> str:
    """Text for a markdown paragraph or table cell: one line, markdown punctuation
    backslash-escaped (so `|` cannot end a cell, nor a backtick open code)."""
    return _ESCAPE.sub(r"\\\1", one_line(text, max_chars))


def code(text: str, max_chars: int = 500) -> str:
    """An inline code span holding `text` (one line), whatever backticks it contains."""
    flat = one_line(text, max_chars)
    fence = "`" * (max((len(r) for r in re.findall("`+", flat)), default=0) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") or not flat.strip() else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


def code_block(text: str) -> str:
    """A fenced code block holding `text`: the fence is longer than any backtick run in it."""
    fence = "`" * max(3, max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    return f"{fence}\n{text}\n{fence}"


def open_fence(text: str) -> str | None:
    """The fence of the backtick code block still open at the end of `text`, or None
    (CommonMark: an opening fence is 3+ backticks after at most 3 spaces; a closing one is
    at least as many backticks alone on a line). For closing a block that a cut ends in."""
    fence: str | None = None
    for line in text.split("\n"):
        match = _FENCE_LINE.match(line)
        if match is None:
            continue
        if fence is None:
            fence = match.group(1)
        elif len(match.group(1)) >= len(fence) and not match.group(2).strip():
            fence = None
    return fence


def _headline(summary: RunSummary) -> str:
    counts = status_counts(summary.nodes)
    rolled = sum(1 for n in summary.nodes if n.rolled_back)
    parts = [f"{counts['ok']} ok", f"{counts['failed']} failed"]
    if rolled:
        parts[-1] += f", {rolled} of them rolled back"
    parts += [f"{counts[s]} {s}" for s in ("unchanged", "skipped") if counts[s]]
    total = len(summary.nodes)
    return (
        f"## Waggle: {escape(summary.command, 200)} — {', '.join(parts)} "
        f"(of {total} node{'' if total == 1 else 's'}) in {human_seconds(summary.seconds)}"
    )


def _context(summary: RunSummary) -> str:
    at = f" at commit {code(summary.commit, 100)}" if summary.commit else ""
    started = iso_utc(summary.started_at, timespec="seconds", zone=False).replace("T", " ")
    text = (
        f"Hive {code(summary.hive, 300)}{at}, goal {code(summary.goal, 100)}, "
        f"started {started} UTC."
    )
    if summary.run_id:
        text += f" Run {code(summary.run_id, 100)}."
    if summary.shard is not None:
        text += (
            f" Shard {summary.shard} ({SHARD_RULE}): {_nodes(len(summary.nodes))} of the "
            f"{len(summary.sharded_from)} selected; the other shards' are in their own reports."
        )
    left_out = summary.not_selected
    if left_out:
        shown = ", ".join(code(n, 100) for n in left_out[:_NOT_SELECTED_SHOWN])
        more = len(left_out) - _NOT_SELECTED_SHOWN
        shown += f" and {more} more" if more > 0 else ""
        text += f" {len(left_out)} not selected: {shown}."
    return text


def _stage_cell(node: NodeResult, stage: Stage) -> str:
    result = stage_result(node, stage)
    if result is None:
        return "—"
    if result.status is Status.FAILED:
        return f"❌ {human_seconds(result.seconds)}"
    if result.status is Status.SKIPPED and node.not_reached:
        return "not reached"  # the wave note above the table says why
    if result.status is Status.SKIPPED:
        reason = escape(result.message, 40)
        return f"skipped ({reason})" if reason else "skipped"
    return human_seconds(result.seconds)


def _number(value: float | str | None) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _pushed_cell(node: NodeResult) -> str:
    push = stage_result(node, Stage.PUSH)
    if push is None:
        return "—"
    sent, total = _number(push.fact("paths_sent")), _number(push.fact("paths_total"))
    sent_bytes = _number(push.fact("bytes_sent"))
    parts = []
    if sent is not None:
        parts.append(
            f"{int(sent)}/{int(total)} paths" if total is not None else f"{int(sent)} paths"
        )
    if sent_bytes is not None and (sent is None or sent > 0):
        parts.append(human_bytes(sent_bytes))
    return ", ".join(parts) or "—"


def _closure_bytes(node: NodeResult) -> float | None:
    for stage in node.stages:
        value = _number(stage.fact("closure_bytes"))
        if value:
            return value
    return None


def _table(summary: RunSummary, nodes: Sequence[NodeResult]) -> list[str]:
    stages = report_stages(summary)
    pushed = Stage.PUSH in stages
    closure = any(_closure_bytes(n) is not None for n in summary.nodes)
    waves = _has_waves(summary)
    head = ["Node", *(["Wave"] if waves else []), "Status", *(str(s) for s in stages)]
    align = [":---", *(["---:"] if waves else []), ":---", *("---:" for _ in stages)]
    if pushed:
        head.append("Pushed")
        align.append("---:")
    if closure:
        head.append("Closure")
        align.append("---:")
    lines = [_row(head), _row(align)]
    for node in nodes:
        status = node_status(node)
        name = escape(node.name, 200)
        why = f" ({escape(node.reason, 80)})" if node.reason else ""
        cells = [f"**{name}**" if status == "failed" else name]
        cells += [str(node.wave) if node.wave is not None else "—"] if waves else []
        shown = f"{status}, rolled back" if node.rolled_back else status
        cells.append(f"{_ICON[status]} {shown}{why}")
        cells += [_stage_cell(node, s) for s in stages]
        if pushed:
            cells.append(_pushed_cell(node))
        if closure:
            size = _closure_bytes(node)
            cells.append(human_bytes(size) if size is not None else "—")
        lines.append(_row(cells))
    return lines


def _has_waves(summary: RunSummary) -> bool:
    return any(n.wave is not None for n in summary.nodes)


def _waves_note(summary: RunSummary) -> list[str]:
    """With --waves: the waves' sizes, and why the later ones never started."""
    if not _has_waves(summary):
        return []
    numbers = sorted({n.wave for n in summary.nodes if n.wave is not None})
    parts = []
    for k in numbers:
        members = [n for n in summary.nodes if n.wave == k]
        failed = sum(node_status(n) == "failed" for n in members)
        held = sum(n.not_reached for n in members)
        state = f"{failed} failed" + (f", {held} not reached" if held else "")
        state = "not reached" if held == len(members) else state
        parts.append(f"wave {k}: {_nodes(len(members))}, {state}")
    lines = [f"Waves: {'; '.join(parts)}."]
    reasons: dict[str, int] = {}
    for node in summary.not_reached:
        why = next((s.message for s in node.stages if s.status is Status.SKIPPED), "")
        why = why.removeprefix("not reached: ") or "an earlier wave failed"
        reasons[why] = reasons.get(why, 0) + 1
    for why, count in reasons.items():
        lines.append(f"**{escape(why[:1].upper() + why[1:], 300)}: {_nodes(count)} not reached.**")
    return ["\n\n".join(lines), ""]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


class _Report:
    """Renders one summary in several shapes, computing log tails only once."""

    def __init__(self, summary: RunSummary, limit: int | None) -> None:
        self.summary = summary
        self.limit = limit
        # failed nodes first, then the others; selection order within each
        # by wave (with --waves), failed nodes first within each; then selection order
        # by wave; in each, rolled-back nodes first, then the other failed ones, then the rest
        self.nodes = sorted(
            summary.nodes,
            key=lambda n: (n.wave or 0, node_status(n) != "failed", not n.rolled_back),
        )
        self.failed = [n for n in self.nodes if node_status(n) == "failed"]
        self._tails: dict[int, tuple[list[str], int]] = {}

    def tail(self, result: StageResult, shape: tuple[int, int]) -> tuple[list[str], int]:
        """`tail_lines` of the result's detail; the log is scanned once, at the largest shape."""
        if id(result) not in self._tails:
            lines, chars = _TAIL_LEVELS[0]
            self._tails[id(result)] = tail_lines(result.detail, lines=lines, line_chars=chars)
        kept, omitted = self._tails[id(result)]
        lines, chars = shape
        omitted += max(0, len(kept) - lines)
        kept = kept[-lines:] if lines else []
        return [k if len(k) <= chars else k[:chars] + " [… line cut]" for k in kept], omitted

    def render(self, shape: _Shape) -> str:
        summary, nodes, failed = self.summary, self.nodes, self.failed
        shown = nodes if shape.rows is None else nodes[: shape.rows]
        out = [_headline(summary), "", _context(summary), "", *_waves_note(summary)]
        if nodes:
            out += [*_table(summary, shown), ""]
        budget = human_bytes(self.limit or 0)
        if len(shown) < len(nodes):
            more = len(nodes) - len(shown)
            out += [f"_… and {more} more, left out to stay under {budget}._", ""]
        sections = len(failed) if shape.sections is None else shape.sections
        tails = len(failed) if shape.tails is None else shape.tails
        for i, node in enumerate(failed[:sections]):
            out += [*self.section(node, shape.tail if i < tails else None), ""]
        if failed and self.limit is not None and shape != _Shape():
            if sections < len(failed):
                what = f"Failure details of {_nodes(len(failed) - sections)} were left out"
            else:
                what = f"Log tails were shortened to {shape.tail[0]} lines"
                if tails < len(failed):
                    what += f" and left out for {_nodes(len(failed) - tails)}"
            out += [f"_{what} to stay under {budget}; see the JUnit or JSON report._", ""]
        return "\n".join(out)

    def section(self, node: NodeResult, tail: tuple[int, int] | None) -> list[str]:
        failures = [s for s in node.stages if s.status is Status.FAILED]
        stages = ", ".join(str(s.stage) for s in failures)
        what = f"rolled back ({stages} failed)" if node.rolled_back else f"{stages} failed"
        lines = [f"### ❌ {escape(node.name, 200)}: {what}"]
        # A rollback that worked is shown too: where the host went, and what it printed.
        back = [s for s in node.stages if s.stage is Stage.ROLLBACK and s.status is Status.OK]
        for failed in failures + back:
            message = escape(failed.message, _MESSAGE_CHARS) or "failed"
            lines += ["", f"**{failed.stage}:** {message}"]
            kept, omitted = self.tail(failed, tail) if tail else ([], 0)
            if not kept:
                continue
            what = f"last {len(kept)} of {len(kept) + omitted}" if omitted else f"{len(kept)}"
            title = html.escape(f"{one_line(node.name, 200)} {failed.stage}: log ({what} lines)")
            lines += [
                "",
                f"<details><summary>{title}</summary>",
                "",
                code_block("\n".join(kept)),
                "",
                "</details>",
            ]
        return lines


def write_markdown(summary: RunSummary, path: Path) -> None:
    path.write_text(markdown(summary), encoding="utf-8")


def step_summary_path(environ: Mapping[str, str]) -> Path | None:
    """The GitHub step summary file named by `GITHUB_STEP_SUMMARY` in `environ`, if any."""
    value = environ.get(STEP_SUMMARY_ENV, "")
    return Path(value) if value else None


def step_summary_budget(path: Path, *, limit: int = STEP_SUMMARY_LIMIT) -> int:
    """How many bytes `append_step_summary` can still add to `path` (a separator included)."""
    used = path.stat().st_size if path.exists() else 0
    return max(0, limit - used - (2 if used else 1))


def append_step_summary(text: str, path: Path, *, limit: int = STEP_SUMMARY_LIMIT) -> int:
    """Append `text` to the step summary file `path`, keeping the file within `limit` bytes
    (GitHub rejects a step summary over 1 MiB). If `text` does not fit, it is cut at a line
    boundary with a note; render it with `markdown(summary, limit=step_summary_budget(path))`
    to shrink log tails instead. Returns the bytes written."""
    used = path.stat().st_size if path.exists() else 0
    data = ("\n" if used else "") + text.rstrip("\n") + "\n"
    if used + _size(data) > limit:
        note = "\n\n_… cut to stay under GitHub's step summary limit._\n"
        room = limit - used - _size(note)
        if room <= 0:
            return 0
        kept = _cut(data, room)
        kept = kept[: kept.rfind("\n") + 1] if "\n" in kept else ""
        data = kept.rstrip("\n") + note if kept.strip() else ""
        if not data or used + _size(data) > limit:
            return 0
    encoded = data.encode("utf-8")
    with path.open("ab") as f:
        f.write(encoded)
    return len(encoded)


def write_step_summary(summary: RunSummary, path: Path, *, limit: int = STEP_SUMMARY_LIMIT) -> int:
    """Append the markdown report to the step summary `path`, shrunk to fit `limit`."""
    return append_step_summary(
        markdown(summary, limit=step_summary_budget(path, limit=limit)), path, limit=limit
    )
