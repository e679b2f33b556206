"""Which remote builders a plan's evaluations and builds use.

`--builders` (NixFlags.builders) wins. Without it, the hive's `meta.machinesFile` is read
from one side of the change: the head commit for `waggle plan` (what `apply` will use once
it is merged), the base commit for a pull request in `waggle ci` (a pull request must not
send builds, and with them the runner's SSH identity, to machines of its choosing; see
runner.gitops.trust). A machines file inside the temporary checkout is copied into the
Nix store, so the builds after the evaluation (when the checkout is gone) still find it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runner import nix
from runner.errors import HiveError, NixError
from runner.hive.hive import Hive

Side = Literal["head", "base"]


@dataclass(frozen=True)
class Builders:
    machines_file: str | None
    note: str | None  # for the plan's notes; None: nothing worth saying


async def machines_file_of(hive: Hive | None, tree_dir: Path, side: Side) -> Builders:
    """meta.machinesFile of the hive at `side` (written out at `tree_dir`), usable after
    the checkout is removed; None (with a note saying why) when there is none to use."""
    if hive is None:
        return Builders(None, f"no remote builders: there is no hive in the {side} commit")
    try:
        path = (await hive.meta()).machines_file
    except HiveError as e:
        return Builders(None, f"no remote builders: the {side} commit's meta: {e.message}")
    if path is None:
        return Builders(None, None)
    if (missing := missing_machines_file(path)) is not None:
        return Builders(None, f"no remote builders: the {side} commit's {missing}")
    given = Path(path)
    if given.is_relative_to(tree_dir):
        try:
            path = await nix.add_to_store(str(given))
        except NixError as e:
            return Builders(None, f"no remote builders: meta.machinesFile: {e.summary}")
    return Builders(path, f"remote builders: meta.machinesFile of the {side} commit")


def missing_machines_file(path: str | None) -> str | None:
    """A warning when meta.machinesFile names no file (Nix then uses no builders, silently)."""
    if path is None or Path(path).is_file():
        return None
    return f"meta.machinesFile {path} is not a file"
