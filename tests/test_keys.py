"""deployment.keys upload (runner/keys.py) against real sshd hosts and the fake host.

The fleet tests need root (mount namespaces, port 22); they are skipped without it unless
CI=true, where they must run. The fake-host and read_key tests run anywhere.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import asyncssh
import psutil
import pytest

from runner.deploy.keys import KeysOutcome, KeyUploadError, read_key, upload_keys
from runner.hive.model import Key, KeySource, UploadAt
from runner.hosts.ssh import SshHost, SshSettings, SshTarget
from tests.fake_ssh import DEFAULT_ENV, FakeHost
from tests.fleet import Fleet, TestHost, free_first_octet

NODE = "host1"
NOSFTP = "nosftp"  # a host whose sshd has no sftp subsystem (services.openssh.allowSFTP = false)
SUDO = ("sudo", "-H", "--")
NIX_STORE = Path("/nix/store")


def make_key(
    name: str,
    *,
    text: str | None = None,
    key_file: str | None = None,
    key_command: tuple[str, ...] | None = None,
    dest_dir: str = "/run/keys",
    user: str = "root",
    group: str = "root",
    permissions: str = "0600",
    upload_at: UploadAt = UploadAt.PRE_ACTIVATION,
) -> Key:
    return Key(
        attr=name,
        name=name,
        source=KeySource(text=text, key_file=key_file, key_command=key_command),
        dest_dir=dest_dir,
        path=f"{dest_dir}/{name}",
        user=user,
        group=group,
        permissions=permissions,
        upload_at=upload_at,
    )


async def upload_one(host, key: Key, content: bytes, *, timeout: float = 30) -> KeysOutcome:
    """`key` with `content` as its text, uploaded as `upload-keys` does (the owner required)."""
    keyed = replace(key, source=KeySource(text=content.decode()))
    return await upload_keys(
        host, [keyed], phase="all", require_ownership=True, base_dir=None, timeout=timeout
    )


# -- the fleet ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet():
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("the test fleet needs root (mount namespaces, port 22)")
    # Not under pytest's 0700 basetemp: a non-root login (the sudo test) has sshd read
    # D/authorized_keys as that user, so D must be traversable.
    directory = Path(tempfile.mkdtemp(prefix="waggle-keys-", dir="/tmp"))
    try:
        directory.chmod(0o711)
        octet = free_first_octet(2, 140)
        fleet = Fleet.start(directory, 2, names=[NODE, NOSFTP], first_octet=octet)
        try:
            fleet.authorized_keys.chmod(0o644)
            config = fleet[NOSFTP].root / "sshd_config"
            lines = config.read_text().splitlines(keepends=True)
            config.write_text("".join(x for x in lines if not x.startswith("Subsystem")))
            fleet.start_host(NOSFTP)
            for name in (NODE, NOSFTP):
                ok(fleet, "groupadd -f g && useradd -M -g g u", name=name)
            yield fleet
        finally:
            fleet.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ok(fleet: Fleet, command: str, *, name: str = NODE) -> str:
    done = fleet.run(name, command)
    assert done.returncode == 0, (command, done.stderr.decode())
    return done.stdout.decode()


def on_host(fleet: Fleet, work, *, user: str = "root", name: str = NODE):
    """Run `work(host)` with an SshHost connected to fleet host `name` as `user`."""

    async def main():
        target = SshTarget(node=name, host=name, user=user, escalation=SUDO)
        host = SshHost(target, SshSettings(config_files=(str(fleet.ssh_config),)))
        try:
            return await work(host)
        finally:
            await host.close()

    return asyncio.run(main())


def ids(host: TestHost, database: str, name: str) -> int:
    """The uid (passwd) or gid (group) of `name` in the test host's own /etc."""
    for line in host.path(f"/etc/{database}").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"{name} not in the host's /etc/{database}")


def stat_of(host: TestHost, path: str) -> tuple[str, int, int]:
    st = host.path(path).stat()
    return oct(st.st_mode & 0o7777), st.st_uid, st.st_gid


def leftovers(host: TestHost, directory: str = "/run/keys") -> list[str]:
    local = host.path(directory)
    return sorted(p.name for p in local.iterdir() if ".waggle-" in p.name) if local.is_dir() else []


def test_every_source_lands_with_its_content_mode_and_owner(fleet, tmp_path):
    host = fleet[NODE]
    absolute = tmp_path / "abs.key"
    absolute.write_bytes(b"from an absolute keyFile\n")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "rel.key").write_bytes(b"relative to the hive\n")
    keys = [
        make_key("text", text="plain text \u00e9\n"),
        make_key("abs", key_file=str(absolute), permissions="0640", user="u", group="g"),
        make_key("rel", key_file="secrets/rel.key", upload_at=UploadAt.POST_ACTIVATION),
        make_key("cmd", key_command=("sh", "-c", r"printf 'bin\377\000ary'"), permissions="400"),
    ]

    async def work(h):
        return await upload_keys(
            h, keys, phase="all", require_ownership=True, base_dir=tmp_path, timeout=30
        )

    outcome = on_host(fleet, work)
    assert isinstance(outcome, KeysOutcome)
    assert outcome.uploaded == ("text", "abs", "rel", "cmd")
    assert outcome.message == "4 keys uploaded" and outcome.owner_deferred == ()
    assert outcome.seconds > 0
    assert host.path("/run/keys/text").read_bytes() == "plain text \u00e9\n".encode()
    assert host.path("/run/keys/abs").read_bytes() == b"from an absolute keyFile\n"
    assert host.path("/run/keys/rel").read_bytes() == b"relative to the hive\n"
    assert host.path("/run/keys/cmd").read_bytes() == b"bin\377\000ary"  # bytes, not text
    u, g = ids(host, "passwd", "u"), ids(host, "group", "g")
    assert stat_of(host, "/run/keys/text") == ("0o600", 0, 0)
    assert stat_of(host, "/run/keys/abs") == ("0o640", u, g)
    assert stat_of(host, "/run/keys/rel") == ("0o600", 0, 0)
    assert stat_of(host, "/run/keys/cmd") == ("0o400", 0, 0)
    assert oct(host.path("/run/keys").stat().st_mode & 0o777) == "0o755"
    assert leftovers(host) == []
    assert not Path("/run/keys/abs").exists()  # the host's /run, not this machine's


def test_pre_activation_defers_a_missing_owner_post_activation_requires_it(fleet):
    host = fleet[NODE]
    pre = make_key("later", text="pre\n", user="later", group="g", permissions="0640")
    post = make_key(
        "ghost", text="post\n", user="ghost", group="ghosts", upload_at=UploadAt.POST_ACTIVATION
    )

    async def work(h):
        first = await upload_keys(
            h,
            [pre, post],
            phase="pre-activation",
            require_ownership=False,
            base_dir=None,
            timeout=30,
        )
        with pytest.raises(KeyUploadError) as failed:
            await upload_keys(
                h,
                [pre, post],
                phase="post-activation",
                require_ownership=True,
                base_dir=None,
                timeout=30,
            )
        with pytest.raises(KeyUploadError) as replaced:
            await upload_one(h, pre, b"new\n", timeout=30)
        return first, failed.value, replaced.value

    first, failed, replaced = on_host(fleet, work)
    assert first.uploaded == ("later",) and first.owner_deferred == ("later",)
    assert "1 key uploaded" in first.message and "during activation" in first.message
    assert stat_of(host, "/run/keys/later") == ("0o640", 0, 0)  # root until activation
    assert str(failed) == (
        "node host1: key ghost: cannot install /run/keys/ghost: exit status 1:"
        " owner not found on the host: user ghost, group ghosts"
    )
    assert failed.exit_code == 1
    assert str(replaced).endswith(": exit status 1: owner not found on the host: user later")
    assert not host.path("/run/keys/ghost").exists()
    assert host.path("/run/keys/later").read_bytes() == b"pre\n"  # the old key stays whole
    assert leftovers(host) == []


def test_phases_select_keys_and_say_when_there_are_none(fleet):
    pre = make_key("p", text="p")

    async def work(h):
        return await upload_keys(
            h, [pre], phase="post-activation", require_ownership=True, base_dir=None, timeout=30
        )

    outcome = on_host(fleet, work)
    assert outcome.uploaded == () and outcome.message == "no post-activation keys"
    assert KeysOutcome("pre-activation", (), 0.0).message == "no pre-activation keys"
    assert KeysOutcome("all", (), 0.0).message == "no keys"


def test_a_custom_dest_dir_is_created(fleet):
    host = fleet[NODE]
    key = make_key("db", text="hunter2", dest_dir="/run/app/secrets/db", user="u", group="g")

    async def work(h):
        await upload_one(h, key, b"hunter2", timeout=30)

    on_host(fleet, work)
    assert host.path("/run/app/secrets/db/db").read_bytes() == b"hunter2"
    assert stat_of(host, "/run/app/secrets/db/db")[0] == "0o600"
    for d in ("/run/app", "/run/app/secrets", "/run/app/secrets/db"):
        assert oct(host.path(d).stat().st_mode & 0o777) == "0o755", d
    assert leftovers(host, "/run/app/secrets/db") == []


def test_replacing_a_key_is_atomic(fleet):
    host = fleet[NODE]
    size = 8 << 20
    old, new = b"A" * size, b"B" * size
    key = make_key("big", text="unused")
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        local = host.path("/run/keys/big")
        while not stop.is_set():
            try:
                data = local.read_bytes()
            except FileNotFoundError:
                seen.append("missing")
                continue
            seen.append("old" if data == old else "new" if data == new else f"partial {len(data)}")

    async def work(h):
        await upload_one(h, key, old, timeout=60)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            await upload_one(h, key, new, timeout=60)
            await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.to_thread(watcher.join)

    on_host(fleet, work)
    assert host.path("/run/keys/big").read_bytes() == new
    assert set(seen) <= {"old", "new"}, sorted(set(seen))
    assert "old" in seen and "new" in seen
    assert leftovers(host) == []


def test_a_failed_install_leaves_no_temporary_file(fleet):
    host = fleet[NODE]
    ok(fleet, "mkdir -p /run/keys/taken && touch /run/keys/taken/inside")
    key = make_key("taken", text="x")

    async def work(h):
        with pytest.raises(KeyUploadError) as failed:
            await upload_one(h, key, b"x", timeout=30)
        return failed.value

    failed = on_host(fleet, work)
    assert str(failed).startswith("node host1: key taken: cannot install /run/keys/taken: ")
    assert host.path("/run/keys/taken/inside").exists()  # the directory is untouched
    assert leftovers(host) == []


def test_non_root_target_user_escalates_with_sudo(fleet):
    if shutil.which("sudo") is None or not fleet[NODE].path("/etc/sudoers").exists():
        pytest.skip("sudo is not installed (scripts/setup.sh should install it)")
    host = fleet[NODE]
    ok(
        fleet,
        "id deploy >/dev/null 2>&1 || useradd -M -d / -s /bin/sh -p '*' deploy;"
        " echo 'deploy ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/deploy;"
        " chmod 0440 /etc/sudoers.d/deploy; grep -q ' host1$' /etc/hosts"
        " || echo '127.0.0.1 host1' >> /etc/hosts",
    )
    key = make_key("via-sudo", text="escalated\n", user="u", group="g", permissions="0640")

    async def work(h):
        who = await h.run(["id", "-un"], privileged=False)
        outcome = await upload_keys(
            h, [key], phase="all", require_ownership=True, base_dir=None, timeout=30
        )
        return who.stdout.strip(), outcome

    who, outcome = on_host(fleet, work, user="deploy")
    assert who == "deploy"
    assert outcome.uploaded == ("via-sudo",)
    assert host.path("/run/keys/via-sudo").read_bytes() == b"escalated\n"
    u, g = ids(host, "passwd", "u"), ids(host, "group", "g")
    assert stat_of(host, "/run/keys/via-sudo") == ("0o640", u, g)
    assert leftovers(host) == []


def test_poison_never_leaves_the_key_file_on_a_real_host(fleet, caplog):
    host = fleet[NODE]
    poison = f"POISON-{uuid.uuid4()}"
    store_before = set(os.listdir(NIX_STORE)) if NIX_STORE.is_dir() else set()
    caplog.set_level(logging.DEBUG)
    good = make_key("poisoned", text=poison)
    bad = make_key("poisoned-bad", text=poison, user="nobody-here")

    async def work(h):
        await upload_one(h, good, poison.encode(), timeout=30)
        with pytest.raises(KeyUploadError) as failed:
            await upload_keys(
                h, [bad], phase="all", require_ownership=True, base_dir=None, timeout=30
            )
        return failed.value

    failed = on_host(fleet, work)
    assert host.path("/run/keys/poisoned").read_text() == poison
    assert poison not in str(failed) and poison not in repr(failed)
    assert poison not in caplog.text
    assert poison not in (host.root / "sshd.log").read_text(errors="replace")
    # Neither this machine's store nor the host's holds it.
    grep = subprocess.run(
        ["grep", "-rlF", "--", poison, str(host.path("/nix"))], capture_output=True, check=False
    )
    assert grep.returncode == 1, grep.stdout
    new = sorted(set(os.listdir(NIX_STORE)) - store_before) if NIX_STORE.is_dir() else []
    if new:
        paths = [str(NIX_STORE / n) for n in new]
        grep = subprocess.run(
            ["grep", "-rlF", "--", poison, *paths], capture_output=True, check=False
        )
        assert grep.returncode == 1, grep.stdout


# -- a key's owner cannot get other files chowned (swapped temporary file, unsafe destDir) ------


VICTIM = "/etc/waggle-victim"  # stands for /etc/shadow: root-owned, 0644 so a chmod shows


class Stalling:
    """A Host proxy for the race tests: the real SshHost underneath, with two windows opened.

    Every command starts `delay` s late (the gap between two remote commands widens), and
    a command's stdin is fed as its first byte, then - once `hold()` returns - the rest
    (the remote side is stuck reading while its temporary file exists).
    """

    def __init__(self, inner, hold, delay: float = 0.5) -> None:
        self.inner, self.name, self.hold, self.delay = inner, inner.name, hold, delay

    async def run(self, argv, *, input_data=None, timeout=None, privileged=True, on_line=None):
        await asyncio.sleep(self.delay)
        if not input_data:
            return await self.inner.run(
                argv, input_data=input_data, timeout=timeout, privileged=privileged
            )

        async def chunks():
            yield input_data[:1]
            await self.hold()
            yield input_data[1:]

        return await self.inner.run_fed(argv, chunks(), timeout=timeout, privileged=privileged)

    async def run_fed(self, argv, chunks, *, timeout=None, privileged=True):
        await asyncio.sleep(self.delay)
        return await self.inner.run_fed(argv, chunks, timeout=timeout, privileged=privileged)

    async def write_file(self, path, data, *, mode, timeout=None):
        await self.inner.write_file(path, data, mode=mode, timeout=timeout)

    async def close(self):
        await self.inner.close()


def swap_temporary_files(
    local_dir: Path, target: str, swapped: threading.Event, done: threading.Event
) -> None:
    """The attacker: replace the first `.NAME.waggle-*` regular file with a symlink to target."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not done.is_set():
        try:
            entries = list(os.scandir(local_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if ".waggle-" in entry.name and entry.is_file(follow_symlinks=False):
                side = local_dir / f"{entry.name}.attacker"
                os.symlink(target, side)
                os.replace(side, entry.path)
                swapped.set()
                return
        time.sleep(0.0005)


def race(fleet: Fleet, key: Key, content: bytes) -> tuple[KeyUploadError | None, bool]:
    """Upload `key` while the attacker swaps its temporary file; (error or None, swapped)."""
    host = fleet[NODE]
    swapped, done = threading.Event(), threading.Event()
    attacker = threading.Thread(
        target=swap_temporary_files, args=(host.path(key.dest_dir), VICTIM, swapped, done)
    )

    async def hold() -> None:  # the swap takes milliseconds once the file exists
        await asyncio.to_thread(swapped.wait, 1)

    async def work(h):
        attacker.start()
        try:
            await upload_one(Stalling(h, hold), key, content, timeout=30)
        except KeyUploadError as e:
            return e
        finally:
            done.set()
            await asyncio.to_thread(attacker.join, 5)
        return None

    return on_host(fleet, work), swapped.is_set()


@pytest.fixture
def victim(fleet):
    ok(
        fleet,
        f"printf 'root:hash\\n' > {VICTIM} && chown root:root {VICTIM} && chmod 0644 {VICTIM}",
    )
    yield fleet[NODE]
    ok(fleet, f"rm -f {VICTIM}")


def victim_untouched(host: TestHost) -> None:
    assert stat_of(host, VICTIM) == ("0o644", 0, 0)
    assert host.path(VICTIM).read_bytes() == b"root:hash\n"


def test_a_swapped_temporary_file_in_a_destdir_the_owner_controls_chowns_nothing(fleet, victim):
    # The key's owner u owns its destDir, so u can swap the temporary file for a symlink.
    ok(fleet, "mkdir -p /run/u-keys && chown u:g /run/u-keys && chmod 0755 /run/u-keys")
    key = make_key("k", text="s", dest_dir="/run/u-keys", user="u", group="g")
    failed, _ = race(fleet, key, b"secret")
    victim_untouched(victim)
    assert not victim.path("/run/u-keys/k").is_symlink()
    u = ids(victim, "passwd", "u")
    assert str(failed) == (
        "node host1: key k: cannot install /run/u-keys/k: exit status 1:"
        f" unsafe destDir /run/u-keys: /run/u-keys is owned by uid {u}, not root"
    )
    assert leftovers(victim, "/run/u-keys") == []


def test_a_swapped_temporary_file_is_never_followed(fleet, victim):
    # A destDir Waggle accepts (sticky, like /tmp): only root could swap root's file there;
    # the test does, to show that the owner and mode go to the file Waggle opened.
    ok(fleet, "mkdir -p /run/sticky && chmod 1777 /run/sticky")
    key = make_key("k", text="s", dest_dir="/run/sticky", user="u", group="g", permissions="0600")
    failed, swapped = race(fleet, key, b"secret")
    assert swapped
    victim_untouched(victim)
    assert (
        not victim.path("/run/sticky/k").exists() and not victim.path("/run/sticky/k").is_symlink()
    )
    assert failed is not None and str(failed).startswith(
        "node host1: key k: cannot install /run/sticky/k: exit status 1:"
    )
    assert "was replaced" in str(failed)
    assert leftovers(victim, "/run/sticky") == []


@pytest.mark.parametrize(
    ("setup", "dest", "why"),
    [
        ("mkdir -p /run/d1 && chown u /run/d1", "/run/d1", "/run/d1 is owned by uid U, not root"),
        (
            "mkdir -p /run/d2 && chmod 0775 /run/d2",
            "/run/d2",
            "/run/d2 is group- or world-writable without the sticky bit",
        ),
        (
            "mkdir -p /run/d3 && chmod 0777 /run/d3",
            "/run/d3",
            "/run/d3 is group- or world-writable without the sticky bit",
        ),
        (
            "mkdir -p /run/home-u/keys && chown u /run/home-u",
            "/run/home-u/keys",
            "/run/home-u is owned by uid U, not root",
        ),
        (
            "mkdir -p /run/home-u2 && chown u /run/home-u2",
            "/run/home-u2/new/keys",
            "/run/home-u2 is owned by uid U, not root",
        ),
        ("touch /run/plain-file", "/run/plain-file/keys", "/run/plain-file is not a directory"),
    ],
)
def test_an_unsafe_dest_dir_is_refused(fleet, setup, dest, why):
    host = fleet[NODE]
    ok(fleet, setup)
    key = make_key("k", text="s", dest_dir=dest, user="u", group="g")

    async def work(h):
        with pytest.raises(KeyUploadError) as failed:
            await upload_one(h, key, b"s", timeout=30)
        return failed.value

    failed = on_host(fleet, work)
    why = why.replace("uid U", f"uid {ids(host, 'passwd', 'u')}")
    assert str(failed) == (
        f"node host1: key k: cannot install {dest}/k: exit status 1: unsafe destDir {dest}: {why}"
    )
    assert not host.path(f"{dest}/k").exists()
    assert not host.path("/run/home-u2/new").exists()  # nothing created below an unsafe dir


def test_safe_dest_dirs_are_accepted(fleet):
    host = fleet[NODE]
    ok(
        fleet,
        "mkdir -p /run/shared /run/grouped && chmod 1777 /run/shared"
        " && chown root:g /run/grouped && chmod 0750 /run/grouped"
        " && ln -sfn /run/grouped /run/via-link",
    )
    keys = [
        make_key("a", text="a", dest_dir="/run/shared", user="u", group="g"),
        make_key("b", text="b", dest_dir="/run/grouped", user="u", group="g", permissions="0440"),
        make_key("c", text="c", dest_dir="/run/via-link"),
    ]

    async def work(h):
        return await upload_keys(
            h, keys, phase="all", require_ownership=True, base_dir=None, timeout=30
        )

    assert on_host(fleet, work).uploaded == ("a", "b", "c")
    u, g = ids(host, "passwd", "u"), ids(host, "group", "g")
    assert stat_of(host, "/run/shared/a") == ("0o600", u, g)
    assert stat_of(host, "/run/grouped/b") == ("0o440", u, g)
    assert host.path("/run/grouped/c").read_bytes() == b"c"
    assert oct(host.path("/run/grouped").stat().st_mode & 0o7777) == "0o750"  # left as it was


# -- hosts without SFTP (services.openssh.allowSFTP = false) -----------------------------------


def test_keys_reach_a_host_without_an_sftp_subsystem(fleet):
    host = fleet[NOSFTP]
    fleet.add_user(NOSFTP, "deploy", sudo=True)
    as_root = make_key("root-key", text="over exec\n", user="u", group="g", permissions="0640")
    as_deploy = make_key("sudo-key", text="escalated\n", user="u", group="g")

    async def no_sftp(h):
        conn = await h.connect()
        with pytest.raises(asyncssh.Error):
            async with conn.start_sftp_client():
                pass
        return await upload_keys(
            h, [as_root], phase="all", require_ownership=True, base_dir=None, timeout=30
        )

    async def escalated(h):
        return await upload_keys(
            h, [as_deploy], phase="all", require_ownership=True, base_dir=None, timeout=30
        )

    assert on_host(fleet, no_sftp, name=NOSFTP).uploaded == ("root-key",)
    assert on_host(fleet, escalated, name=NOSFTP, user="deploy").uploaded == ("sudo-key",)
    u, g = ids(host, "passwd", "u"), ids(host, "group", "g")
    assert host.path("/run/keys/root-key").read_bytes() == b"over exec\n"
    assert stat_of(host, "/run/keys/root-key") == ("0o640", u, g)
    assert host.path("/run/keys/sudo-key").read_bytes() == b"escalated\n"
    assert stat_of(host, "/run/keys/sudo-key") == ("0o600", u, g)
    assert leftovers(host) == []


# -- the fake host (fast; escalation path; every command recorded) ------------------------------


def _me() -> tuple[str, str]:
    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def on_fake(tmp_path: Path, work):
    """Run `work(fake, host)`: an SshHost as non-root user "deploy" with `sudo -H --`.

    The fake host runs commands as the test's own user; its `sudo` is a stand-in on PATH
    that drops `-H --` and runs the rest, so the escalation path is exercised end to end.
    """
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    sudo = bindir / "sudo"
    sudo.write_text('#!/bin/sh\n[ "$1" = -H ] && shift\n[ "$1" = -- ] && shift\nexec "$@"\n')
    sudo.chmod(0o755)

    async def main():
        env = {"PATH": f"{bindir}:{DEFAULT_ENV['PATH']}"}
        async with FakeHost.start(tmp_path / "fake", name="fake", env=env) as fake:
            target = SshTarget(node="fake", host="fake", user="deploy", escalation=SUDO)
            host = SshHost(target, SshSettings(config_files=(str(fake.ssh_config),)))
            try:
                return fake, await work(fake, host)
            finally:
                await host.close()

    return asyncio.run(main())


def test_escalated_upload_sends_content_on_stdin_only(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    poison = f"POISON-{uuid.uuid4()}"
    user, group = _me()
    dest = tmp_path / "dest" / "keys"
    key = make_key("k", text=poison, dest_dir=str(dest), user=user, group=group, permissions="0640")
    bad = make_key(
        "bad",
        text=poison,
        dest_dir=str(dest),
        user="no-such-user-here",
        upload_at=UploadAt.POST_ACTIVATION,
    )

    async def work(fake, host):
        outcome = await upload_keys(
            host,
            [key],
            phase="pre-activation",
            require_ownership=False,
            base_dir=None,
            timeout=30,
        )
        with pytest.raises(KeyUploadError) as failed:
            await upload_keys(
                host,
                [key, bad],
                phase="post-activation",
                require_ownership=True,
                base_dir=None,
                timeout=30,
            )
        return outcome, failed.value

    fake, (outcome, failed) = on_fake(tmp_path, work)
    assert outcome.uploaded == ("k",)
    assert (dest / "k").read_text() == poison
    assert oct((dest / "k").stat().st_mode & 0o777) == "0o640"
    assert "owner not found on the host: user no-such-user-here" in str(failed)
    assert not (dest / "bad").exists()
    assert [p.name for p in dest.iterdir()] == ["k"]  # no temporary file left
    # Every command went through the escalation prefix; none carried the content.
    assert fake.commands and all(c.startswith("sudo -H -- ") for c in fake.commands)
    assert [c.split()[3] for c in fake.commands] == ["sh", "sh"]  # one command per key
    assert not any(poison in c for c in fake.commands)
    assert poison not in caplog.text and poison not in str(failed)


def test_a_lost_connection_still_removes_the_temporary_file(tmp_path):
    user, group = _me()
    dest = tmp_path / "keys"
    key = make_key("k", text="s", dest_dir=str(dest), user=user, group=group)

    async def work(fake, host):
        async def cut() -> None:
            # The script is reading the content, so its temporary file exists: cut the line
            # (the fake host kills the script at once: no trap of its own runs).
            deadline = time.monotonic() + 5
            while not (dest.is_dir() and any(".waggle-" in p.name for p in dest.iterdir())):
                assert time.monotonic() < deadline, "no temporary file appeared"
                await asyncio.sleep(0.01)
            fake.drop_connections()

        with pytest.raises(KeyUploadError) as failed:
            await upload_one(Stalling(host, cut, delay=0), key, b"secret", timeout=30)
        return failed.value

    fake, failed = on_fake(tmp_path, work)
    assert str(failed) == f"node fake: key k: cannot install {dest}/k: the connection was lost"
    assert fake.connection_count == 2  # reconnected to clean up
    assert fake.commands[-1].startswith(f"sudo -H -- rm -f -- {dest}/.k.waggle-")
    assert list(dest.iterdir()) == []


# -- reading keys (local) ---------------------------------------------------------------------


def test_key_command_failure_names_its_status_never_its_output(tmp_path):
    script = "echo SECRET-OUTPUT; echo first >&2; echo 'vault: permission denied' >&2; exit 3"
    key = make_key("api", key_command=("sh", "-c", script))
    with pytest.raises(KeyUploadError) as failed:
        asyncio.run(read_key(key, base_dir=tmp_path, timeout=10))
    assert str(failed.value) == (
        "key api: keyCommand sh failed with exit status 3: vault: permission denied"
    )
    assert failed.value.exit_code == 1
    assert "SECRET-OUTPUT" not in str(failed.value)


def test_key_command_missing_timing_out_and_stdin(tmp_path):
    missing = make_key("m", key_command=(str(tmp_path / "no-such-tool"),))
    with pytest.raises(KeyUploadError) as failed:
        asyncio.run(read_key(missing, base_dir=None, timeout=10))
    assert str(failed.value) == (
        f"key m: keyCommand {tmp_path}/no-such-tool is not installed or not on PATH"
    )
    slow = make_key("s", key_command=("sleep", "30.0417"))
    with pytest.raises(KeyUploadError) as failed:
        asyncio.run(read_key(slow, base_dir=None, timeout=0.3))
    assert str(failed.value) == "key s: keyCommand sleep timed out after 0.3 s"
    left = [p for p in psutil.process_iter(["cmdline"]) if "30.0417" in (p.info["cmdline"] or [])]
    assert left == []  # the command was killed
    # stdin is /dev/null: a command reading it gets EOF at once.
    reader = make_key("r", key_command=("sh", "-c", "cat; echo done"))
    assert asyncio.run(read_key(reader, base_dir=None, timeout=10)) == b"done\n"


def test_key_file_relative_and_missing(tmp_path):
    (tmp_path / "k").write_bytes(b"\x00\xff")
    rel = make_key("k", key_file="k")
    assert asyncio.run(read_key(rel, base_dir=tmp_path, timeout=10)) == b"\x00\xff"
    gone = make_key("gone", key_file="nope/k")
    with pytest.raises(KeyUploadError) as failed:
        asyncio.run(read_key(gone, base_dir=tmp_path, timeout=10))
    assert str(failed.value) == (
        f"key gone: cannot read keyFile {tmp_path}/nope/k: No such file or directory"
    )
