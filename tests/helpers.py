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
