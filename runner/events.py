"""What happens during a run, as a stream of events.

The pipeline (evaluate, build, deploy) emits events to a `Sink`; the live
view and the plain CI log consume them. Reports read the final NodeResults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from typing_extensions import override

from runner.results import NodeResult, Stage, StageResult


class EventKind(Enum):
    QUEUED = "queued"  # the node takes part in the run
    STAGE_START = "stage-start"
    LOG = "log"  # a line of output or a progress message of the current stage
    STAGE_END = "stage-end"  # `result` holds the StageResult
    NODE_END = "node-end"  # `node_result` holds the NodeResult

    @override
    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Event:
    node: str
    kind: EventKind
    stage: Stage | None = None
    message: str = ""
    result: StageResult | None = None
    node_result: NodeResult | None = None
    time: float = field(default_factory=time.time)


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

    def end(self, node: str, result: StageResult) -> None:
        self.sink(Event(node, EventKind.STAGE_END, result.stage, result.message, result=result))

    def done(self, result: NodeResult) -> None:
        self.sink(Event(result.name, EventKind.NODE_END, node_result=result))
