"""The one root error type and its kinds.

The CLI maps these to exit codes in one place (`runner.cli.main`). Every
message is one line a user can act on and names the thing that is wrong.
"""

from __future__ import annotations

import traceback

from typing_extensions import override

EXIT_OK = 0
EXIT_NODES_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    everything asked for succeeded (or nothing needed doing)
  1    one or more nodes failed; the others still ran
  2    usage or hive error before any node ran (bad flag, bad --on,
       hive not found or does not evaluate, nix missing)
  130  interrupted (SIGINT, Ctrl-C)
  143  terminated (SIGTERM, e.g. a cancelled CI job); reports are still written
"""
"""What `waggle --help` says about exit codes (143 is 128 + SIGTERM, see runner.interrupt)."""


class WaggleError(Exception):
    """Root of every error Waggle raises on purpose."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    @override
    def __str__(self) -> str:
        return self.message


class UsageError(WaggleError):
    """A bad flag or flag value (exit 2)."""


class HiveError(WaggleError):
    """The hive cannot be found, read or evaluated (exit 2)."""


class NixError(WaggleError):
    """A Nix command failed; `detail` holds Nix's own message."""

    def __init__(
        self, message: str, *, detail: str = "", returncode: int | None = None, summary: str = ""
    ) -> None:
        super().__init__(message, detail=detail)
        self.returncode = returncode
        self.summary = summary or message  # the cause alone, without "X failed:"


class ToolMissingError(WaggleError):
    """A program Waggle needs (nix, ssh) is not installed (exit 2)."""


class NodesFailedError(WaggleError):
    """One or more nodes failed; the others ran (exit 1)."""

    exit_code = 1


def failure_text(error: BaseException) -> tuple[str, str]:
    """(one-line message, detail) for a failure that ends one node's stage.

    Waggle's own errors say what went wrong; anything else is a bug or an
    unexpected condition: "internal error: ..." with the traceback as detail.
    """
    if isinstance(error, WaggleError):
        return error.message, error.detail
    text = " ".join(str(error).split()) or "no message"
    detail = "".join(traceback.format_exception(error))
    return f"internal error: {type(error).__name__}: {text}", detail
