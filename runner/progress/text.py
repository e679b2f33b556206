"""Text helpers of the progress output: terminal cell widths, cleaning, truncation, colour.

Everything here is pure. Widths are counted in terminal cells: East Asian wide and
full-width characters (CJK, most emoji) take two cells, combining marks and format
characters (zero-width joiner, variation selectors) none.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

# CSI (colours, cursor movement), OSC (titles, hyperlinks) and two-byte escapes.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC, ended by BEL or ST
    r"|\x1b[@-Z\\-_]"  # other two-byte escapes
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """One line of remote output as a terminal would leave it, without escapes.

    ANSI sequences are removed (they would break widths and could move our
    cursor, or fake a CI log command), a carriage return keeps only what was
    written after it (progress lines), tabs become spaces and other control
    characters go.
    """
    text = _ANSI.sub("", text)
    if "\r" in text:
        parts = [p for p in text.split("\r") if p]
        text = parts[-1] if parts else ""
    return _CONTROL.sub("", text.replace("\t", "    ").replace("\n", " "))


def clean_lines(text: str) -> list[str]:
    """`clean` for each line of a possibly multi-line text; trailing blank lines dropped."""
    lines = [clean(line) for line in text.splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def char_width(ch: str) -> int:
    o = ord(ch)
    if o < 0x20 or 0x7F <= o < 0xA0:
        return 0
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def cell_width(text: str) -> int:
    """Terminal cells `text` takes (no escape sequences in it)."""
    if text.isascii():
        return len(text)
    return sum(char_width(ch) for ch in text)


def truncate(text: str, width: int, ellipsis: str = "…") -> str:
    """`text` cut to at most `width` cells, ending in `ellipsis` when cut."""
    if width <= 0:
        return ""
    if cell_width(text) <= width:
        return text
    room = width - cell_width(ellipsis)
    if room < 0:
        return ellipsis[:width]
    out: list[str] = []
    used = 0
    for ch in text:
        w = char_width(ch)
        if used + w > room:
            break
        out.append(ch)
        used += w
    return "".join(out).rstrip() + ellipsis


def pad_left(text: str, width: int) -> str:
    return " " * max(0, width - cell_width(text)) + text


def rows_at(width_cells: int, columns: int) -> int:
    """Rows a line of `width_cells` takes on a terminal of `columns` that reflows it."""
    return max(1, math.ceil(width_cells / max(1, columns)))


def format_duration(seconds: float) -> str:
    """7s, 1m05s, 2h03m: short and of stable shape."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# SGR codes
BOLD = "1"
DIM = "2"
RED = "31"
GREEN = "32"
YELLOW = "33"
CYAN = "36"


def sgr(text: str, *codes: str, color: bool) -> str:
    """`text` in the given styles when `color`, else as is."""
    if not color or not codes or not text.strip():
        return text
    return f"\x1b[{';'.join(codes)}m{text}\x1b[0m"


@dataclass(frozen=True)
class Glyphs:
    """Status marks of the live view. Every glyph takes exactly one cell."""

    spinner: tuple[str, ...]
    ok: str
    failed: str
    skipped: str
    waiting: str
    ellipsis: str

    def spin(self, now: float) -> str:
        return self.spinner[int(now * 10) % len(self.spinner)]


# Unicode marks of East Asian width "neutral" (one cell everywhere). Colmena's
# clock and check-mark emoji take two cells, and terminals disagree on some
# emoji widths; one-cell marks keep the columns aligned on every terminal.
UNICODE = Glyphs(
    spinner=("⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"),
    ok="✓",
    failed="✗",
    skipped="-",
    waiting="◦",
    ellipsis="…",
)
ASCII = Glyphs(
    spinner=("|", "/", "-", "\\"),
    ok="+",
    failed="x",
    skipped="-",
    waiting=".",
    ellipsis="...",
)


def glyphs_for(encoding: str | None) -> Glyphs:
    """Unicode marks when the stream can encode them, else ASCII."""
    name = (encoding or "").lower().replace("-", "").replace("_", "")
    return UNICODE if name in ("utf8", "utf8sig") else ASCII


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def visible_width(text: str) -> int:
    """Cells of a rendered line that may hold SGR colour codes."""
    return cell_width(strip_ansi(text))
