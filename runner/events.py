"""What happens during a run, as a stream of events.

The pipeline (evaluate, build, deploy) emits events to a `Sink`; the live
view and the plain CI log consume them. Reports read the final NodeResults.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from runner.results import NodeResult, Stage, StageResult, Status


class EventKind(StrEnum):
    QUEUED = "queued"  # the node takes part in the run
    STAGE_START = "stage-start"
    LOG = "log"  # a line of output or a progress message of the current stage
    STAGE_END = "stage-end"  # `result` holds the StageResult
    NODE_END = "node-end"  # `node_result` holds the NodeResult


@dataclass(frozen=True)
class Event:
    node: str
    kind: EventKind
    stage: Stage | None = None
    message: str = ""
    result: StageResult | None = None
    node_result: NodeResult | None = None
    time: float = field(default_factory=time.time)
    # An eval stage's end: the node's (drvPath, outPath), for a run stopped before it ends.
    paths: tuple[str | None, str | None] | None = None


Sink = Callable[[Event], None]


def discard(_event: Event) -> None:
    return None


@dataclass
class Emitter:
    """Helpers to emit events for one sink."""

    sink: Sink = discard

    def queued(self, node: str) -> None:
        self.sink(Event(node, EventKind.QUEUED))

    def start(self, node: str, stage: Stage, message: str = "") -> None:
        self.sink(Event(node, EventKind.STAGE_START, stage, message))

    def log(self, node: str, message: str, stage: Stage | None = None) -> None:
        self.sink(Event(node, EventKind.LOG, stage, message))

    def end(
        self, node: str, result: StageResult, paths: tuple[str | None, str | None] | None = None
    ) -> None:
        self.sink(
            Event(
                node, EventKind.STAGE_END, result.stage, result.message, result=result, paths=paths
            )
        )

    def done(self, result: NodeResult) -> None:
        self.sink(Event(result.name, EventKind.NODE_END, node_result=result))


@dataclass
class Recorder:
    """Passes events on and remembers each node's progress.

    When a run is stopped midway (SIGTERM, Ctrl-C), its pipeline returns no
    results; the recorder still knows which stages ended how, and which stage
    each unfinished node was in, so the reports can say so.
    """

    sink: Sink = discard
    _ended: dict[str, list[StageResult]] = field(default_factory=dict)
    _running: dict[str, tuple[Stage, float]] = field(default_factory=dict)
    _done: dict[str, NodeResult] = field(default_factory=dict)
    _paths: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def __call__(self, event: Event) -> None:
        if event.kind is EventKind.STAGE_START and event.stage is not None:
            self._running[event.node] = (event.stage, event.time)
        elif event.kind is EventKind.STAGE_END and event.result is not None:
            self._ended.setdefault(event.node, []).append(event.result)
            self._running.pop(event.node, None)
            if event.paths is not None:
                self._paths[event.node] = event.paths
        elif event.kind is EventKind.NODE_END and event.node_result is not None:
            self._done[event.node] = event.node_result
        self.sink(event)

    def results(
        self, names: Sequence[str], stages: Sequence[Stage], reason: str
    ) -> list[NodeResult]:
        """Each node's result so far; an unfinished node fails in the stage it was in."""
        results = []
        now = time.time()
        for name in names:
            if name in self._done:
                results.append(self._done[name])
                continue
            ended = self._ended.get(name, [])
            if name in self._running:
                stage, started = self._running[name]
            else:
                seen = {r.stage for r in ended}
                stage = next(
                    (s for s in stages if s not in seen), stages[-1] if stages else Stage.EVAL
                )
                started = now
            failed = StageResult(stage, Status.FAILED, now - started, reason, started_at=started)
            results.append(NodeResult(name, (*ended, failed), *self._paths.get(name, (None, None))))
        return results
