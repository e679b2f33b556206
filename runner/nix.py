"""One async function per local Nix command. Typed results, no CLI knowledge.

This is the one module that knows the command lines of the local Nix (evaluation, builds,
store queries, `nix path-info`, `nix-store --export`, `nix copy`) and how to read what
they print. Commands run on a host (runner/deploy, runner/scripts) are not here.
Evaluations and builds take `NixFlags` (the user's --show-trace, --impure, --nix-option,
--builders and the hive's machinesFile). Every command starts through `runner.process`
(`run`; `reading` for the export stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runner import process
from runner.errors import NixError
from runner.process import Completed, StderrCallback

FLAKE_FEATURES = ("--extra-experimental-features", "nix-command flakes")


@dataclass(frozen=True)
class NixFlags:
    show_trace: bool = False
    impure: bool = False
    options: tuple[tuple[str, str], ...] = ()
    machines_file: str | None = None
    builders: str | None = None  # --builders: replaces meta.machinesFile ("" for none)

    def common(self) -> list[str]:
        args: list[str] = []
        if self.builders is not None:
            args += ["--option", "builders", self.builders]
        elif self.machines_file:
            args += ["--option", "builders", f"@{self.machines_file}"]
        for name, value in self.options:
            args += ["--option", name, value]
        return args

    def eval_args(self, *, flake: bool) -> list[str]:
        args = self.common()
        if self.show_trace:
            args.append("--show-trace")
        if flake:
            args += FLAKE_FEATURES
            if not self.impure:
                args += ["--option", "pure-eval", "true"]
        return args

    def store_args(self) -> list[str]:
        """nix-store takes neither --impure nor --show-trace."""
        return self.common()


@dataclass(frozen=True)
class EvalOutput:
    value: Any
    completed: Completed


_NOISE = re.compile(r"^(trace: waggle-node-done |warning: unknown setting)")


def error_text(stderr: str) -> str:
    """Nix's own error message without Waggle's progress trace lines."""
    lines = [line for line in stderr.splitlines() if not _NOISE.match(line)]
    return "\n".join(lines).strip()


def first_error_line(stderr: str) -> str:
    """The most telling line of a Nix error for a one-line summary."""
    text = error_text(stderr)
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("error:"):
            rest = stripped.removeprefix("error:").strip()
            if rest:
                return rest
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "no output"


async def eval_json(
    expr: str,
    flags: NixFlags,
    *,
    flake: bool = False,
    read_write: bool = False,
    timeout: float | None = None,
    on_stderr_line: StderrCallback | None = None,
    sample_memory: bool = False,
    check: bool = True,
    stop: asyncio.Event | None = None,
) -> EvalOutput:
    """`nix-instantiate --eval --strict --json -E expr` (killed when `stop` is set)."""
    argv = ["nix-instantiate", "--eval", "--strict", "--json", "--no-gc-warning"]
    if read_write:
        argv.append("--read-write-mode")
    argv += flags.eval_args(flake=flake)
    argv += ["-E", expr]
    done = await process.run(
        argv,
        timeout=timeout,
        on_stderr_line=on_stderr_line,
        sample_memory=sample_memory,
        stop=stop,
    )
    if not done.ok:
        if not check:
            return EvalOutput(None, done)
        raise _failure("evaluation", done, timeout)
    try:
        value = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise NixError(f"nix-instantiate printed invalid JSON: {e}") from e
    return EvalOutput(value, done)


def _failure(what: str, done: Completed, timeout: float | None) -> NixError:
    if done.timed_out:
        summary = f"timed out after {timeout:g} s"
        return NixError(f"{what} {summary}", summary=summary)
    summary = first_error_line(done.stderr)
    return NixError(
        f"{what} failed: {summary}",
        detail=error_text(done.stderr),
        returncode=done.returncode,
        summary=summary,
    )


@dataclass(frozen=True)
class Realised:
    outputs: tuple[str, ...]
    completed: Completed


async def realise(
    drv_paths: Sequence[str],
    flags: NixFlags,
    *,
    gc_root: str | None = None,
    timeout: float | None = None,
    on_stderr_line: StderrCallback | None = None,
) -> Realised:
    """`nix-store --realise`, optionally registering an indirect GC root."""
    argv = ["nix-store", "--realise", *drv_paths, *flags.store_args()]
    if gc_root is not None:
        argv += ["--add-root", gc_root, "--indirect"]
    done = await process.run(argv, timeout=timeout, on_stderr_line=on_stderr_line)
    if not done.ok:
        raise _failure("build", done, timeout)
    return Realised(tuple(done.stdout.split()), done)


async def add_to_store(path: str) -> str:
    done = await process.run(["nix-store", "--add", path], timeout=120)
    if not done.ok:
        raise _failure(f"adding {path} to the Nix store", done, 120)
    return done.stdout.strip()


async def nar_hash_sri(store_path: str) -> str:
    done = await process.run(["nix-store", "--query", "--hash", store_path], timeout=60)
    if not done.ok:
        raise _failure(f"hashing {store_path}", done, 60)
    return base32_sha256_to_sri(done.stdout.strip())


_NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def base32_sha256_to_sri(text: str) -> str:
    """'sha256:<nix base32>' as printed by nix-store -q --hash, to SRI form."""
    import base64

    digest = text.removeprefix("sha256:")
    if len(digest) != 52:
        raise NixError(f"unexpected hash from nix-store: {text!r}")
    out = bytearray(32)
    for n, ch in enumerate(reversed(digest)):
        value = _NIX_BASE32.index(ch)
        bit = n * 5
        i, j = divmod(bit, 8)
        out[i] |= (value << j) & 0xFF
        if i + 1 < 32 and j > 3:
            out[i + 1] |= value >> (8 - j)
    return "sha256-" + base64.b64encode(bytes(out)).decode()


async def flake_locked_url(ref: str, flags: NixFlags, *, timeout: float = 300) -> str:
    """The locked URL of a flake (`nix flake metadata --json`)."""
    argv = ["nix", *FLAKE_FEATURES, "flake", "metadata", "--json", *flags.common(), ref]
    done = await process.run(argv, timeout=timeout)
    if not done.ok:
        raise _failure(f"reading flake {ref}", done, timeout)
    try:
        meta = json.loads(done.stdout)
        return str(meta["url"])
    except (json.JSONDecodeError, KeyError) as e:
        raise NixError(f"nix flake metadata printed no locked url for {ref}") from e


@dataclass(frozen=True)
class NixInfo:
    version: str
    flakes: bool
    extra: dict[str, str] = field(default_factory=dict)


async def version() -> str:
    """The local Nix's version (`nix-instantiate --version`: "nix-instantiate (Nix) 2.18.1")."""
    done = await process.run(["nix-instantiate", "--version"], timeout=30)
    if not done.ok:
        raise NixError("nix-instantiate --version failed", detail=done.stderr)
    return done.stdout.strip().rsplit(" ", 1)[-1]


async def info() -> NixInfo:
    nix_version = await version()
    probe = await process.run(
        ["nix-instantiate", *FLAKE_FEATURES, "--eval", "-E", "builtins ? getFlake"], timeout=30
    )
    flakes = probe.ok and probe.stdout.strip() == "true"
    return NixInfo(version=nix_version, flakes=flakes)


async def valid(paths: Sequence[str], *, timeout: float = 60) -> bool:
    """Whether every one of `paths` is valid in the local store (False when Nix cannot say)."""
    try:
        return not await invalid(paths, timeout=timeout)
    except NixError:
        return False


async def invalid(paths: Sequence[str], *, timeout: float = 120) -> frozenset[str]:
    """The paths of `paths` that are not valid in the local store
    (`nix-store --check-validity --print-invalid`); NixError when Nix cannot say."""
    argv = ["nix-store", "--check-validity", "--print-invalid", *paths]
    done = await process.run(argv, timeout=timeout)
    if not done.ok:
        raise _failure("checking the validity of store paths", done, timeout)
    return frozenset(done.stdout.split())


PATH_INFO = ("nix", "--extra-experimental-features", "nix-command", "path-info", "--json")


@dataclass(frozen=True)
class PathInfo:
    """One store path's record in `nix path-info --json`."""

    path: str
    nar_size: int | None  # None: not said
    references: tuple[str, ...] = ()
    ultimate: bool = False  # built in this store (not substituted, imported or added)
    signatures: tuple[str, ...] = ()
    ca: str | None = None  # its content address, if it has one


def path_infos_of(data: Any) -> dict[str, PathInfo]:
    """The records of `nix path-info --json`'s output, valid paths only: a list of objects
    with "path" (Nix 2.8; `"valid": false` for an invalid path), or an object keyed by path
    (later Nix; null for an invalid path)."""
    if isinstance(data, dict):
        items = list(data.items())
    else:
        items = [(i.get("path") if isinstance(i, dict) else None, i) for i in data]
    found: dict[str, PathInfo] = {}
    for path, info in items:
        if not isinstance(path, str) or not isinstance(info, dict) or info.get("valid") is False:
            continue
        size = info.get("narSize")
        found[path] = PathInfo(
            path,
            size if isinstance(size, int) else None,
            tuple(r for r in info.get("references") or () if isinstance(r, str)),
            bool(info.get("ultimate")),
            tuple(str(s) for s in info.get("signatures") or ()),
            str(info["ca"]) if info.get("ca") else None,
        )
    return found


async def path_info(
    paths: Sequence[str], *, recursive: bool = False, timeout: float = 300
) -> dict[str, PathInfo]:
    """`nix path-info --json` of `paths` (with `recursive`, of their closures), by path;
    NixError when Nix fails or prints no JSON."""
    argv = [*PATH_INFO, *(["--recursive"] if recursive else []), *paths]
    done = await process.run(argv, timeout=timeout)
    if not done.ok:
        raise _failure("querying path info", done, timeout)
    try:
        return path_infos_of(json.loads(done.stdout))
    except json.JSONDecodeError as e:
        raise NixError(f"nix path-info printed invalid JSON: {e}") from e


def export(paths: Sequence[str]) -> contextlib.AbstractAsyncContextManager[process.Reading]:
    """`nix-store --export` of `paths`, its stdout a stream to read within the block
    (`process.reading`: an exporter that has not ended when the block is left is killed)."""
    return process.reading(["nix-store", "--export", *paths])


COPY = ("nix", "--extra-experimental-features", "nix-command", "copy")

# Nix's binary cache stores print, per uploaded path:
#   copying path '/nix/store/...' (120 bytes, compressed 0.0% in 0 ms) to binary cache
_UPLOADED = re.compile(
    r"copying path '(/nix/store/[^']+)' \((\d+) bytes, compressed (-?[\d.]+)% in \d+ ms\)"
)
# Every store prints, per copied path: copying path '/nix/store/...' to 'URL'...
_COPYING = re.compile(r"copying path '(/nix/store/[^']+)' to '")


@dataclass(frozen=True)
class Copied:
    """What one `nix copy -v` copied."""

    paths: tuple[str, ...]  # in the order Nix copied them (none: the store had them all)
    sent: Mapping[str, int]  # bytes sent per path, where the store measured them
    completed: Completed


def copied_in(stderr: str) -> tuple[list[str], dict[str, int]]:
    """The paths `nix copy -v` copied, and the bytes sent for those a binary cache measured
    (its compressed size)."""
    copied: list[str] = []
    sent: dict[str, int] = {}
    for line in stderr.splitlines():
        if m := _UPLOADED.search(line):
            nar, saved = int(m.group(2)), float(m.group(3))
            sent[m.group(1)] = max(0, round(nar * (1 - saved / 100)))
        elif (m := _COPYING.search(line)) and m.group(1) not in copied:
            copied.append(m.group(1))
    return copied, sent


async def copy_to(
    url: str, paths: Sequence[str], *, options: Sequence[str] = (), timeout: float
) -> Copied:
    """`nix copy -v --to url` of the closures of `paths`, with `options` (e.g. `--option
    connect-timeout 5`); NixError when it fails (its summary: Nix's error, or the timeout)."""
    argv = [*COPY, "-v", *options, "--to", url, *paths]
    done = await process.run(argv, timeout=timeout)
    if not done.ok:
        raise _failure(f"copying to {url}", done, timeout)
    copied, sent = copied_in(done.stderr)
    return Copied(tuple(copied), sent, done)


async def closure(path: str, *, timeout: float = 300) -> list[str]:
    """`nix-store --query --requisites`: the closure, dependencies first."""
    done = await process.run(["nix-store", "--query", "--requisites", path], timeout=timeout)
    if not done.ok:
        raise _failure(f"querying the closure of {path}", done, timeout)
    return done.stdout.split()


async def closure_size(paths: Sequence[str], *, timeout: float = 300) -> int:
    """Sum of the NAR sizes of `paths` (`nix-store --query --size`)."""
    if not paths:
        return 0
    done = await process.run(["nix-store", "--query", "--size", *paths], timeout=timeout)
    if not done.ok:
        raise _failure("querying path sizes", done, timeout)
    return sum(int(n) for n in done.stdout.split())
