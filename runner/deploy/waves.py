"""Rollout waves: `--waves`, `--max-failures`, `--wave-order` and the gate between waves.

The nodes a run deploys to their hosts are put in a deterministic order and split into
waves; each wave's push, activation and what follows run as usual (in parallel within
`--parallel`), and the next wave starts only when every node of this one has an outcome
and at most the failure budget of them failed. Evaluation and builds are not gated: they
run for all nodes up front, so later waves are ready when their turn comes.

- **Spec** (`--waves 1,10%,100%`, waggle.yaml `rollout.waves`): entry k is how many nodes
  (N, a whole number from 1) or what share of them (P%, 0 < P <= 100, decimals allowed)
  have been reached by the end of wave k: cumulative, shares rounded up. Entries of one
  kind must grow strictly and the last entry must be `100%` (so no node is ever left out
  by the spec, whatever the fleet's size). Every wave has at least one node: an entry that
  reaches no more nodes than the one before (rounding; a count above a later share) still
  adds one; a count beyond the fleet reaches all of it; waves with no node left are dropped.
- **Order**: nodes tagged `canary` first, then the rest, each group by name. With
  `--wave-order @tag1,@tag2` (rules as in `--on`: `@tag` globs or name globs), the nodes a
  rule matches first come first, in rule order, then the rest; each group by name.
- **Budget** (`--max-failures N|P%`, default 0): how many failed nodes a wave may have for
  the next one to start, N nodes or P% of that wave's nodes rounded down. Each wave has its
  own budget (failures of earlier waves are not carried over). A node that failed its
  evaluation or build counts as failed in its wave.
- Nodes of waves that never started are skipped: their first host stage says "not reached:
  wave 2 exceeded the failure budget (2 failed)", `NodeResult.not_reached` is set, and the
  run is not ok (exit 1).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Protocol, TypeVar

from runner.errors import UsageError
from runner.events import Emitter, Event, EventKind, Sink
from runner.hive.model import NodeConfig
from runner.hive.selection import Rule
from runner.results import NodeResult, Stage, StageResult, Status

DEFAULT_ORDER = (Rule("canary", tag=True),)

_T = TypeVar("_T")

_COUNT = re.compile(r"[0-9]+")
_SHARE = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")


class SpecError(ValueError):
    """A bad wave spec, budget or order; the text says what, without naming the flag."""


@dataclass(frozen=True)
class Share:
    """N nodes (`count`) or a share of them (`share`, 0 <= s <= 1): an entry of the spec
    (shares rounded up, `round_up`) or the failure budget (rounded down)."""

    text: str
    round_up: bool
    count: int | None = None
    share: Fraction | None = None

    def of(self, total: int) -> int:
        """How many of `total` nodes this is (the share rounded as set), unclamped."""
        if self.share is not None:
            exact = self.share * total
            return math.ceil(exact) if self.round_up else math.floor(exact)
        assert self.count is not None
        return self.count


def _entries(entries: Sequence[str]) -> list[str]:
    out = []
    for position, raw in enumerate(entries, start=1):
        text = str(raw).strip()
        if not text:
            raise SpecError(f"entry {position} is empty (check for doubled or trailing commas)")
        out.append(text)
    return out


def parse_waves(entries: Sequence[str]) -> tuple[Share, ...]:
    """The spec's entries, checked (see the module doc); raises SpecError."""
    texts = _entries(entries)
    if not texts:
        raise SpecError("no waves given")
    parsed: list[Share] = []
    last: dict[bool, tuple[int, Share]] = {}  # by kind (share?): the previous entry
    for position, text in enumerate(texts, start=1):
        share = _SHARE.fullmatch(text)
        if share is not None:
            value = Fraction(share.group(1)) / 100
            if not 0 < value <= 1:
                raise SpecError(f"entry {position} ({text!r}) must be a share above 0% up to 100%")
            reach = Share(text, True, share=value)
        elif _COUNT.fullmatch(text) is not None and int(text) >= 1:
            reach = Share(text, True, count=int(text))
        else:
            raise SpecError(
                f"entry {position} ({text!r}) is not a node count N (1 or more) or a share P%"
            )
        kind = reach.share is not None
        before = last.get(kind)
        if before is not None and _size(reach) <= _size(before[1]):
            raise SpecError(
                f"entry {position} ({text!r}) does not reach more nodes than entry "
                f"{before[0]} ({before[1].text!r})"
            )
        last[kind] = (position, reach)
        parsed.append(reach)
    if parsed[-1].share != 1:
        raise SpecError("the last entry must be 100% (every node is reached by the last wave)")
    return tuple(parsed)


def _size(reach: Share) -> Fraction:
    return reach.share if reach.share is not None else Fraction(reach.count or 0)


def wave_sizes(spec: Sequence[Share], total: int) -> list[int]:
    """How many nodes each wave has, for `total` nodes (empty waves dropped)."""
    sizes: list[int] = []
    reached = 0
    for reach in spec:
        if reached >= total:
            break
        target = min(total, max(reach.of(total), reached + 1))
        sizes.append(target - reached)
        reached = target
    return sizes


def parse_budget(text: str) -> Share:
    """`N` (0 or more) or `P%` (0 to 100); raises SpecError."""
    text = str(text).strip()
    share = _SHARE.fullmatch(text)
    if share is not None:
        value = Fraction(share.group(1)) / 100
        if value <= 1:
            return Share(text, False, share=value)
    elif _COUNT.fullmatch(text) is not None:
        return Share(text, False, count=int(text))
    raise SpecError("must be a number of failed nodes N (0 or more) or a share P% of the wave")


def parse_order(entries: Sequence[str]) -> tuple[Rule, ...]:
    """`--wave-order` rules (`@tag` globs or name globs); none: canary-tagged nodes first."""
    rules = []
    for position, text in enumerate(_entries(entries), start=1):
        if text.startswith("@"):
            if text == "@":
                raise SpecError(f"entry {position} is a bare '@' with no tag")
            rules.append(Rule(text[1:], tag=True))
        else:
            rules.append(Rule(text, tag=False))
    return tuple(rules) or DEFAULT_ORDER


def order_nodes(
    names: Sequence[str], tags: Mapping[str, Sequence[str]], rules: Sequence[Rule]
) -> list[str]:
    """`names` in wave order: by the first rule matching each node, then by name."""

    def group(name: str) -> int:
        node_tags = tags.get(name, ())
        return next((i for i, r in enumerate(rules) if r.matches(name, node_tags)), len(rules))

    return sorted(names, key=lambda n: (group(n), n))


@dataclass(frozen=True)
class Rollout:
    """The checked wave settings of a run."""

    spec: tuple[Share, ...]
    budget: Share
    order: tuple[Rule, ...]

    @classmethod
    def parse(
        cls, spec: Sequence[str], max_failures: str, wave_order: Sequence[str]
    ) -> Rollout | None:
        """The rollout of these settings, None without waves; errors name the flag."""
        reach = _checked("--waves", ",".join(spec), lambda: parse_waves(spec)) if spec else ()
        budget = _checked("--max-failures", max_failures, lambda: parse_budget(max_failures))
        order = _checked("--wave-order", ",".join(wave_order), lambda: parse_order(wave_order))
        return cls(reach, budget, order) if reach else None

    def split(
        self, names: Sequence[str], tags: Mapping[str, Sequence[str]]
    ) -> tuple[tuple[str, ...], ...]:
        """`names` ordered and cut into waves."""
        ordered = order_nodes(names, tags, self.order)
        out, at = [], 0
        for size in wave_sizes(self.spec, len(ordered)):
            out.append(tuple(ordered[at : at + size]))
            at += size
        return tuple(out)


def _checked(flag: str, shown: str, parse: Callable[[], _T]) -> _T:
    try:
        return parse()
    except SpecError as e:
        raise UsageError(f"{flag} {shown!r}: {e}") from None


@dataclass
class WaveGate:
    """Node pipelines `enter` it before their host work and report their outcome with
    `record` (or through the event stream, `watch`). Wave 1 is open from the start; wave
    k + 1 opens when every node of wave k has an outcome and at most the budget failed,
    otherwise every later wave is closed for good with the reason."""

    waves: tuple[tuple[str, ...], ...]
    budget: Share
    emit: Emitter = field(default_factory=Emitter)
    _wave: dict[str, int] = field(default_factory=dict)
    _outcome: dict[str, bool] = field(default_factory=dict)
    _opened: list[asyncio.Event] = field(default_factory=list)
    _verdict: list[str | None] = field(default_factory=list)
    _current: int = 0  # index of the last wave opened

    def __post_init__(self) -> None:
        self._wave = {n: k for k, wave in enumerate(self.waves, start=1) for n in wave}
        self._opened = [asyncio.Event() for _ in self.waves]
        self._verdict = [None for _ in self.waves]
        if self._opened:
            self._opened[0].set()

    def wave_of(self, name: str) -> int | None:
        return self._wave.get(name)

    def not_reached(self, name: str) -> bool:
        k = self._wave.get(name)
        return k is not None and self._verdict[k - 1] is not None

    async def enter(self, name: str) -> str | None:
        """Wait until the node's wave starts: None, or the reason it never will."""
        k = self._wave.get(name)
        if k is None:
            return None
        opened, total = self._opened[k - 1], len(self.waves)
        if opened.is_set():
            if self._verdict[k - 1] is None:
                self.emit.log(name, f"wave {k} of {total} ({_nodes(len(self.waves[k - 1]))})")
        else:
            self.emit.log(name, f"wave {k} of {total}: waiting for wave {k - 1}")
        await opened.wait()
        return self._verdict[k - 1]

    def record(self, name: str, ok: bool) -> None:
        """The node's outcome (its first one counts); may open or close later waves."""
        if name not in self._wave or name in self._outcome:
            return
        self._outcome[name] = ok
        self._advance()

    def mark(self, result: NodeResult) -> NodeResult:
        """`result` with its wave number (None for nodes in no wave)."""
        return replace(result, wave=self.wave_of(result.name))

    def held_back(self, built: NodeResult, stage: Stage, reason: str) -> NodeResult:
        """The result of a node whose wave never started: `stage` (its first host stage)
        skipped with the reason; `not_reached` makes the run fail."""
        skipped = StageResult(stage, Status.SKIPPED, 0.0, reason, started_at=time.time())
        self.emit.end(built.name, skipped)
        return replace(built, stages=(*built.stages, skipped), not_reached=True)

    def watch(self, sink: Sink) -> Sink:
        """A sink that records each node's outcome from its node-end event, then passes
        every event on: eval and build failures, which never reach the host work, count."""

        def watching(event: Event) -> None:
            if event.kind is EventKind.NODE_END and event.node_result is not None:
                self.record(event.node, event.node_result.ok)
            sink(event)

        return watching

    def _advance(self) -> None:
        while self._current + 1 < len(self.waves):
            c = self._current
            if self._verdict[c] is not None:
                return
            wave = self.waves[c]
            if any(n not in self._outcome for n in wave):
                return
            failed = sum(not self._outcome[n] for n in wave)
            allowed = self.budget.of(len(wave))
            if failed > allowed:
                reason = f"not reached: wave {c + 1} exceeded the failure budget ({failed} failed)"
                for j in range(c + 1, len(self.waves)):
                    self._verdict[j] = reason
                    self._opened[j].set()
                return
            self._current = c + 1
            total, nxt = len(self.waves), self.waves[c + 1]
            for name in nxt:
                self.emit.log(
                    name,
                    f"wave {c + 2} of {total} started ({_nodes(len(nxt))}; wave {c + 1}: "
                    f"{failed} failed, {allowed} allowed)",
                )
            self._opened[c + 1].set()


class WaveSettings(Protocol):
    """What the gate reads of DeploySettings."""

    @property
    def waves(self) -> tuple[str, ...]: ...
    @property
    def max_failures(self) -> str: ...
    @property
    def wave_order(self) -> tuple[str, ...]: ...


def gate_for(
    settings: WaveSettings,
    names: Sequence[str],
    configs: Mapping[str, NodeConfig],
    emit: Emitter,
) -> tuple[WaveGate | None, Emitter]:
    """The gate for the nodes `names` (those going to their hosts; None without waves), and
    the emitter the run goes on with: it tells the gate each node's outcome."""
    rollout = Rollout.parse(settings.waves, settings.max_failures, settings.wave_order)
    if rollout is None:
        return None, emit
    tags = {n: configs[n].tags for n in names}
    gate = WaveGate(rollout.split(names, tags), rollout.budget, emit)
    return gate, Emitter(gate.watch(emit.sink))


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"
