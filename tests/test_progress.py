"""Progress output: pure renderers with fixed events and clock, and the live view in a real
terminal (tmux), asserting on the screen at points in time, through resizes.

Run as a script (`python tests/test_progress.py SCENARIO CTL_DIR`) this file is the driver
the tmux tests start inside the terminal: it feeds a scenario's events to a LiveView step by
step, on a virtual clock, when the test says so.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typing_extensions import override

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from runner.events import Event, EventKind
from runner.progress import (
    ASCII,
    LiveView,
    PlainLog,
    Provider,
    ViewState,
    cell_width,
    choose_output,
    color_enabled,
    detect_provider,
    render_live,
    render_plain_event,
)
from runner.progress.render import render_heartbeat, render_totals
from runner.progress.text import clean, format_duration, strip_ansi, truncate, visible_width
from runner.results import NodeResult, Stage, StageResult, Status

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


# ---- building events -----------------------------------------------------------------------


class Run:
    """Events of a made-up run, with the StageResults collected per node for NODE_END."""

    def __init__(self, t0: float = T0) -> None:
        self.t0 = t0
        self.events: list[Event] = []
        self.stages: dict[str, list[StageResult]] = {}

    def at(self, dt: float) -> float:
        return self.t0 + dt

    def queued(self, node: str, dt: float = 0.0) -> Run:
        self.stages.setdefault(node, [])
        self.events.append(Event(node, EventKind.QUEUED, time=self.at(dt)))
        return self

    def start(self, node: str, stage: Stage, dt: float, message: str = "") -> Run:
        self.events.append(Event(node, EventKind.STAGE_START, stage, message, time=self.at(dt)))
        return self

    def log(self, node: str, message: str, dt: float, stage: Stage = Stage.ACTIVATE) -> Run:
        self.events.append(Event(node, EventKind.LOG, stage, message, time=self.at(dt)))
        return self

    def end(
        self,
        node: str,
        stage: Stage,
        dt: float,
        status: Status = Status.OK,
        message: str = "",
        detail: str = "",
        seconds: float = 1.0,
    ) -> Run:
        r = StageResult(stage, status, seconds, message, detail, self.at(dt) - seconds)
        self.stages.setdefault(node, []).append(r)
        self.events.append(
            Event(node, EventKind.STAGE_END, stage, message, result=r, time=self.at(dt))
        )
        return self

    def done(self, node: str, dt: float) -> Run:
        nr = NodeResult(node, tuple(self.stages[node]))
        self.events.append(Event(node, EventKind.NODE_END, node_result=nr, time=self.at(dt)))
        return self


def fleet_run() -> Run:
    """web1 succeeds, web2 fails at activation, db1 is unchanged; their events interleave."""
    r = Run()
    for n in ("web1", "web2", "db1"):
        r.queued(n)
    for n in ("web1", "web2", "db1"):
        r.start(n, Stage.EVAL, 0, "evaluating (3 in this evaluator)")
    for n in ("web1", "web2", "db1"):
        r.end(n, Stage.EVAL, 2, seconds=2)
    r.start("web1", Stage.BUILD, 2, "building")
    r.start("web2", Stage.BUILD, 3, "building")
    r.start("db1", Stage.BUILD, 3, "building")
    r.end("db1", Stage.BUILD, 4, message="/nix/store/ccc-nixos-system-db1")
    r.start("db1", Stage.PUSH, 4)
    r.end("db1", Stage.PUSH, 4.5, message="nothing to copy (10 paths already there)")
    r.end("db1", Stage.ACTIVATE, 5, Status.SKIPPED, "unchanged", seconds=0)
    r.done("db1", 5)
    r.end("web1", Stage.BUILD, 5, message="/nix/store/aaa-nixos-system-web1", seconds=3)
    r.start("web1", Stage.PUSH, 5)
    r.end("web2", Stage.BUILD, 6, message="/nix/store/bbb-nixos-system-web2", seconds=3)
    r.start("web2", Stage.ACTIVATE, 6)
    r.end("web1", Stage.PUSH, 6.5, message="3 of 10 paths, 1.0 MiB")
    r.log("web2", "stopping the following units: nginx.service", 7)
    r.start("web1", Stage.ACTIVATE, 7)
    r.log("web1", "setting up /etc...", 7.5)
    r.log("web2", "\x1b[31mFailed to start nginx.service\x1b[0m", 8)
    r.end(
        "web2",
        Stage.ACTIVATE,
        8,
        Status.FAILED,
        "Activation failed: exit status 4",
        "stopping the following units: nginx.service\nFailed to start nginx.service\n"
        "switch-to-configuration exited with 4\n",
        seconds=2,
    )
    r.done("web2", 8)
    r.end("web1", Stage.ACTIVATE, 9, message="Activation successful", seconds=2)
    r.done("web1", 9)
    return r


def fixed_clock(t: float) -> Callable[[], float]:
    return lambda: t


def plain_output(provider: Provider | None, *, color: bool = False, annotate: bool = True) -> str:
    out = io.StringIO()
    log = PlainLog(
        out,
        color=color,
        provider=provider,
        label_width=4,
        annotate=annotate,
        clock=fixed_clock(T0 + 10),
        started_at=T0,
    )
    with log:
        for e in fleet_run().events:
            log(e)
    return out.getvalue()


# ---- plain mode ----------------------------------------------------------------------------

PLAIN = """\
web1 | evaluating (3 in this evaluator)
web2 | evaluating (3 in this evaluator)
 db1 | evaluating (3 in this evaluator)
web1 | eval ok
web2 | eval ok
 db1 | eval ok
web1 | building
web2 | building
 db1 | building
 db1 | build ok: /nix/store/ccc-nixos-system-db1
 db1 | pushing system closure
 db1 | push ok: nothing to copy (10 paths already there)
 db1 | activate skipped: unchanged
 db1 | skipped (unchanged)
web1 | build ok: /nix/store/aaa-nixos-system-web1
web1 | pushing system closure
web2 | build ok: /nix/store/bbb-nixos-system-web2
web2 | activating
web1 | push ok: 3 of 10 paths, 1.0 MiB
web2 | stopping the following units: nginx.service
web1 | activating
web1 | setting up /etc...
web2 | Failed to start nginx.service
web2 | activate failed: Activation failed: exit status 4
web2 | failed at activate: Activation failed: exit status 4
web1 | activate ok: Activation successful
web1 | succeeded

Failed nodes (1): web2
web2: failed at activate: Activation failed: exit status 4
  web2 | stopping the following units: nginx.service
  web2 | Failed to start nginx.service
  web2 | switch-to-configuration exited with 4

3 nodes: 1 succeeded, 1 skipped, 1 failed in 10s
"""


def test_plain_log_exact():
    assert plain_output(None) == PLAIN


GITHUB = """\
::group::db1 — skipped (unchanged) (5s)
 db1 | evaluating (3 in this evaluator)
 db1 | eval ok
 db1 | building
 db1 | build ok: /nix/store/ccc-nixos-system-db1
 db1 | pushing system closure
 db1 | push ok: nothing to copy (10 paths already there)
 db1 | activate skipped: unchanged
 db1 | skipped (unchanged)
::endgroup::
::error title=web2::failed at activate: Activation failed: exit status 4
web2 — failed at activate: Activation failed: exit status 4 (8s)
web2 | evaluating (3 in this evaluator)
web2 | eval ok
web2 | building
web2 | build ok: /nix/store/bbb-nixos-system-web2
web2 | activating
web2 | stopping the following units: nginx.service
web2 | Failed to start nginx.service
web2 | activate failed: Activation failed: exit status 4
web2 | failed at activate: Activation failed: exit status 4
::group::web1 — succeeded (9s)
web1 | evaluating (3 in this evaluator)
web1 | eval ok
web1 | building
web1 | build ok: /nix/store/aaa-nixos-system-web1
web1 | pushing system closure
web1 | push ok: 3 of 10 paths, 1.0 MiB
web1 | activating
web1 | setting up /etc...
web1 | activate ok: Activation successful
web1 | succeeded
::endgroup::

Failed nodes (1): web2
web2: failed at activate: Activation failed: exit status 4
  web2 | stopping the following units: nginx.service
  web2 | Failed to start nginx.service
  web2 | switch-to-configuration exited with 4

3 nodes: 1 succeeded, 1 skipped, 1 failed in 10s
"""


def test_github_groups_fold_successes_and_leave_failures_open():
    assert plain_output("github") == GITHUB


def test_github_annotation_can_be_left_out_and_is_escaped():
    assert "::error" not in plain_output("github", annotate=False)
    r = Run().queued("a,b:c")
    r.start("a,b:c", Stage.EVAL, 0).end("a,b:c", Stage.EVAL, 1, Status.FAILED, "50% done\nmore")
    r.done("a,b:c", 1)
    out = io.StringIO()
    with PlainLog(out, provider="github", clock=fixed_clock(T0 + 1)) as log:
        for e in r.events:
            log(e)
    assert "::error title=a%2Cb%3Ac::failed at eval: 50% done\n" not in out.getvalue()
    assert "::error title=a%2Cb%3Ac::failed at eval: 50%25 done\n" in out.getvalue()


GITLAB_START = "\x1b[0Ksection_start:{ts}:{name}{opt}\r\x1b[0K{header}"
GITLAB_END = "\x1b[0Ksection_end:{ts}:{name}\r\x1b[0K"


def test_gitlab_sections_collapse_successes_and_leave_failures_open():
    text = plain_output("gitlab")
    t = int(T0)
    # the same blocks as GitHub's, in GitLab's section markers
    expected = GITHUB
    expected = expected.replace(
        "::group::db1 — skipped (unchanged) (5s)\n",
        GITLAB_START.format(
            ts=t,
            name="waggle_2_db1",
            opt="[collapsed=true]",
            header="db1 — skipped (unchanged) (5s)",
        )
        + "\n",
    )
    expected = expected.replace(
        "::error title=web2::failed at activate: Activation failed: exit status 4\n"
        "web2 — failed at activate: Activation failed: exit status 4 (8s)\n",
        GITLAB_START.format(
            ts=t,
            name="waggle_1_web2",
            opt="",
            header="web2 — failed at activate: Activation failed: exit status 4 (8s)",
        )
        + "\n",
    )
    expected = expected.replace(
        "web2 | failed at activate: Activation failed: exit status 4\n::group::web1",
        "web2 | failed at activate: Activation failed: exit status 4\n"
        + GITLAB_END.format(ts=t + 8, name="waggle_1_web2")
        + "\n::group::web1",
    )
    expected = expected.replace(
        "::group::web1 — succeeded (9s)\n",
        GITLAB_START.format(
            ts=t, name="waggle_0_web1", opt="[collapsed=true]", header="web1 — succeeded (9s)"
        )
        + "\n",
    )
    ends = iter(
        [
            GITLAB_END.format(ts=t + 5, name="waggle_2_db1"),
            GITLAB_END.format(ts=t + 9, name="waggle_0_web1"),
        ]
    )
    expected = re.sub("::endgroup::", lambda _m: next(ends), expected)
    assert text == expected


def test_buffered_groups_never_interleave():
    """Eight nodes whose events are shuffled in time: each node's block is contiguous."""
    rnd = random.Random(7)
    per_node: dict[str, list[Event]] = {}
    r = Run()
    names = [f"n{i}" for i in range(8)]
    for n in names:
        r.queued(n)
    for n in names:
        mark = len(r.events)
        r.start(n, Stage.ACTIVATE, 1)
        for i in range(5):
            r.log(n, f"{n} line {i}", 1 + i)
        status = Status.FAILED if n in ("n3", "n6") else Status.OK
        r.end(n, Stage.ACTIVATE, 7, status, "boom" if status is Status.FAILED else "ok")
        r.done(n, 7)
        per_node[n] = r.events[mark:]
    # interleave: repeatedly take the next event of a random unfinished node
    queues = {n: list(evs) for n, evs in per_node.items()}
    events = [e for e in r.events if e.kind is EventKind.QUEUED]
    while queues:
        n = rnd.choice(sorted(queues))
        events.append(queues[n].pop(0))
        if not queues[n]:
            del queues[n]
    for provider in ("github", "gitlab"):
        out = io.StringIO()
        with PlainLog(out, provider=provider, clock=fixed_clock(T0 + 8), started_at=T0) as log:
            for e in events:
                log(e)
        lines = out.getvalue().split("\n\nFailed nodes")[0].splitlines()
        owners = [m.group(1) for line in lines if (m := re.match(r"^(n\d) \| ", line))]
        # each node's lines form one run
        runs = [o for i, o in enumerate(owners) if i == 0 or owners[i - 1] != o]
        assert sorted(runs) == names, (provider, runs)
        folded = [line for line in lines if "::group::" in line or "collapsed=true" in line]
        assert len(folded) == 6, provider
        assert not any("n3" in f or "n6" in f for f in folded), provider


def test_unbuffered_plain_prints_as_events_come_and_with_timestamps(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        e = Event("web1", EventKind.LOG, Stage.ACTIVATE, "hello\tworld", time=T0 + 3)
        assert (
            render_plain_event(e, color=False, timestamps=True) == "22:13:23 web1 | hello    world"
        )
        assert (
            render_plain_event(e, color=True, timestamps=True, label_width=6)
            == "\x1b[2m22:13:23\x1b[0m \x1b[1m  web1\x1b[0m | hello    world"
        )
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert (
        render_plain_event(Event("web1", EventKind.QUEUED), color=False, timestamps=False) is None
    )
    assert (
        render_plain_event(Event("w", EventKind.LOG, message="  "), color=False, timestamps=False)
        is None
    )
    failed = StageResult(Stage.BUILD, Status.FAILED, 1.0, "build of x failed\nsecond line")
    e = Event("w", EventKind.STAGE_END, Stage.BUILD, result=failed)
    assert render_plain_event(e, color=False, timestamps=False) == (
        "w | build failed: build of x failed\nw | second line"
    )
    assert render_plain_event(e, color=True, timestamps=False) == (
        "\x1b[1mw\x1b[0m | \x1b[31mbuild failed: build of x failed\x1b[0m\n"
        "\x1b[1mw\x1b[0m | \x1b[31msecond line\x1b[0m"
    )


def test_failure_tail_is_the_last_lines():
    r = Run().queued("a").start("a", Stage.ACTIVATE, 0)
    for i in range(30):
        r.log("a", f"line {i}", 1)
    r.end("a", Stage.ACTIVATE, 2, Status.FAILED, "boom").done("a", 2)
    out = io.StringIO()
    with PlainLog(out, clock=fixed_clock(T0 + 3), started_at=T0, tail_lines=5) as log:
        for e in r.events:
            log(e)
    tail = out.getvalue().split("Failed nodes (1): a\n")[1]
    assert tail == (
        "a: failed at activate: boom\n"
        "  a | line 26\n  a | line 27\n  a | line 28\n  a | line 29\n"
        "  a | activate failed: boom\n\n"
        "1 node: 1 failed in 3s\n"
    )


def test_unfinished_nodes_are_flushed_at_exit():
    r = Run().queued("a").start("a", Stage.PUSH, 0).log("a", "copying", 1, Stage.PUSH)
    out = io.StringIO()
    with PlainLog(out, provider="github", clock=fixed_clock(T0 + 3), started_at=T0) as log:
        for e in r.events:
            log(e)
    assert out.getvalue() == (
        "a — did not finish (3s)\na | pushing system closure\na | copying\n\n"
        "1 node: 1 running in 3s\n"
    )


def test_heartbeat_and_totals():
    r = Run().queued("a").queued("b").start("a", Stage.ACTIVATE, 0).start("b", Stage.PUSH, 1)
    state = ViewState.of(r.events, T0)
    assert render_heartbeat(state, now=T0 + 125) == (
        "waggle: 2 running, 0 succeeded, 0 failed, 0 waiting (2m05s); "
        "running: a (activate 2m05s), b (push 2m04s)"
    )
    assert render_totals(state, now=T0 + 125) == "2 nodes: 2 running in 2m05s"
    out = io.StringIO()
    log = PlainLog(out, provider="github", heartbeat=0.05)
    with log:
        for e in r.events:
            log(e)
        deadline = time.monotonic() + 5
        while "waggle: 2 running" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "waggle: 2 running" in out.getvalue()


def test_log_handler_writes_between_blocks():
    out = io.StringIO()
    log = PlainLog(out, provider="github")
    logger = logging.getLogger("waggle-test-progress")
    logger.propagate = False
    with log:
        handler = log.log_handler()
        logger.addHandler(handler)
        try:
            log(Event("a", EventKind.LOG, message="buffered"))
            logger.warning("a warning")
        finally:
            logger.removeHandler(handler)
    assert out.getvalue().startswith("a warning\n")


# ---- text helpers --------------------------------------------------------------------------


def test_cell_width_and_truncation():
    assert cell_width("abc") == 3
    assert cell_width("✅") == 2  # emoji: two cells
    assert cell_width("日本") == 4
    assert cell_width("e\u0301") == 1  # combining accent
    assert cell_width("👩\u200d💻") == 4  # ZWJ counts nothing (terminals differ on the rest)
    assert truncate("hello world", 8) == "hello w…"
    assert truncate("日本語のテキスト", 7) == "日本語…"  # 6 cells + ellipsis, never half a glyph
    assert cell_width(truncate("日本語のテキスト", 7)) == 7
    assert truncate("hello", 5) == "hello"
    assert truncate("hello", 0) == ""
    assert truncate("hello world", 8, "...") == "hello..."
    assert format_duration(7.9) == "7s"
    assert format_duration(65) == "1m05s"
    assert format_duration(7380) == "2h03m"


def test_clean_removes_escapes_and_keeps_what_a_terminal_shows():
    assert clean("\x1b[1;32mok\x1b[0m") == "ok"
    assert clean("10%\r20%\r30%") == "30%"
    assert clean("a\tb\x07c") == "a    bc"
    assert clean("\x1b]0;title\x07text") == "text"
    assert clean("\x1b[0Ksection_start:1:x\r\x1b[0Kfake") == "fake"


# ---- live view, pure -----------------------------------------------------------------------


def live_three() -> Run:
    r = Run()
    for n in ("sigma", "theta", "gamma"):
        r.queued(n)
    r.start("sigma", Stage.PUSH, 1)
    r.log(
        "sigma",
        "copying path '/nix/store/h6qp3hdaqcg5rq3fcl0yj0ag7ghbb2rr-unit-haigha-agent.service'"
        " to 'ssh://root@sigma'...",
        2,
        Stage.PUSH,
    )
    r.start("theta", Stage.ACTIVATE, 1)
    r.end("theta", Stage.ACTIVATE, 8, message="Activation successful", seconds=7)
    r.done("theta", 8)
    r.start("gamma", Stage.EVAL, 1, "Starting...")
    return r


def test_live_three_nodes_exact():
    state = ViewState.of(live_three().events, T0)
    lines = render_live(state, now=T0 + 8.0, width=100, height=24, color=False)
    assert lines == [
        "sigma ⠋    7s copying path '/nix/store/h6qp3hdaqcg5rq3fcl0yj0ag7ghbb2rr-unit-haigha-agent.service'…",
        "theta ✓    7s Activation successful",
        "gamma ⠋    7s Starting...",
        "      ⠋    8s 2 running, 1 succeeded, 0 failed, 0 waiting",
    ]
    assert all(cell_width(line) <= 100 for line in lines)
    # the spinner turns with the clock
    later = render_live(state, now=T0 + 8.1, width=100, height=24, color=False)
    assert later[0].startswith("sigma ⠙    7s")
    colored = render_live(state, now=T0 + 8.0, width=100, height=24, color=True)
    assert colored[1] == (
        "\x1b[1mtheta\x1b[0m \x1b[32m✓\x1b[0m \x1b[2m   7s\x1b[0m Activation successful"
    )
    assert [strip_ansi(line) for line in colored] == lines
    ascii_lines = render_live(state, now=T0 + 8.0, width=40, height=24, color=False, glyphs=ASCII)
    assert ascii_lines[1] == "theta +    7s Activation successful"
    assert ascii_lines[0] == "sigma |    7s copying path '/nix/stor..."


def test_live_finished_run_marks():
    state = ViewState.of(fleet_run().events, T0)
    assert render_live(state, now=T0 + 10, width=80, height=24, color=False) == [
        " web1 ✓    9s Activation successful",
        " web2 ✗    8s failed at activate: Activation failed: exit status 4",
        "  db1 -    5s skipped (unchanged)",
        "      ✗   10s 0 running, 1 succeeded, 1 skipped, 1 failed, 0 waiting",
    ]


def many(n_nodes: int = 40) -> Run:
    """40 nodes: 4 failed, 5 running, 20 succeeded, 11 waiting."""
    r = Run()
    names = [f"node{i:02d}" for i in range(n_nodes)]
    for n in names:
        r.queued(n)
    for i, n in enumerate(names[:29]):
        r.start(n, Stage.PUSH, 1 + i * 0.1)
    for i, n in enumerate(names[:20]):
        r.end(n, Stage.PUSH, 5 + i * 0.1, message="done").done(n, 5 + i * 0.1)
    for n in ("node21", "node23", "node25", "node27"):
        r.end(n, Stage.PUSH, 6, Status.FAILED, f"{n} unreachable").done(n, 6)
    for n in ("node20", "node22", "node24", "node26", "node28"):
        r.log(n, f"copying to {n}", 6, Stage.PUSH)
    return r


def test_live_more_nodes_than_rows():
    state = ViewState.of(many().events, T0)
    lines = render_live(state, now=T0 + 10, width=60, height=10, color=False)
    assert len(lines) == 10
    shown = [line.split()[0] for line in lines[:-2]]
    # 4 failed + 5 running do not fit in 8 lines: running ones keep at least half of them
    assert shown == ["node20", "node21", "node22", "node23", "node24", "node25", "node26", "node27"]
    assert lines[1] == "node21 ✗    2s failed at push: node21 unreachable"
    assert lines[-2] == "               +32 more: 1 running, 20 succeeded, 11 waiting"
    assert lines[-1] == "       ⠋   10s 5 running, 20 succeeded, 4 failed, 11 waiting"
    roomy = render_live(state, now=T0 + 10, width=60, height=12, color=False)
    names = [line.split()[0] for line in roomy[:-2]]
    assert sorted(names) == sorted(
        [
            "node20",
            "node21",
            "node22",
            "node23",
            "node24",
            "node25",
            "node26",
            "node27",
            "node28",
            "node29",
        ]
    )  # all failed and running, then waiting ones
    assert roomy[-2].strip() == "+30 more: 20 succeeded, 10 waiting"
    assert all(cell_width(line) <= 60 for line in roomy)
    assert render_live(state, now=T0 + 10, width=60, height=1, color=False) == [lines[-1]]
    assert len(render_live(state, now=T0 + 10, width=60, height=None, color=False)) == 41


def test_live_truncates_to_width_with_wide_characters():
    r = Run().queued("web-with-a-rather-long-name").queued("b")
    r.start("web-with-a-rather-long-name", Stage.ACTIVATE, 0)
    r.log("web-with-a-rather-long-name", "サービスを再起動しています " * 5, 1)
    r.start("b", Stage.BUILD, 0, "🚀 building 🚀 " * 5)
    state = ViewState.of(r.events, T0)
    for width in (80, 41, 30, 17, 12, 5, 1):
        for color in (False, True):
            lines = render_live(state, now=T0 + 2, width=width, height=24, color=color)
            assert all(visible_width(line) <= width for line in lines), (width, lines)
    lines = render_live(state, now=T0 + 2, width=41, height=24, color=False)
    assert lines[0] == "web-with-a-r… ⠋    2s サービスを再起動し…"  # 13-cell names
    assert cell_width(lines[0]) == 41
    assert (
        lines[1] == "            b ⠋    2s 🚀 building 🚀 🚀…"
    )  # no half emoji, no space before …
    assert cell_width(lines[1]) == 40


# ---- choosing the output -------------------------------------------------------------------


class FakeTty(io.StringIO):
    @override
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("mode", "tty", "env", "expected"),
    [
        ("always", False, {"NO_COLOR": "1"}, True),
        ("never", True, {"CLICOLOR_FORCE": "1"}, False),
        ("auto", True, {}, True),
        ("auto", False, {}, False),
        ("auto", True, {"NO_COLOR": "1"}, False),
        ("auto", True, {"NO_COLOR": ""}, True),
        ("auto", False, {"CLICOLOR_FORCE": "1"}, True),
        ("auto", False, {"CLICOLOR_FORCE": "0"}, False),
        ("auto", False, {"FORCE_COLOR": "1"}, True),
        ("auto", True, {"CLICOLOR": "0"}, False),
        ("auto", True, {"TERM": "dumb"}, False),
        ("auto", False, {"GITHUB_ACTIONS": "true"}, True),
        ("auto", False, {"GITLAB_CI": "true", "NO_COLOR": "1"}, False),
    ],
)
def test_color_rules(mode, tty, env, expected):
    assert color_enabled(mode, tty=tty, env=env, provider=detect_provider(env)) is expected


def test_color_mode_is_checked():
    with pytest.raises(ValueError, match="auto, always, never"):
        color_enabled("sometimes", tty=True, env={})


def test_choose_output():
    term = {"TERM": "xterm-256color"}
    live = choose_output(FakeTty(), plain=False, color="auto", env=term)
    assert isinstance(live, LiveView)
    assert live.color
    assert isinstance(choose_output(FakeTty(), plain=True, color="auto", env=term), PlainLog)
    assert isinstance(choose_output(io.StringIO(), plain=False, color="auto", env=term), PlainLog)
    ci = choose_output(FakeTty(), plain=False, color="auto", env={**term, "CI": "true"})
    assert isinstance(ci, PlainLog)
    assert ci.provider is None
    gh = choose_output(
        io.StringIO(), color="auto", env={"GITHUB_ACTIONS": "true"}, names=["ab", "abcdef"]
    )
    assert isinstance(gh, PlainLog)
    assert (gh.provider, gh.color, gh.label_width) == ("github", True, 6)
    gl = choose_output(io.StringIO(), color="never", env={"GITLAB_CI": "true"})
    assert isinstance(gl, PlainLog)
    assert (gl.provider, gl.color) == ("gitlab", False)
    dumb = choose_output(FakeTty(), env={"TERM": "dumb"})
    assert isinstance(dumb, PlainLog)


def test_live_view_on_a_stream_restores_the_terminal():
    out = FakeTty()
    view = LiveView(
        out, color=False, clock=fixed_clock(T0 + 10), size=lambda: (60, 10), started_at=T0
    )
    with view:
        for e in fleet_run().events:
            view(e)
        view.refresh()
    text = out.getvalue()
    assert text.startswith("\x1b[?25l\x1b[?7l")  # cursor hidden, no autowrap
    assert text.endswith(
        "\x1b[?7h\x1b[?25h"
        " web1 ✓    9s Activation successful\n"
        " web2 ✗    8s failed at activate: Activation failed: exit…\n"
        "  db1 -    5s skipped (unchanged)\n"
        "      ✗   10s 0 running, 1 succeeded, 1 skipped, 1 failed,…\n"
        "\n"
        "Failed nodes (1): web2\n"
        "web2: failed at activate: Activation failed: exit status 4\n"
        "  web2 | stopping the following units: nginx.service\n"
        "  web2 | Failed to start nginx.service\n"
        "  web2 | switch-to-configuration exited with 4\n"
    )
    assert "\x1b[3A" in text  # redrawn in place: up to the first line of a 4-line frame


# ---- live view in a real terminal (tmux) ---------------------------------------------------

# Scenarios the driver plays: a list of steps, each the events it adds and the clock after it.
Step = tuple[list[Event], float]


def scenario(name: str) -> list[Step]:
    if name == "three":
        r = live_three()
        evs = r.events
        first = [e for e in evs if e.time <= T0 + 2 and e.kind is not EventKind.STAGE_END]
        rest = [e for e in evs if e not in first]
        r2 = Run()
        r2.end("sigma", Stage.PUSH, 9, message="3 of 10 paths, 1.0 MiB", seconds=8)
        r2.done("sigma", 9)
        r2.end(
            "gamma",
            Stage.EVAL,
            10,
            Status.FAILED,
            "attribute 'x' missing",
            "error: attribute 'x' missing\n  at hive.nix:3:5",
            seconds=9,
        )
        r2.done("gamma", 10)
        return [(first, T0 + 2.0), (rest, T0 + 8.0), (r2.events, T0 + 11.0)]
    if name == "many":
        r = many()
        return [(r.events, T0 + 10.0)]
    raise ValueError(name)


# What a shell leaves above the view: the frame must never be drawn over it or leave
# pieces of itself among it.
PREAMBLE = ["$ waggle apply --on @web", "waggle: 3 nodes selected", "-" * 30]  # < 40 cells
WARNING = "waggle: sigma: slow connection"  # logged through the view during step 1


def drive(name: str, ctl: Path) -> None:
    """Inside the terminal: play `name` step by step as the test creates go-N files."""
    now = [T0]

    def wait_for(path: Path) -> None:
        while not path.exists():
            time.sleep(0.01)

    sys.stdout.write("".join(f"{line}\n" for line in PREAMBLE))
    sys.stdout.flush()
    view = LiveView(sys.stdout, color=True, clock=lambda: now[0], started_at=T0)
    with view:
        for i, (events, at) in enumerate(scenario(name)):
            wait_for(ctl / f"go-{i}")
            for e in events:
                view(e)
            now[0] = at
            if name == "three" and i == 1:
                view.write_above(WARNING)
            view.refresh()
            (ctl / f"done-{i}").touch()
        wait_for(ctl / "go-exit")
    (ctl / "done-exit").touch()
    wait_for(ctl / "quit")


def expected_screen(name: str, steps: int, columns: int, rows: int) -> list[str]:
    events = [e for evs, _ in scenario(name)[:steps] for e in evs]
    now = scenario(name)[steps - 1][1]
    return render_live(
        ViewState.of(events, T0), now=now, width=columns - 1, height=rows - 1, color=False
    )


def tail_of(lines: list[str]) -> Callable[[list[str]], bool]:
    """Above the frame: the end of `lines`, whole lines, in order (the top may have
    scrolled into the terminal's history)."""
    return lambda above: not above or above == lines[-len(above) :]


class Tmux:
    def __init__(self, directory: Path, columns: int, rows: int, argv: list[str]) -> None:
        self.socket = str(directory / "tmux.sock")
        self.ctl = directory
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        env["LANG"] = "C.UTF-8"
        self._tmux(
            "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(columns), "-y", str(rows),
            " ".join(argv), env=env,
        )  # fmt: skip
        self._tmux("set-option", "-g", "remain-on-exit", "on")

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["tmux", "-u", "-S", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            env=env,
        )
        return done.stdout

    def screen(self, *, escapes: bool = False) -> list[str]:
        text = self._tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "t")
        lines = [line.rstrip() for line in text.split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def resize(self, columns: int, rows: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(columns), "-y", str(rows))

    def flag(self, name: str) -> str:
        return self._tmux("display-message", "-p", "-t", "t", f"#{{{name}}}").strip()

    def step(self, tag: str | int) -> None:
        (self.ctl / f"go-{tag}").touch()
        deadline = time.monotonic() + 10
        while not (self.ctl / f"done-{tag}").exists():
            assert time.monotonic() < deadline, f"driver did not finish step {tag}: {self.screen()}"
            time.sleep(0.01)

    def wait_frame(
        self,
        frame: list[str],
        above: Callable[[list[str]], bool],
        timeout: float = 5.0,
    ) -> list[str]:
        """The screen once its last lines are `frame` and what is above them passes `above`
        (the view redraws every 100 ms); the frame's lines, which the caller checks further."""

        def ok(screen: list[str]) -> bool:
            n = len(frame)
            return len(screen) >= n and screen[len(screen) - n :] == frame and above(screen[:-n])

        deadline = time.monotonic() + timeout
        screen = self.screen()
        while not ok(screen) and time.monotonic() < deadline:
            time.sleep(0.05)
            screen = self.screen()
        assert ok(screen), "\n".join(["screen:", *screen, "expected frame:", *frame])
        return screen[len(screen) - len(frame) :]

    def close(self) -> None:
        (self.ctl / "quit").touch()
        subprocess.run(
            ["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=10, check=False
        )


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is not installed; scripts/setup.sh installs it")
        pytest.skip("tmux is not installed")
    sessions: list[Tmux] = []

    def start(name: str, columns: int, rows: int) -> Tmux:
        argv = [sys.executable, str(Path(__file__).resolve()), name, str(tmp_path)]
        t = Tmux(tmp_path, columns, rows, argv)
        sessions.append(t)
        return t

    yield start
    for t in sessions:
        t.close()


def test_live_view_in_a_terminal(tmux):
    t = tmux("three", 80, 24)
    t.step(0)
    screen = t.wait_frame(expected_screen("three", 1, 80, 24), above=lambda a: a == PREAMBLE)
    assert screen[0].startswith("sigma ⠋    1s copying path '/nix/store/h6qp")
    assert cell_width(screen[0]) == 79
    assert screen[1] == "theta ⠋    1s activating"
    assert screen[-1] == "      ⠋    2s 3 running, 0 succeeded, 0 failed, 0 waiting"
    t.step(1)
    above = [*PREAMBLE, WARNING]  # written above the view, which then redraws below it
    screen = t.wait_frame(expected_screen("three", 2, 80, 24), above=lambda a: a == above)
    assert screen[1] == "theta ✓    7s Activation successful"
    assert screen[-1] == "      ⠋    8s 2 running, 1 succeeded, 0 failed, 0 waiting"
    colored = "\n".join(t.screen(escapes=True))
    assert re.search(r"\x1b\[(?:[0-9;]*;)?32m✓", colored), colored  # the check mark is green
    assert t.flag("cursor_flag") == "0"  # hidden while live

    # Narrower: tmux rewraps the old 79-cell line onto two rows; the view must go up past
    # both, redraw to fit, and leave nothing of the wider frame behind.
    t.resize(40, 24)
    screen = t.wait_frame(expected_screen("three", 2, 40, 24), tail_of(above))
    assert screen[0] == "sigma ⠋    7s copying path '/nix/store…"
    assert all(cell_width(line) <= 39 for line in screen)
    t.step(2)
    screen = t.wait_frame(expected_screen("three", 3, 40, 24), tail_of(above))
    assert screen[0] == "sigma ✓    8s 3 of 10 paths, 1.0 MiB"
    assert screen[2] == "gamma ✗    9s failed at eval: attribut…"
    assert screen[-1] == "      ✗   11s 0 running, 2 succeeded,…"
    t.resize(100, 24)  # wider again
    t.wait_frame(expected_screen("three", 3, 100, 24), tail_of(above))

    t.step("exit")  # the final summary stays; the cursor and autowrap are back
    assert t.wait_frame(
        [
            "sigma ✓    8s 3 of 10 paths, 1.0 MiB",
            "theta ✓    7s Activation successful",
            "gamma ✗    9s failed at eval: attribute 'x' missing",
            "      ✗   11s 0 running, 2 succeeded, 1 failed, 0 waiting",
            "",
            "Failed nodes (1): gamma",
            "gamma: failed at eval: attribute 'x' missing",
            "  gamma | error: attribute 'x' missing",
            "  gamma |   at hive.nix:3:5",
        ],
        tail_of(above),
    )
    assert t.flag("cursor_flag") == "1"
    assert t.flag("wrap_flag") == "1"


def test_live_view_in_a_terminal_with_more_nodes_than_rows(tmux):
    t = tmux("many", 80, 12)
    t.step(0)
    screen = t.wait_frame(expected_screen("many", 1, 80, 12), tail_of(PREAMBLE))
    assert len(screen) == 11
    assert screen[-2].strip() == "+31 more: 20 succeeded, 11 waiting"  # finished and waiting fold
    assert screen[-1] == "       ⠋   10s 5 running, 20 succeeded, 4 failed, 11 waiting"
    for n in (
        "node20",
        "node21",
        "node22",
        "node23",
        "node24",
        "node25",
        "node26",
        "node27",
        "node28",
    ):
        assert sum(line.split()[0] == n for line in screen[:-2]) == 1, n  # running and failed, once
    t.resize(60, 8)  # fewer rows and columns
    screen = t.wait_frame(expected_screen("many", 1, 60, 8), tail_of(PREAMBLE))
    assert len(screen) == 7
    assert screen[-1] == "       ⠋   10s 5 running, 20 succeeded, 4 failed, 11 waiti…"
    # Taller again: the frame grows to 29 lines. Shrinking to 8 rows pushed the top of the
    # 11-line frame into the terminal's history, and growing pulls history back onto the
    # screen above the frame, as it does with any earlier output: allow exactly those lines.
    earlier = {*PREAMBLE, *expected_screen("many", 1, 80, 12)}
    t.resize(80, 30)
    screen = t.wait_frame(expected_screen("many", 1, 80, 30), above=lambda a: set(a) <= earlier)
    assert len(screen) == 29
    t.step("exit")
    assert t.screen()[-3:] == [
        "node27: failed at push: node27 unreachable",
        "  node27 | pushing system closure",
        "  node27 | push failed: node27 unreachable",
    ]


if __name__ == "__main__":
    drive(sys.argv[1], Path(sys.argv[2]))


def test_live_view_says_which_wave_runs():
    """The wave gate's messages are what the live view shows for each node: the canary's
    wave, the others waiting for it, then their wave starting."""
    import asyncio

    from runner.deploy import waves
    from runner.events import Emitter

    events: list[Event] = [Event(n, EventKind.QUEUED, time=T0) for n in ("canary", "web1", "web2")]
    gate = waves.WaveGate(
        (("canary",), ("web1", "web2")), waves.parse_budget("0"), Emitter(events.append)
    )

    async def scenario() -> tuple[list[str], list[str]]:
        entered = [asyncio.create_task(gate.enter(n)) for n in ("canary", "web1", "web2")]
        await asyncio.sleep(0)
        before = render_live(
            ViewState.of(events, T0), now=T0 + 1, width=100, height=24, color=False
        )
        gate.record("canary", True)
        assert await asyncio.wait_for(asyncio.gather(*entered), 5) == [None, None, None]
        after = render_live(ViewState.of(events, T0), now=T0 + 2, width=100, height=24, color=False)
        return before, after

    before, after = asyncio.run(scenario())
    assert before[0].startswith("canary") and before[0].endswith("wave 1 of 2 (1 node)"), before
    for line in before[1:3]:
        assert line.endswith("wave 2 of 2: waiting for wave 1"), before
    for line in after[1:3]:
        assert "wave 2 of 2 started (2 nodes; wave 1: 0 failed, 0 allowed)" in line, after
