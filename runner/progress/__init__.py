"""Progress output of a run: a live terminal view, or a plain log for CI and pipes.

    with choose_output(sys.stderr, plain=view.plain, color=view.color,
                       env=os.environ, names=selection.names) as output:
        run = await deploy(..., events=output)

(`view` is the request's `View`; see `runner.app.run.progress`.)

Both outputs are Sinks fed by the pipeline's events; renderers are pure functions
of a `ViewState` (folded from events) and a clock, see `render`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TextIO

from runner.progress.live import LiveView, terminal_size
from runner.progress.model import Counts, NodeView, Phase, ViewState
from runner.progress.output import Output, OutputHandler
from runner.progress.plain import PlainLog, Provider, github_block, gitlab_block
from runner.progress.render import (
    render_failures,
    render_heartbeat,
    render_live,
    render_plain_event,
    render_totals,
)
from runner.progress.text import ASCII, UNICODE, Glyphs, cell_width, glyphs_for

__all__ = [
    "ASCII",
    "COLOR_MODES",
    "UNICODE",
    "Counts",
    "Glyphs",
    "LiveView",
    "NodeView",
    "Output",
    "OutputHandler",
    "Phase",
    "PlainLog",
    "Provider",
    "ViewState",
    "cell_width",
    "choose_output",
    "color_enabled",
    "detect_provider",
    "github_block",
    "gitlab_block",
    "glyphs_for",
    "render_failures",
    "render_heartbeat",
    "render_live",
    "render_plain_event",
    "render_totals",
    "terminal_size",
]

COLOR_MODES = ("auto", "always", "never")
HEARTBEAT_SECONDS = 30.0  # a plain log says what is running after this long without output


def _set(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "") not in ("", "0", "false")


def detect_provider(env: Mapping[str, str]) -> Provider | None:
    """The CI service whose log conventions to follow, from its environment."""
    if env.get("GITHUB_ACTIONS") == "true":
        return "github"
    if env.get("GITLAB_CI") == "true":
        return "gitlab"
    return None


def color_enabled(
    mode: str, *, tty: bool, env: Mapping[str, str], provider: Provider | None = None
) -> bool:
    """Whether to write ANSI colours.

    `--color always|never` wins (no-color.org: a command-line flag overrides the
    environment). With `auto`: NO_COLOR (non-empty) -> no; CLICOLOR_FORCE or
    FORCE_COLOR (non-empty, not 0) -> yes; CLICOLOR=0 -> no; a terminal -> yes unless
    TERM=dumb; GitHub Actions and GitLab CI logs render colours -> yes; else no.
    """
    if mode not in COLOR_MODES:
        raise ValueError(f"color mode must be one of {', '.join(COLOR_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode == "always"
    if env.get("NO_COLOR", ""):
        return False
    if _set(env, "CLICOLOR_FORCE") or _set(env, "FORCE_COLOR"):
        return True
    if env.get("CLICOLOR") == "0":
        return False
    if tty:
        return env.get("TERM") != "dumb"
    return provider is not None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def choose_output(
    stream: TextIO,
    *,
    plain: bool = False,
    color: str = "auto",
    env: Mapping[str, str] | None = None,
    timestamps: bool = False,
    names: Sequence[str] = (),
) -> Output:
    """The live view on a terminal, else the plain log (grouped per node in CI).

    Plain when asked (`--plain`, `-v`), when `stream` is not a terminal, when `CI`
    is set or a CI provider is detected, or when TERM=dumb. `names` (the selected
    nodes) sets the plain log's label width, as Colmena aligns on the longest name.
    """
    env = os.environ if env is None else env
    provider = detect_provider(env)
    tty = _isatty(stream)
    use_color = color_enabled(color, tty=tty, env=env, provider=provider)
    glyphs = glyphs_for(getattr(stream, "encoding", None))
    live = (
        not plain
        and tty
        and provider is None
        and not _set(env, "CI")
        and env.get("TERM", "") not in ("", "dumb")
    )
    if live:
        return LiveView(stream, color=use_color, glyphs=glyphs)
    return PlainLog(
        stream,
        color=use_color,
        timestamps=timestamps,
        provider=provider,
        label_width=max([0, *(cell_width(n) for n in names)]),
        heartbeat=HEARTBEAT_SECONDS,
    )
