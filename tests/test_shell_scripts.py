"""Every shell script Waggle runs on hosts passes shellcheck (runner/**/*.sh)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "runner").rglob("*.sh"))


def test_there_are_scripts_to_check():
    names = {p.name for p in SCRIPTS}
    activation = {
        f"activation-{part}.sh" for part in ("setup", "runner", "detach", "running", "follow")
    }
    expected = {"write-key.sh", "write-file.sh", "chown-key.sh", "current-system.sh"}
    assert expected | activation | {"activation-stop.sh"} <= names, names


def shellcheck(*args: str, text: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed; scripts/setup.sh installs it")
        pytest.skip("shellcheck is not installed")
    return subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean(script: Path):
    done = shellcheck(str(script))
    assert done.returncode == 0, done.stdout + done.stderr


ACTIVATION_SCRIPTS = (
    "SETUP_SCRIPT",
    "RUNNER_SCRIPT",
    "DETACH_SCRIPT",
    "FOLLOW_SCRIPT",
    "STOP_SCRIPT",
    "CURRENT_SCRIPT",
)


@pytest.mark.parametrize("name", ACTIVATION_SCRIPTS)
def test_the_activation_scripts_as_sent_are_shellcheck_clean(name: str):
    # What is sent is the file without comments, the follow and stop scripts after the
    # `running` fragment: check that text too, not only the files.
    from runner.deploy import activation

    text = getattr(activation, name)
    assert text.strip()
    done = shellcheck("-", text=text)
    assert done.returncode == 0, done.stdout + done.stderr


def test_scripts_ship_with_the_package():
    # Scripts are read with importlib.resources: pyproject must list them as package data.
    text = (ROOT / "pyproject.toml").read_text()
    assert '"runner.scripts" = ["*.sh"]' in text
    assert '"nix/*.sh"' in text


# write-key.sh under both shells a host's /bin/sh may be (NixOS: bash; Debian: dash).
SHELLS = [s for s in ("/bin/dash", "/bin/bash") if Path(s).exists()]


def write_key(shell: str, dest: Path, tmp: str, content: bytes = b"k", *, user: str = ""):
    from runner.deploy.keys import WRITE_KEY_SCRIPT

    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    args = [str(dest), "key", tmp, user or me, group, "0640", "1"]
    return subprocess.run(
        ["sh", "-c", WRITE_KEY_SCRIPT, "sh", *args],
        executable=shell,
        input=content,
        capture_output=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("shell", SHELLS)
def test_write_key_installs_and_never_opens_an_existing_name(shell, tmp_path):
    dest = tmp_path / "keys"
    done = write_key(shell, dest, ".key.waggle-1", b"secret\n")
    assert done.returncode == 0, done.stderr
    assert (dest / "key").read_bytes() == b"secret\n"
    assert oct((dest / "key").stat().st_mode & 0o7777) == "0o640"
    assert sorted(p.name for p in dest.iterdir()) == ["key"]

    victim = tmp_path / "victim"
    victim.write_text("v")
    victim.chmod(0o644)
    targets = {"regular": victim, "dangling": tmp_path / "nowhere"}
    if os.geteuid() == 0:
        device = tmp_path / "null"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a private /dev/null
        device.chmod(0o666)
        targets["device"] = device
    for what, target in targets.items():
        tmp = f".key.waggle-{what}"
        (dest / tmp).symlink_to(target)
        done = write_key(shell, dest, tmp, b"other\n")
        assert done.returncode != 0, what
        assert (dest / tmp).is_symlink(), what  # someone else's name: left alone
        (dest / tmp).unlink()
        assert (dest / "key").read_bytes() == b"secret\n", what
    assert oct(victim.stat().st_mode & 0o7777) == "0o644" and victim.read_text() == "v"
    if "device" in targets:
        assert oct(targets["device"].stat().st_mode & 0o7777) == "0o666"
