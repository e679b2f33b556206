"""The machine Waggle runs on, as a host (for `apply-local`)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from runner import process
from runner.hosts import HostError, LineCallback, RemoteResult


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
        if self.escalation:
            script = f'umask 077; cat > "$1" && chmod {mode:o} "$1"'
            done = await self.run(
                ["sh", "-c", script, "sh", path], input_data=data, timeout=timeout
            )
            if not done.ok:
                raise HostError(f"writing {path}: {done.describe()}")
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.write(fd, data)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        except OSError as e:
            raise HostError(f"writing {path}: {e.strerror}") from e

    async def close(self) -> None:
        return None
