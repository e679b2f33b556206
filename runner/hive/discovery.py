"""Where the hive is: `-f/--config`, or an upward search from the working directory."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from runner.errors import HiveError


class HiveKind(StrEnum):
    LEGACY = "hive.nix"
    FLAKE = "flake"


@dataclass(frozen=True)
class HiveSource:
    """A legacy hive file (imported) or a flake reference."""

    kind: HiveKind
    ref: str  # an absolute file path for LEGACY, a flake reference for FLAKE
    directory: Path | None  # where relative things (GC roots, keys) are anchored

    def describe(self) -> str:
        return f"flake {self.ref}" if self.kind is HiveKind.FLAKE else self.ref


def _from_directory(directory: Path) -> HiveSource | None:
    if (directory / "flake.nix").is_file():
        return HiveSource(HiveKind.FLAKE, str(directory), directory)
    for name in ("hive.nix", "default.nix"):
        if (directory / name).is_file():
            return HiveSource(HiveKind.LEGACY, str(directory / name), directory)
    return None


def locate(config: str | None, cwd: Path) -> HiveSource:
    """Resolve `-f/--config` (or its absence) to a hive source."""
    if config is None:
        return _search_upward(cwd)
    path = (cwd / config).resolve() if not Path(config).is_absolute() else Path(config)
    if path.is_dir():
        found = _from_directory(path)
        if found is None:
            raise HiveError(
                f"--config {config}: the directory holds no flake.nix, hive.nix or default.nix"
            )
        return found
    if path.is_file():
        if path.name == "flake.nix":
            return HiveSource(HiveKind.FLAKE, str(path.parent), path.parent)
        return HiveSource(HiveKind.LEGACY, str(path), path.parent)
    if ":" in config:
        return HiveSource(HiveKind.FLAKE, config, None)
    raise HiveError(f"--config {config}: no such file or directory, and not a flake reference")


def _search_upward(cwd: Path) -> HiveSource:
    start = cwd.resolve()
    for directory in (start, *start.parents):
        if (directory / "flake.nix").is_file():
            return HiveSource(HiveKind.FLAKE, str(directory), directory)
        if (directory / "hive.nix").is_file():
            return HiveSource(HiveKind.LEGACY, str(directory / "hive.nix"), directory)
    raise HiveError(
        f"no hive found: no flake.nix or hive.nix in {start} or any parent; "
        "pass one with -f/--config"
    )
