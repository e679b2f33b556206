"""runner/hive/nix/dest-dir-lib.sh: the destDir check write-key.sh and chown-key.sh share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runner.scripts import script

LIB = script("nix/dest-dir-lib.sh", package="runner.hive")
SHELLS = [s for s in ("/bin/dash", "/bin/bash") if Path(s).exists()]


def dest_dir(shell: str, directory: str, create: str, *, path: str | None = None):
    env = dict(os.environ, PATH=path) if path is not None else None
    return subprocess.run(
        ["sh", "-c", LIB + 'waggle_dest_dir "$@"', "sh", "p: ", directory, create],
        executable=shell,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


@pytest.mark.parametrize("shell", SHELLS)
def test_safe_dirs_pass_and_missing_ones_are_created_only_when_asked(shell, tmp_path):
    tmp_path.chmod(0o755)
    dest = tmp_path / "a" / "b"
    done = dest_dir(shell, f"{tmp_path}//./a/b", "0")
    assert (done.returncode, done.stderr) == (
        1,
        f"p: unsafe destDir {tmp_path}//./a/b: {tmp_path}/a is not a directory\n",
    )
    assert not (tmp_path / "a").exists()
    done = dest_dir(shell, str(dest), "1")
    assert (done.returncode, done.stderr) == (0, "")
    assert oct(dest.stat().st_mode & 0o7777) == "0o755"
    assert oct((tmp_path / "a").stat().st_mode & 0o7777) == "0o755"
    assert dest_dir(shell, str(dest), "0").returncode == 0
    (tmp_path / "sticky").mkdir()
    (tmp_path / "sticky").chmod(0o1777)
    assert dest_dir(shell, str(tmp_path / "sticky"), "0").returncode == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_unsafe_dirs_are_refused_with_the_reason(shell, tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "file").write_text("")
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    cases = {
        "rel/keys": "not an absolute path",
        f"{tmp_path}/x/../keys": "it must not contain ..",
        f"{tmp_path}/file/keys": f"{tmp_path}/file is not a directory",
        f"{tmp_path}/open/keys": f"{tmp_path}/open is group- or world-writable without the sticky bit",
    }
    if os.geteuid() == 0:
        (tmp_path / "theirs").mkdir()
        os.chown(tmp_path / "theirs", 65534, 65534)
        cases[f"{tmp_path}/theirs/keys"] = f"{tmp_path}/theirs is owned by uid 65534, not root"
    for directory, why in cases.items():
        done = dest_dir(shell, directory, "1")
        assert (done.returncode, done.stderr) == (1, f"p: unsafe destDir {directory}: {why}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["file", "open", *(["theirs"] if os.geteuid() == 0 else [])]
    )  # nothing created below a refused directory


@pytest.mark.parametrize("shell", SHELLS)
def test_a_directory_whose_owner_and_mode_cannot_be_read_is_refused(shell, tmp_path):
    # One stat reads every directory: when it prints nothing (here a stand-in that fails),
    # the check must not pass for want of a line (as root, `[ -O / ]` holds).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "stat").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "stat").chmod(0o755)
    done = dest_dir(shell, "/", "0", path=f"{bin_dir}:{os.environ['PATH']}")
    assert (done.returncode, done.stderr) == (
        1,
        "p: unsafe destDir /: cannot read the owner and mode of /\n",
    )
