"""Shared fixtures. Tests run real nix against the nixpkgs stand-in."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "fixtures" / "nixpkgs"
EXAMPLE = ROOT / "examples" / "hive.nix"

# No network here: never wait on a binary cache. Flakes for the flake tests.
os.environ["NIX_CONFIG"] = "substituters =\nexperimental-features = nix-command flakes\n"


def write_hive(directory: Path, body: str, name: str = "hive.nix") -> Path:
    """Write a hive whose `meta.nixpkgs` is the stand-in; `@NIXPKGS@` is its path."""
    path = directory / name
    path.write_text(textwrap.dedent(body).replace("@NIXPKGS@", str(STANDIN)))
    return path


@pytest.fixture
def hive_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _nix_available() -> None:
    if shutil.which("nix-instantiate") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nix is not installed; scripts/setup.sh installs it")
        pytest.skip("nix is not installed")


def needs_fleet() -> list[pytest.MarkDecorator]:
    """Marks for modules using the real fleet: root needed; under CI=true never skipped."""
    if os.environ.get("CI") == "true":
        return []
    return [pytest.mark.skipif(os.geteuid() != 0, reason="the test fleet needs root")]
