"""Node selection with `--on`: Colmena's comma-separated name and @tag globs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from typing_extensions import override

from runner.errors import UsageError


@dataclass(frozen=True)
class Rule:
    pattern: str
    tag: bool

    def matches(self, name: str, tags: Iterable[str]) -> bool:
        if self.tag:
            return any(fnmatchcase(t, self.pattern) for t in tags)
        return fnmatchcase(name, self.pattern)

    @override
    def __str__(self) -> str:
        return f"@{self.pattern}" if self.tag else self.pattern


@dataclass(frozen=True)
class Selector:
    rules: tuple[Rule, ...]
    text: str

    @property
    def needs_tags(self) -> bool:
        return any(r.tag for r in self.rules)

    def matching(self, names: Sequence[str], tags: Mapping[str, Sequence[str]]) -> list[str]:
        """The nodes in `names` that a rule matches, in `names` order (maybe none)."""
        return [n for n in names if any(r.matches(n, tags.get(n, ())) for r in self.rules)]

    def select(self, names: Sequence[str], tags: Mapping[str, Sequence[str]]) -> list[str]:
        """The matching nodes in `names` order; an error when none match."""
        chosen = self.matching(names, tags)
        if not chosen:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise UsageError(
                f"--on {self.text!r} matches no node (the hive has: {shown or 'none'})"
            )
        return chosen


def parse_on(text: str) -> Selector:
    if not text.strip():
        raise UsageError("--on is empty: give node names, globs or @tags, comma-separated")
    rules: list[Rule] = []
    for position, raw in enumerate(text.split(","), start=1):
        rule = raw.strip()
        if not rule:
            raise UsageError(
                f"--on {text!r}: rule {position} is empty (check for doubled or trailing commas)"
            )
        if rule.startswith("@"):
            pattern = rule[1:]
            if not pattern:
                raise UsageError(f"--on {text!r}: rule {position} is a bare '@' with no tag")
            rules.append(Rule(pattern, tag=True))
        else:
            rules.append(Rule(rule, tag=False))
    return Selector(tuple(rules), text)
