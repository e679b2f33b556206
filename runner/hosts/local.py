"""The machine Waggle runs on, as a host (for `apply-local`)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from runner import process
from runner.hosts import HostError, LineCallback, RemoteResult
from runner.scripts import write_file_argv


@dataclass
class LocalHost:
    name: str
    escalation: tuple[str, ...] = ()  # e.g. ("sudo", "-H", "--") with --sudo

    def _argv(self, argv: Sequence[str], privileged: bool) -> list[str]:
        return [*(self.escalation if privileged else ()), *argv]

    async def run(
        self,
        argv: Sequence[str],
        *,
        input_data: bytes | None = None,
        timeout: float | None = None,
        privileged: bool = True,
        on_line: LineCallback | None = None,
    ) -> RemoteResult:
        done = await process.run(
            self._argv(argv, privileged), input_data=input_data, timeout=timeout
        )
        if on_line is not None:
            for line in done.stdout.splitlines():
                on_line(line)
        return RemoteResult(
            tuple(argv),
            None if done.timed_out else done.returncode,
            done.stdout,
            done.stderr,
            done.duration,
            timed_out=done.timed_out,
        )

    async def run_fed(
        self,
        argv: Sequence[str],
        chunks: AsyncIterator[bytes],
        *,
        timeout: float | None = None,
        privileged: bool = True,
    ) -> RemoteResult:
        data = b"".join([c async for c in chunks])
        return await self.run(argv, input_data=data, timeout=timeout, privileged=privileged)

    async def write_file(
        self, path: str, data: bytes, *, mode: int, timeout: float | None = None
    ) -> None:
        """Write `path` with `mode`: a new temporary file next to it, renamed over it.

        The temporary file is created with O_EXCL|O_NOFOLLOW and its mode set on the open
        file, so a symlink at either name is never followed. Through escalation (--sudo)
        the same is done by runner/scripts/write-file.sh, the content on stdin.
        """
        if self.escalation:
            done = await self.run(write_file_argv(path, mode), input_data=data, timeout=timeout)
            if not done.ok:
                raise HostError(f"writing {path}: {done.describe()}")
            return
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.waggle-{secrets.token_hex(8)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as e:
            raise HostError(f"writing {path}: {e.strerror}") from e
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # ours: created above with O_EXCL
            raise HostError(f"writing {path}: {e.strerror}") from e

    async def close(self) -> None:
        return None
