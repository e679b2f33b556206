"""The goals of `waggle apply` (and `build`, `push`, `upload-keys`): one list for every module.

`runner.deploy.pipeline` runs them; `runner.deploy.activation` accepts the ones that activate
(`ACTIVATION_GOALS`, the argument of `switch-to-configuration`). This module imports nothing
of Waggle's, so both can use it without an import cycle.
"""

from __future__ import annotations

from enum import StrEnum


class Goal(StrEnum):
    BUILD = "build"
    PUSH = "push"
    SWITCH = "switch"
    BOOT = "boot"
    TEST = "test"
    DRY_ACTIVATE = "dry-activate"
    UPLOAD_KEYS = "upload-keys"

    @property
    def sets_profile(self) -> bool:
        return self in (Goal.SWITCH, Goal.BOOT)

    @property
    def activates(self) -> bool:
        return self in (Goal.SWITCH, Goal.BOOT, Goal.TEST, Goal.DRY_ACTIVATE)

    @property
    def needs_host(self) -> bool:
        return self is not Goal.BUILD


GOALS: tuple[str, ...] = tuple(str(g) for g in Goal)
"""Every goal's name, in the order of `Goal` (the choices of `--goal`)."""

ACTIVATION_GOALS: tuple[str, ...] = tuple(str(g) for g in Goal if g.activates)
"""The goals `switch-to-configuration` takes: switch, boot, test, dry-activate."""
