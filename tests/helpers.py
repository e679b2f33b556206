"""Running the real `waggle` command in tests; hosts whose imports hang."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fleet import TestHost

CI_VARIABLES = ("GITHUB_", "GITLAB", "CI_", "DRONE")  # the prefixes of CI services' variables


def outside_ci(**extra: str) -> dict[str, str]:
    """This process's environment without CI and any CI service's variables, plus `extra`
    (so `waggle ci` sees only the service a test sets up)."""
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith(CI_VARIABLES)}
    env.update(extra)
    return env


def waggle(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`waggle ARGS` in `cwd` (with `env` instead of this process's environment)."""
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=env,
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


def is_import(pid: int) -> bool:
    """Whether process `pid` is a `nix-store --import`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(argv[0].decode(errors="replace")).name == "nix-store" and b"--import" in argv[1:]


@contextlib.contextmanager
def stopped_imports(host: TestHost) -> Iterator[list[int]]:
    """SIGSTOP every `nix-store --import` that starts on `host`: a hung import (a dead disk).

    The PIDs stopped so far are in the list; what is left of them is killed at the end."""
    stopped: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in host.processes():
                if pid not in stopped and is_import(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield stopped
    finally:
        done.set()
        watcher.join(5)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
