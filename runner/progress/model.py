"""What the progress output knows about a run: a state folded from events.

`ViewState.apply(event)` is the only way the state changes; renderers only read it.
Event times (`Event.time`, epoch seconds) are the clock of the state; renderers
take `now` on the same clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from runner.events import Event, EventKind
from runner.progress.text import clean, clean_lines
from runner.results import NodeResult, Stage, StageResult, Status


class Phase(StrEnum):
    WAITING = "waiting"  # queued, no stage started yet
    RUNNING = "running"
    OK = "succeeded"
    SKIPPED = "skipped"  # ended ok, but a stage was skipped (unchanged, no targetHost)
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.OK, Phase.SKIPPED, Phase.FAILED)


# What a stage start says when the pipeline gives no message of its own.
START_TEXT: dict[Stage, str] = {
    Stage.EVAL: "evaluating",
    Stage.BUILD: "building",
    Stage.PUSH: "pushing system closure",
    Stage.KEYS: "uploading keys",
    Stage.ACTIVATE: "activating",
    Stage.REBOOT: "rebooting",
    Stage.HEALTH: "checking health",
    Stage.CONFIRM: "confirming over a new connection",
    Stage.ROLLBACK: "rolling back",
}


def first_line(text: str) -> str:
    lines = [line for line in clean_lines(text) if line.strip()]
    return lines[0].strip() if lines else ""


def start_text(stage: Stage | None, message: str) -> str:
    text = first_line(message)
    if text:
        return text
    return START_TEXT.get(stage, "starting") if stage is not None else "starting"


def stage_end_text(result: StageResult) -> str:
    """`build ok: /nix/store/…`, `activate failed: …`, `activate skipped: unchanged`."""
    verb = {Status.OK: "ok", Status.FAILED: "failed", Status.SKIPPED: "skipped"}[result.status]
    message = first_line(result.message)
    return f"{result.stage} {verb}: {message}" if message else f"{result.stage} {verb}"


def node_phase(result: NodeResult) -> Phase:
    if not result.ok:
        return Phase.FAILED
    if any(s.status is Status.SKIPPED for s in result.stages):
        return Phase.SKIPPED
    return Phase.OK


def outcome_text(result: NodeResult) -> str:
    """`succeeded`, `skipped (unchanged)`, `failed at activate: …`."""
    phase = node_phase(result)
    if phase is Phase.FAILED:
        failure = result.failure
        assert failure is not None
        message = first_line(failure.message)
        return f"failed at {failure.stage}: {message}" if message else f"failed at {failure.stage}"
    if phase is Phase.SKIPPED:
        skipped = next(s for s in result.stages if s.status is Status.SKIPPED)
        return f"skipped ({first_line(skipped.message) or skipped.stage})"
    return "succeeded"


def final_message(result: NodeResult) -> str:
    """The line a finished node keeps in the live view: its main stage's own words."""
    phase = node_phase(result)
    if phase is not Phase.OK:
        return outcome_text(result)
    main = [s for s in result.stages if s.stage is not Stage.KEYS and first_line(s.message)]
    if main:
        return first_line(main[-1].message)
    return "succeeded"


@dataclass
class NodeView:
    name: str
    order: int  # position of first appearance
    first_seen: float
    tail_lines: int = 20
    phase: Phase = Phase.WAITING
    stage: Stage | None = None
    message: str = ""  # the latest message of the current stage, one clean line
    started_at: float | None = None  # first stage start: the live view's elapsed counts from here
    ended_at: float | None = None
    failure: StageResult | None = None
    result: NodeResult | None = None
    log: deque[str] = field(default_factory=deque)  # the last `tail_lines` lines

    def __post_init__(self) -> None:
        self.log = deque(self.log, maxlen=self.tail_lines)

    def elapsed(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else now
        return max(0.0, end - self.started_at)

    def _start(self, at: float) -> None:
        if self.started_at is None:
            self.started_at = at
        if self.phase is Phase.WAITING:
            self.phase = Phase.RUNNING

    def apply(self, event: Event) -> None:
        kind = event.kind
        if kind is EventKind.QUEUED:
            return
        if kind is EventKind.STAGE_START:
            text = start_text(event.stage, event.message)
            self.log.append(text)
            if self.phase.finished:
                return
            self._start(event.time)
            self.stage = event.stage
            self.message = text
        elif kind is EventKind.LOG:
            text = clean(event.message)
            if not text.strip():
                return
            self.log.append(text)
            if self.phase.finished:
                return
            self._start(event.time)
            if event.stage is not None:
                self.stage = event.stage
            self.message = text.strip()
        elif kind is EventKind.STAGE_END:
            r = event.result
            if r is None:
                return
            text = stage_end_text(r)
            self.log.append(text)
            if self.phase.finished:
                return
            if r.status is not Status.SKIPPED:
                self._start(r.started_at if r.started_at > 0 else event.time)
            self.stage = r.stage
            self.message = text
            if r.status is Status.FAILED:
                self.phase = Phase.FAILED
                self.failure = r
                self.ended_at = event.time
        elif kind is EventKind.NODE_END:
            nr = event.node_result
            if nr is None:
                return
            self.result = nr
            if self.started_at is None:
                starts = [s.started_at for s in nr.stages if s.started_at > 0]
                self.started_at = min(starts) if starts else event.time
            if self.phase is not Phase.FAILED or self.ended_at is None:
                self.ended_at = event.time
            self.phase = node_phase(nr)
            if self.phase is Phase.FAILED and self.failure is None:
                self.failure = nr.failure
            self.message = final_message(nr)


@dataclass(frozen=True)
class Counts:
    running: int = 0
    succeeded: int = 0
    skipped: int = 0
    failed: int = 0
    waiting: int = 0

    @property
    def total(self) -> int:
        return self.running + self.succeeded + self.skipped + self.failed + self.waiting

    @property
    def finished(self) -> bool:
        return self.running == 0 and self.waiting == 0

    @classmethod
    def of(cls, nodes: Iterable[NodeView]) -> Counts:
        by = dict.fromkeys(Phase, 0)
        for n in nodes:
            by[n.phase] += 1
        return cls(
            running=by[Phase.RUNNING],
            succeeded=by[Phase.OK],
            skipped=by[Phase.SKIPPED],
            failed=by[Phase.FAILED],
            waiting=by[Phase.WAITING],
        )

    def nonzero(self, *order: str) -> str:
        """The non-zero counts named in `order`, e.g. `3 succeeded, 1 failed`."""
        return ", ".join(f"{getattr(self, name)} {name}" for name in order if getattr(self, name))

    def describe(self) -> str:
        """`2 running, 5 succeeded, 1 failed, 3 waiting` (skipped only when there are some)."""
        parts = [f"{self.running} running", f"{self.succeeded} succeeded"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        parts += [f"{self.failed} failed", f"{self.waiting} waiting"]
        return ", ".join(parts)


class ViewState:
    """The run as the progress output sees it: one NodeView per node, in order of appearance.

    Not thread-safe by itself: the outputs apply events under their own lock.
    """

    def __init__(self, started_at: float | None = None, *, tail_lines: int = 20) -> None:
        self.started_at = started_at  # None: the first event's time
        self.tail_lines = tail_lines
        self.nodes: dict[str, NodeView] = {}

    @classmethod
    def of(
        cls, events: Iterable[Event], started_at: float | None = None, *, tail_lines: int = 20
    ) -> ViewState:
        state = cls(started_at, tail_lines=tail_lines)
        for e in events:
            state.apply(e)
        return state

    def node(self, name: str, at: float) -> NodeView:
        view = self.nodes.get(name)
        if view is None:
            view = NodeView(name, len(self.nodes), at, self.tail_lines)
            self.nodes[name] = view
        return view

    def apply(self, event: Event) -> None:
        if self.started_at is None:
            self.started_at = event.time
        self.node(event.node, event.time).apply(event)

    def counts(self) -> Counts:
        return Counts.of(self.nodes.values())

    def elapsed(self, now: float) -> float:
        return 0.0 if self.started_at is None else max(0.0, now - self.started_at)

    def failed(self) -> list[NodeView]:
        return [n for n in self.nodes.values() if n.phase is Phase.FAILED]
