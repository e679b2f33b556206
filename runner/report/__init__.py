"""Run reports: JUnit XML (`junit`), markdown and the GitHub step summary (`markdown`), JSON
(`jsonreport`).

Every report is a pure function of a `RunSummary`; the only I/O are the small `write_*` and
`append_step_summary` helpers. Nothing here reads a clock: every time shown comes from the
summary, so the same summary always gives the same report.

This module holds what the three reports share, so that they agree with each other:

- `node_status`: the one status a node is shown with (ok, failed, unchanged, skipped);
- `report_stages` and `stage_result`: one column / test case per stage, a stage the node ran
  twice (keys before and after activation) merged into one result;
- `not_reached_reason`: why a node has no result for a stage;
- `clean_text`, `one_line` and `log_tail`: text that is safe in XML, markdown and JSON whatever
  bytes the logs contained (ANSI escapes, control characters, invalid UTF-8 decoded with
  `surrogateescape`).

Secrets never appear in a report: reports only read result objects, which never carry key
contents.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Literal

from runner.results import NodeResult, RunSummary, Stage, StageResult, Status

NodeStatus = Literal["ok", "failed", "unchanged", "skipped"]
NODE_STATUSES: tuple[NodeStatus, ...] = ("ok", "failed", "unchanged", "skipped")

TAIL_LINES = 50  # lines of a log kept in a report
TAIL_LINE_CHARS = 1000  # characters kept of one log line

UNCHANGED = "unchanged"  # the activate stage's skip message when the host already runs it


def node_status(node: NodeResult) -> NodeStatus:
    """The status shown for a node in every report.

    failed: a stage failed; unchanged: the activate stage was skipped as "unchanged";
    skipped: the node has only skipped stages (or none), or its wave never started
    (`not_reached`); ok: otherwise.
    """
    if any(s.status is Status.FAILED for s in node.stages):
        return "failed"
    if node.not_reached:
        return "skipped"
    activate = stage_result(node, Stage.ACTIVATE)
    if (
        activate is not None
        and activate.status is Status.SKIPPED
        and activate.message.strip() == UNCHANGED
    ):
        return "unchanged"
    if all(s.status is Status.SKIPPED for s in node.stages):
        return "skipped"
    return "ok"


def status_counts(nodes: Iterable[NodeResult]) -> dict[NodeStatus, int]:
    """How many nodes have each status; every status is a key."""
    counts: dict[NodeStatus, int] = dict.fromkeys(NODE_STATUSES, 0)
    for node in nodes:
        counts[node_status(node)] += 1
    return counts


def report_stages(summary: RunSummary) -> tuple[Stage, ...]:
    """The stages a report shows: `summary.stages`, then any other stage a node has a result
    for (e.g. confirm after a reboot), in `Stage` order."""
    extra = {s.stage for n in summary.nodes for s in n.stages} - set(summary.stages)
    return (*summary.stages, *(s for s in Stage if s in extra))


def stage_result(node: NodeResult, stage: Stage) -> StageResult | None:
    """The node's result for `stage`, None if it never got there.

    A stage that ran more than once (keys before and after activation) is merged: failed if
    one run failed, else ok if one run was ok, else skipped; seconds added up; the failed
    run's message and detail (or all messages); facts of all runs, later ones winning.
    """
    found = [s for s in node.stages if s.stage is stage]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    failed = next((s for s in found if s.status is Status.FAILED), None)
    if failed is not None:
        status, message, detail = Status.FAILED, failed.message, failed.detail
    else:
        ok = any(s.status is Status.OK for s in found)
        status = Status.OK if ok else Status.SKIPPED
        message = "; ".join(dict.fromkeys(s.message for s in found if s.message))
        detail = "\n".join(s.detail for s in found if s.detail)
    starts = [s.started_at for s in found if s.started_at]
    facts: dict[str, int | float | str] = {}
    for s in found:
        facts.update(s.facts)
    return StageResult(
        stage,
        status,
        sum(s.seconds for s in found),
        message,
        detail,
        min(starts, default=0.0),
        tuple(facts.items()),
    )


def not_reached_reason(node: NodeResult, stage: Stage, stages: Sequence[Stage]) -> str:
    """Why `node` has no result for `stage`: "earlier stage failed: <stage>", the reason its
    wave never started ("not reached: wave 1 exceeded the failure budget (1 failed)"), or
    "not run"."""
    failure = node.failure
    if failure is None and node.not_reached:
        return next((s.message for s in node.stages if s.status is Status.SKIPPED), "not reached")
    if failure is None:
        return "not run"
    if (
        failure.stage in stages
        and stage in stages
        and stages.index(failure.stage) > stages.index(stage)
    ):
        return "not run"
    return f"earlier stage failed: {failure.stage}"


# CSI (ESC [ ... final, or the 8-bit CSI), OSC/DCS/SOS/PM/APC strings (ended by BEL or ESC \,
# or unterminated), and the remaining two- and three-character escapes.
_ANSI = re.compile(
    r"""
    \x1b\[[0-?]*[ -/]*[@-~]
  | \x9b[0-?]*[ -/]*[@-~]
  | \x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?
  | \x1b[ -/]*[0-~]
  | \x1b
    """,
    re.VERBOSE,
)
# Not a character of XML 1.0, or a C1 control / DEL (allowed but garbage in every report).
# Lone surrogates are how `surrogateescape` carries bytes that were not UTF-8.
_INVALID = re.compile("[^\t\n\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean_line(line: str) -> str:
    """One line (no "\\n"): without ANSI escapes, what a terminal would show after "\\r"s,
    without characters XML 1.0 does not allow."""
    line = _ANSI.sub("", line)
    if "\r" in line:
        line = next((seg for seg in reversed(line.split("\r")) if seg), "")
    return _INVALID.sub("", line)


def clean_text(text: str) -> str:
    """`text` made safe for XML, markdown and JSON: ANSI escapes stripped, "\\r\\n" as "\\n",
    a "\\r"-overwritten line reduced to its last version, and every character not allowed
    in XML 1.0 (control characters other than tab and newline, lone surrogates from
    undecodable bytes, U+FFFE/U+FFFF) and C1 controls dropped."""
    return "\n".join(_clean_line(line) for line in text.split("\n"))


def one_line(text: str, max_chars: int = 500) -> str:
    """`clean_text` on one line: whitespace runs as one space, cut to `max_chars` with "…"."""
    flat = " ".join(clean_text(text[: max_chars * 4 + 64]).split())
    if len(flat) > max_chars:
        return flat[: max_chars - 1].rstrip() + "…"
    return flat


def log_tail(text: str, *, lines: int = TAIL_LINES, line_chars: int = TAIL_LINE_CHARS) -> str:
    """The last `lines` lines of `text`, cleaned (`clean_text`), each cut to `line_chars`;
    a first line "[… N earlier lines]" says how many were left out."""
    kept, omitted = tail_lines(text, lines=lines, line_chars=line_chars)
    return "\n".join([f"[… {omitted} earlier lines]", *kept] if omitted else kept)


def tail_lines(
    text: str, *, lines: int = TAIL_LINES, line_chars: int = TAIL_LINE_CHARS
) -> tuple[list[str], int]:
    """The cleaned last `lines` lines of `text` (trailing blank lines dropped), each cut to
    `line_chars`, and how many lines came before them. Does not copy a huge log."""
    end = len(text)
    while end and text[end - 1] in " \t\r\n":
        end -= 1
    if lines <= 0 or not end:
        return [], 0
    start = end
    for _ in range(lines):
        start = text.rfind("\n", 0, start)
        if start < 0:
            break
    omitted = text.count("\n", 0, start) + 1 if start >= 0 else 0
    keep = line_chars * 4 + 64  # clean only what can be shown
    out = []
    for raw in text[start + 1 : end].split("\n"):
        if len(raw) > keep:
            raw = raw.rstrip("\r")
            raw = raw[raw.rfind("\r") + 1 :][:keep]  # the last "\r" version of the line
        line = _clean_line(raw)
        if len(line) > line_chars:
            line = line[:line_chars] + " [… line cut]"
        out.append(line)
    return out, omitted


def unique_names(names: Iterable[str]) -> list[str]:
    """`names` with duplicates renamed "name (2)", "name (3)", ... so each is unique."""
    seen: set[str] = set()
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name} ({n})"
        seen.add(candidate)
        out.append(candidate)
    return out


def iso_utc(epoch: float, *, timespec: str = "milliseconds", zone: bool = True) -> str:
    """Epoch seconds as ISO 8601 in UTC: "2025-01-01T12:00:00.000Z" (no "Z" if not `zone`)."""
    text = datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec=timespec)
    return text.replace("+00:00", "Z" if zone else "")


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """0.42 -> "0.4 s", 42.3 -> "42 s", 125 -> "2 min 05 s", 3725 -> "1 h 02 min"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
