"""Shell scripts Waggle runs on hosts (package data, shellcheck-clean; tests/test_shell_scripts.py).

Each runs as `sh -c SCRIPT sh ARGS...`: every value is a positional argument, never spliced
into the script text, and data (a key's content) comes on stdin, never in an argv.
"""

from __future__ import annotations

import secrets
from functools import cache
from importlib.resources import files


@cache
def script(name: str, *, comments: bool = False, package: str = __name__) -> str:
    """The text of runner/scripts/`name` (e.g. "write-key.sh"), without its comment lines;
    of `name` in another `package` with it (e.g. "nix/dest-dir-lib.sh" in runner.hive).

    The text travels in every command line (and shows in the host's process list), so the
    comments, which are for readers of the file, stay here. `comments=True` keeps them, for
    a script that is sent as data and stays on the host as a file (activation's run.sh).
    """
    text = files(package).joinpath(name).read_text(encoding="utf-8")
    if comments:
        return text
    return "".join(
        line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#")
    )


def write_file_argv(path: str, mode: int) -> list[str]:
    """argv writing stdin to `path` with `mode` (write-file.sh): for `Host.write_file`."""
    return ["sh", "-c", script("write-file.sh"), "sh", path, f"{mode:o}", secrets.token_hex(8)]
