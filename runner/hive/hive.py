"""The hive as Waggle queries it: node names, meta, deployment settings,
per-queue evaluation expressions and introspection.

All Nix expressions are built here, from the package's own Nix files
(`runner/hive/nix`), and run through `runner.nix`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runner import nix
from runner.errors import HiveError, NixError
from runner.hive.discovery import HiveKind, HiveSource
from runner.hive.model import MetaConfig, NodeConfig
from runner.nix import NixFlags

NIX_DIR = Path(__file__).parent / "nix"
QUERY_TIMEOUT = 600.0


def nix_string(text: str) -> str:
    """A Nix double-quoted string literal holding exactly `text`."""
    out = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("${", "\\${")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{out}"'


def nix_json(value: Any) -> str:
    """A Nix expression for a JSON-representable value (via builtins.fromJSON)."""
    return f"(builtins.fromJSON {nix_string(json.dumps(value))})"


def _validated(name: str, data: Any) -> NodeConfig | HiveError:
    try:
        return NodeConfig.from_json(name, data)
    except HiveError as e:
        return e


@dataclass(frozen=True)
class Hive:
    source: HiveSource
    flags: NixFlags
    # For flakes: the locked flake URL and Waggle's Nix files as a locked store path.
    locked_url: str | None = None
    nix_store_dir: str | None = None
    nix_nar_hash: str | None = None
    # Each node's deployment settings (or why they do not evaluate), asked once per Hive:
    # a run's selection, host access and buildOnTarget read the same answers.
    _settings: dict[str, NodeConfig | HiveError] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def is_flake(self) -> bool:
        return self.source.kind is HiveKind.FLAKE

    async def prepared(self) -> Hive:
        """Resolve what a flake needs before queries (locked URL, Waggle's Nix files)."""
        if not self.is_flake or self.locked_url is not None:
            return self
        try:
            url = await nix.flake_locked_url(self.source.ref, self.flags)
        except NixError as e:
            raise HiveError(f"flake {self.source.ref}: {e.summary}", detail=e.detail) from e
        store_dir = await nix.add_to_store(str(NIX_DIR))
        nar_hash = await nix.nar_hash_sri(store_dir)
        return replace(self, locked_url=url, nix_store_dir=store_dir, nix_nar_hash=nar_hash)

    def with_flags(self, flags: NixFlags) -> Hive:
        return replace(self, flags=flags)

    # -- expressions ------------------------------------------------------
    def _query_prefix(self) -> str:
        if not self.is_flake:
            hive = f"import {nix_string(str(NIX_DIR / 'eval.nix'))} {{ rawHive = import {nix_string(self.source.ref)}; }}"
            return f"let q = import {nix_string(str(NIX_DIR / 'query.nix'))} ({hive}); in q"
        assert self.locked_url and self.nix_store_dir and self.nix_nar_hash, "call prepared() first"
        w = (
            f'(builtins.fetchTree {{ type = "path"; path = {nix_string(self.nix_store_dir)}; '
            f"narHash = {nix_string(self.nix_nar_hash)}; }}).outPath"
        )
        ref = nix_string(self.source.ref)
        return (
            f"let w = {w}; o = (builtins.getFlake {nix_string(self.locked_url)}).outputs;"
            " hive = if o ? colmenaHive then o.colmenaHive"
            ' else if o ? colmena then import (w + "/eval.nix") { rawHive = o.colmena; hermetic = true; }'
            ' else if o ? nixosConfigurations then import (w + "/nixos-configurations.nix") o.nixosConfigurations'
            f' else throw ("waggle: flake " + {ref} + " has no colmenaHive, colmena or nixosConfigurations output");'
            ' q = import (w + "/query.nix") hive; in q'
        )

    def expr(self, query: str) -> str:
        return f"({self._query_prefix()}).{query}"

    def queue_expr(self, names: Sequence[str]) -> str:
        """Evaluate `names` one after another, a trace line per finished node."""
        return self.expr(f"evalQueue {nix_json(list(names))}")

    def one_expr(self, name: str) -> str:
        return self.expr(f"evalOne {nix_string(name)}")

    # -- queries ------------------------------------------------------------
    async def _eval(self, query: str, *, what: str) -> Any:
        try:
            out = await nix.eval_json(
                self.expr(query), self.flags, flake=self.is_flake, timeout=QUERY_TIMEOUT
            )
        except NixError as e:
            raise HiveError(
                f"{self.source.describe()}: {what}: {e.summary}",
                detail=e.detail,
            ) from e
        return out.value

    async def node_names(self) -> list[str]:
        names = sorted(str(n) for n in await self._eval("nodeNames", what="listing nodes"))
        for name in names:
            if not name.strip() or "/" in name:
                raise HiveError(
                    f"{self.source.describe()}: node name {name!r} is empty or has a '/'"
                )
        return names

    async def meta(self) -> MetaConfig:
        return MetaConfig.from_json(await self._eval("metaConfig", what="reading meta"))

    async def deployment(self, names: Sequence[str]) -> dict[str, NodeConfig]:
        """Validated deployment settings; the first failing node (in `names` order) is
        named in the error."""
        each = await self.deployment_each(names)
        for config in each.values():
            if isinstance(config, HiveError):
                raise config
        return {n: c for n, c in each.items() if isinstance(c, NodeConfig)}

    async def deployment_each(self, names: Sequence[str]) -> dict[str, NodeConfig | HiveError]:
        """Each node's validated deployment settings, or the error naming it. Answers are
        kept in this Hive; see `_deployment_json` for what asking costs."""
        missing = list(dict.fromkeys(n for n in names if n not in self._settings))
        if missing:
            self._settings.update(await self._deployment_json(missing))
        return {n: self._settings[n] for n in names}

    async def _deployment_json(self, names: list[str]) -> dict[str, NodeConfig | HiveError]:
        """One query for all (`deploymentEach`: a node whose settings throw is marked), then
        each marked node alone for its message (1 + k queries for k broken nodes); when an
        error tryEval cannot catch ends the query, halves until the broken nodes are alone
        (about 2 log2 n queries for each)."""
        try:
            data = await self._settings_query("deploymentEach", names)
        except NixError as e:
            if len(names) == 1:
                return {names[0]: HiveError(f"node {names[0]}: {e.summary}", detail=e.detail)}
            mid = len(names) // 2
            first = await self._deployment_json(names[:mid])
            return {**first, **await self._deployment_json(names[mid:])}
        found: dict[str, NodeConfig | HiveError] = {}
        for n in names:
            if "ok" in data[n]:
                found[n] = _validated(n, data[n]["ok"])
                continue
            try:  # alone and without tryEval, for Nix's own message
                alone = await self._settings_query("deployment", [n])
            except NixError as e:
                found[n] = HiveError(f"node {n}: {e.summary}", detail=e.detail)
            else:
                found[n] = _validated(n, alone[n])
        return found

    async def _settings_query(self, query: str, names: list[str]) -> Any:
        done = await nix.eval_json(
            self.expr(f"{query} {nix_json(names)}"),
            self.flags,
            flake=self.is_flake,
            timeout=QUERY_TIMEOUT,
        )
        return done.value

    async def introspect(self, function_expr: str) -> Any:
        return await self._eval(f"introspect ({function_expr})", what="eval")
