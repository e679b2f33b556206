"""Running the real `waggle` command in tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def waggle(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_clean_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit code as expected, a one-line 'waggle: error:' naming the problem, no traceback."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    first = [line for line in done.stderr.splitlines() if line.startswith("waggle: error:")]
    assert first, done.stderr
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)


def documented_report_fields() -> list[str]:
    """The field paths of README.md's `--report-json` table, e.g. `nodes[].stages[].facts`."""
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("`--report-json PATH`")
    table = text[start:].split("\n\n", 2)[1]
    fields = re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE)
    assert "nodes[].stages[].facts" in fields, table
    return fields
