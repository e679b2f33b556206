"""Closures through a binary cache: upload once per run, hosts fetch from the cache.

With `--cache URL` a node's closure is uploaded with `nix copy --to URL` (any store URL Nix
accepts: `file://`, `s3://`, `ssh-ng://`, an HTTP cache that takes uploads), signed on the
way with `--cache-key FILE` (the store's `secret-key` setting: the key never leaves its
file, and the store paths in the local store are not changed). Uploads are serialised: the
first node uploads the shared part of the fleet's closures and the next only its own paths
(`nix copy` skips what the cache has), so the shared part leaves the runner once per run.

Hosts then fetch from `--cache-substituter URL` (default: the upload URL) with
`--cache-public-key KEY`, passed to the host's `nix-store --realise` as
`extra-substituters` / `extra-trusted-public-keys` for that one command (see
runner/deploy/push.py): nothing in the host's nix.conf changes. Whatever a host cannot
fetch (the cache is down, the host does not trust the key) is pushed directly, and the
node's result says so.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from runner import nix
from runner.errors import NixError, UsageError
from runner.results import NodeResult, Stage, Status

# A cache that is down or never answers fails the upload in seconds, not at UPLOAD_TIMEOUT.
NETWORK_LIMITS = (
    *("--option", "connect-timeout", "5"),
    *("--option", "stalled-download-timeout", "30"),
)
UPLOAD_TIMEOUT = 3600.0

_KEY = re.compile(r"[A-Za-z0-9._+-]+:[A-Za-z0-9+/]+={0,2}\Z")


@dataclass(frozen=True)
class CacheSettings:
    url: str  # where closures are uploaded (`nix copy --to`)
    substituter: str | None = None  # where hosts fetch from; default: `url`
    key_file: str | None = None  # signing key (secret-key of the store)
    public_key: str | None = None  # the key hosts must trust for the cache's paths
    timeout: float = UPLOAD_TIMEOUT

    @property
    def fetch_url(self) -> str:
        return self.substituter or self.url

    @property
    def upload_url(self) -> str:
        """The store URL for `nix copy --to`, with the signing key's file when given."""
        if self.key_file is None:
            return self.url
        joiner = "&" if "?" in self.url else "?"
        return f"{self.url}{joiner}secret-key={self.key_file}"

    def substituter_options(self) -> tuple[str, ...]:
        """`nix-store` options that add the cache (and its key) for one command."""
        options: tuple[str, ...] = ("--option", "extra-substituters", self.fetch_url)
        if self.public_key:
            options += ("--option", "extra-trusted-public-keys", self.public_key)
        return options


FLAGS = ("--cache", "--cache-substituter", "--cache-key", "--cache-public-key")
CONFIG_KEYS = ("cache.url", "cache.substituter", "cache.key", "cache.public_key")


def cache_settings(
    url: str | None,
    substituter: str | None = None,
    key_file: str | None = None,
    public_key: str | None = None,
    names: tuple[str, str, str, str] = FLAGS,
) -> CacheSettings | None:
    """Checked settings from the flags (or waggle.yaml: `names`=CONFIG_KEYS); UsageError
    naming the flag or key."""
    if url is None:
        for name, value in zip(names[1:], (substituter, key_file, public_key), strict=True):
            if value is not None:
                raise UsageError(f"{name} needs {names[0]} URL")
        return None
    for name, value in ((names[0], url), (names[1], substituter)):
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise UsageError(f"{name}: {value!r} is not a store URL (no spaces)")
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise UsageError(f"{names[2]}: {key_file} is not a readable file")
        if any(c in key_file for c in "&?#") or any(c.isspace() for c in key_file):
            raise UsageError(f"{names[2]}: {key_file!r}: the path may not contain & ? # or spaces")
        key_file = str(path.resolve())
    if public_key is not None and not _KEY.match(public_key.strip()):
        raise UsageError(f"{names[3]}: {public_key!r} is not a key like name:base64")
    return CacheSettings(
        url, substituter, key_file, public_key.strip() if public_key is not None else None
    )


@dataclass(frozen=True)
class Upload:
    root: str
    paths: int  # paths this upload copied (0: the cache had them all)
    bytes: int  # bytes that left for the cache (compressed size where Nix reports it)
    seconds: float
    error: str | None = None  # the upload failed: hosts get the closure directly

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class CacheUploader:
    """One per run: uploads closures one at a time and remembers what it uploaded."""

    settings: CacheSettings
    uploads: dict[str, Upload] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def bytes_uploaded(self) -> int:
        return sum(u.bytes for u in self.uploads.values())

    @property
    def paths_uploaded(self) -> int:
        return sum(u.paths for u in self.uploads.values())

    async def upload(self, root: str) -> Upload:
        """`root`'s upload, once; after a failed one the cache is not tried again this run
        (each later node would wait for the same dead cache): those nodes push directly."""
        async with self._lock:
            known = self.uploads.get(root)
            if known is None:
                failed = next((u for u in self.uploads.values() if not u.ok), None)
                if failed is not None:
                    return Upload(root, 0, 0, 0.0, failed.error)
                known = await upload_closure(root, self.settings)
                self.uploads[root] = known
            return known


async def upload_closure(root: str, settings: CacheSettings) -> Upload:
    """`nix copy --to` the closure of `root`; what was copied, and how many bytes."""
    start = time.monotonic()
    try:
        copied = await nix.copy_to(
            settings.upload_url, [root], options=NETWORK_LIMITS, timeout=settings.timeout
        )
    except NixError as e:  # the summary: Nix's error line, or "timed out after N s"
        seconds = time.monotonic() - start
        return Upload(root, 0, 0, seconds, f"uploading to {settings.url} failed: {e.summary}")
    seconds = time.monotonic() - start
    unmeasured = [p for p in copied.paths if p not in copied.sent]
    extra = await nix.closure_size(unmeasured) if unmeasured else 0
    return Upload(root, len(copied.paths), sum(copied.sent.values()) + extra, seconds)


Fact = tuple[str, int | float | str]


async def cache_facts(
    upload: Upload, fetched: Sequence[str], sent: int, fetched_bytes: int | None = None
) -> tuple[str, tuple[Fact, ...]]:
    """What a node's push through the cache did: a line for its message, and report facts.

    `fetched`: the paths the host took from its substituters, the cache among them (none
    when the upload failed), and their NAR bytes if known (else asked of the local store);
    `sent`: how many paths were pushed directly all the same."""
    if not upload.ok or not fetched:
        fetched_bytes = 0
    elif fetched_bytes is None:
        fetched_bytes = await nix.closure_size(fetched)
    if not upload.ok:
        fallback = f"fallback: {upload.error}"
        text = f"{upload.error}: sent directly"
    elif sent:
        fallback = f"fallback: the host did not fetch {sent} path(s) from the cache"
        text = f"{sent} path(s) not fetched from the cache (down, or its key not trusted): sent directly"
    else:
        fallback, text = "used", ""
    if upload.ok and fetched:
        got = f"{len(fetched)} path(s), {fetched_bytes / 2**20:.1f} MiB from the cache"
        text = f"{got}; {text}" if text else got
    facts: tuple[Fact, ...] = (
        ("cache", fallback),
        ("cache_upload_paths", upload.paths),
        ("cache_upload_bytes", upload.bytes),
        ("paths_from_cache", len(fetched) if upload.ok else 0),
        ("bytes_from_cache", fetched_bytes if upload.ok else 0),
    )
    return text, facts


def upload_after_build(
    uploader: CacheUploader,
) -> Callable[[NodeResult], Awaitable[NodeResult]]:
    """For runs that push nothing (`waggle build --cache`): upload each built system to
    the cache (so deploys, other shards and hosts find it there); the build stage gets the
    upload's facts, and fails when the upload does (the closure was asked to be there)."""

    async def then(result: NodeResult) -> NodeResult:
        stage = result.stages[-1] if result.stages else None
        if result.out_path is None or stage is None or stage.stage is not Stage.BUILD:
            return result
        upload = await uploader.upload(result.out_path)
        facts: tuple[Fact, ...] = (
            ("cache", "used" if upload.ok else f"fallback: {upload.error}"),
            ("cache_upload_paths", upload.paths),
            ("cache_upload_bytes", upload.bytes),
        )
        changed = replace(stage, facts=(*stage.facts, *facts))
        if not upload.ok:
            changed = replace(changed, status=Status.FAILED, message=f"built; {upload.error}")
        return replace(result, stages=(*result.stages[:-1], changed))

    return then
