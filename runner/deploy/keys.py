"""deployment.keys upload: secrets sent to a host out of band, never through the Nix store.

Per key (`upload_keys`), one remote command over an exec channel (no SFTP subsystem needed;
as root and through the escalation prefix alike): `sh -c WRITE_KEY sh ARGS...`, with
runner/scripts/write-key.sh after runner/hive/nix/dest-dir-lib.sh (which chown-key.sh
shares) as the script, every value a positional argument and the content on stdin. The
script
  1. checks every directory from / down to destDir (creating missing ones, mode 0755): each
     must be owned by root and not group- or world-writable unless sticky, so that nobody
     but root can swap a name in it; otherwise the key is refused ("unsafe destDir ...");
  2. creates a new temporary file `DIR/.NAME.waggle-RANDOM` with noclobber (O_EXCL: an
     existing name, symlink or not, is refused), mode 0600, and writes the content to it;
  3. sets owner and mode on the open file (/proc/self/fd/N: the file itself, whatever its
     name points to by then), never by path;
  4. renames it over the destination (`mv -f -T`: atomic, in the same directory), after
     checking that the name still is the file it wrote.
Any failure removes the temporary file (the script itself; Waggle again when the
connection was lost). The content never appears in an argv, a log line, an error message
or the Nix store.

Pre-activation keys may belong to users that the new configuration creates: they are
uploaded with `require_ownership=False`, left root-owned when the owner does not exist yet,
and chowned during activation by the node's `waggle-chown-keys` activation snippet (as
Colmena's `colmena-chown-keys`; runner/hive/nix/chown-key.sh, which never follows a
symlink either). Post-activation keys and `upload-keys` require the owner.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runner import process
from runner.errors import ToolMissingError, WaggleError
from runner.hive.model import Key, UploadAt
from runner.hosts import Host
from runner.scripts import script

log = logging.getLogger(__name__)

Phase = Literal["pre-activation", "post-activation", "all"]

_DEFERRED = "waggle: owner-deferred"  # printed by write-key.sh
# sh -c WRITE_KEY_SCRIPT sh DIR NAME TMP USER GROUP MODE STRICT; stdin: the content
WRITE_KEY_SCRIPT = script("nix/dest-dir-lib.sh", package="runner.hive") + script("write-key.sh")


class KeyUploadError(WaggleError):
    """A key could not be read or uploaded; the node fails (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class KeysOutcome:
    phase: Phase
    uploaded: tuple[str, ...]  # key names, in upload order
    seconds: float
    owner_deferred: tuple[str, ...] = ()  # uploaded root-owned; activation chowns them

    @property
    def message(self) -> str:
        if not self.uploaded:
            return "no keys" if self.phase == "all" else f"no {self.phase} keys"
        count = len(self.uploaded)
        text = f"{count} key{'' if count == 1 else 's'} uploaded"
        if self.owner_deferred:
            text += f" ({', '.join(self.owner_deferred)}: owner set during activation)"
        return text


async def read_key(key: Key, *, base_dir: Path | None, timeout: float) -> bytes:
    """The key's content: its text, its keyFile's bytes, or its keyCommand's stdout."""
    source = key.source
    if source.text is not None:
        return source.text.encode()
    if source.key_file is not None:
        path = Path(source.key_file).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise KeyUploadError(f"key {key.name}: cannot read keyFile {path}: {reason}") from e
    assert source.key_command is not None
    return await _run_key_command(key, source.key_command, timeout)


async def _run_key_command(key: Key, argv: Sequence[str], timeout: float) -> bytes:
    # `process.reading` rather than `process.run`: stdout must stay bytes (binary keys).
    what = f"key {key.name}: keyCommand {argv[0]}"
    try:
        async with process.reading(argv) as proc:

            async def collect() -> tuple[bytes, int, str]:
                out = await proc.stdout.read()
                code, err = await proc.wait()
                return out, code, err

            try:
                out, code, err = await asyncio.wait_for(collect(), timeout)
            except TimeoutError:
                raise KeyUploadError(f"{what} timed out after {timeout:g} s") from None
    except KeyUploadError:
        raise
    except ToolMissingError as e:
        raise KeyUploadError(f"{what} is not installed or not on PATH") from e
    except WaggleError as e:
        raise KeyUploadError(f"{what}: {e.message}") from e
    except OSError as e:
        raise KeyUploadError(f"{what} cannot be started: {e.strerror or e}") from e
    if code != 0:
        lines = err.strip().splitlines()
        status = f"exit status {code}" if code > 0 else f"signal {-code}"
        tail = f": {lines[-1].strip()}" if lines else ""
        raise KeyUploadError(f"{what} failed with {status}{tail}")
    return out


async def _upload(
    host: Host, key: Key, content: bytes, *, require_ownership: bool, timeout: float
) -> bool:
    """Put `content` at the key's path on `host` with its owner and mode, atomically.

    True when the owner did not exist and was left for activation."""
    where = f"node {host.name}: key {key.name}"
    directory, name = posixpath.split(key.path)
    tmp = f".{name}.waggle-{secrets.token_hex(8)}"
    log.debug(
        "%s: uploading to %s (%s:%s, %s)", where, key.path, key.user, key.group, key.permissions
    )
    strict = "1" if require_ownership else "0"
    args = [directory or "/", name, tmp, key.user, key.group, key.permissions, strict]
    argv = ["sh", "-c", WRITE_KEY_SCRIPT, "sh", *args]
    step = f"cannot install {key.path}"
    try:
        done = await host.run(argv, input_data=content, timeout=timeout, privileged=True)
    except WaggleError as e:
        left = await _remove(host, f"{directory}/{tmp}", timeout)
        raise KeyUploadError(f"{where}: {step}: {e.message}{left}") from e
    if not done.ok:
        # The script removes its temporary file itself unless it never finished.
        left = await _remove(host, f"{directory}/{tmp}", timeout) if done.returncode is None else ""
        raise KeyUploadError(f"{where}: {step}: {done.describe()}{left}")
    deferred = _DEFERRED in done.stdout
    if deferred:
        log.info(
            "%s: user %s and/or group %s do not exist yet; the key stays owned by root"
            " until activation sets its owner",
            where,
            key.user,
            key.group,
        )
    return deferred


async def _remove(host: Host, path: str, timeout: float) -> str:
    """Remove `path` on the host; "" or a note to append to an error saying it may remain."""
    try:
        done = await host.run(["rm", "-f", "--", path], timeout=timeout, privileged=True)
    except WaggleError as e:
        return f" (could not remove {path}: {e.message})"
    return "" if done.ok else f" (could not remove {path}: {done.describe()})"


async def upload_keys(
    host: Host,
    keys: Sequence[Key],
    *,
    phase: Phase,
    require_ownership: bool,
    base_dir: Path | None,
    timeout: float,
) -> KeysOutcome:
    """Upload the keys meant for `phase` ("all": every key, for `upload-keys`), in order."""
    start = time.monotonic()
    wanted = [k for k in keys if phase == "all" or k.upload_at is UploadAt(phase)]
    uploaded: list[str] = []
    deferred: list[str] = []
    for key in wanted:
        try:
            content = await read_key(key, base_dir=base_dir, timeout=timeout)
        except KeyUploadError as e:
            raise KeyUploadError(f"node {host.name}: {e.message}") from e
        if await _upload(host, key, content, require_ownership=require_ownership, timeout=timeout):
            deferred.append(key.name)
        uploaded.append(key.name)
    return KeysOutcome(phase, tuple(uploaded), time.monotonic() - start, tuple(deferred))
