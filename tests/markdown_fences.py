"""Reading fenced code blocks out of markdown the way CommonMark does (for report tests)."""

from __future__ import annotations

import re

_FENCE = re.compile(r"^ {0,3}(`{3,})([^`]*)$")


def fenced_blocks(text: str) -> tuple[list[str], list[str]]:
    """(code blocks, lines outside them) of CommonMark text, backtick fences only: a fence is
    3+ backticks after at most 3 spaces; the block closes at a line of at least as many
    backticks (and nothing else) after at most 3 spaces, or at the end of the document."""
    blocks: list[str] = []
    outside: list[str] = []
    fence: str | None = None
    body: list[str] = []
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence, body = match.group(1), []
            else:
                outside.append(line)
        elif match and len(match.group(1)) >= len(fence) and not match.group(2).strip():
            blocks.append("\n".join(body))
            fence = None
        else:
            body.append(line)
    if fence is not None:
        blocks.append("\n".join(body))
    return blocks, outside
