"""`waggle.yaml`: the settings of `waggle ci`, checked before anything runs.

The file is optional. Without `--ci-config`, `load_config` looks for `waggle.yaml` in the
start directory and its parents, stopping at the repository root (the first directory holding
`.git`). Every key is optional; an unknown key or a value of the wrong type is an error that
names the key and the file (exit 2). Relative paths in the file are relative to the file's
directory. Command-line flags override the file (`merge`). On a pull request `waggle ci`
reads the file from the base commit's tree instead (`runner.gitops.trust.pr_config`).
`waggle watch` applies the `rollout:` of the file in each deployed commit's tree.

    hive: ./hive.nix            # hive.nix, a directory, a flake.nix or a flake reference
    on: "@web,db-*"             # restrict every run to these nodes (waggle --on syntax)
    deploy_branches: [main]     # pushes to these branches (globs) deploy; default: the
                                # repository's default branch
    deploy_drifted: true        # on deploy, also deploy nodes whose hosts drifted
    ignore: ["docs/**", "*.md"] # changed paths that never make a node affected
    cache_dir: .waggle-cache
    dry_activate_on_pr: false   # plan: also run dry-activate on the changed nodes
    comment: false              # plan: post/update one sticky PR/MR comment
    comment_forks: false        # ... even on PRs from forks (explicit opt-in)
    token_env: GITHUB_TOKEN     # the environment variable holding the forge API token
    junit: waggle-junit.xml
    report_md: waggle-report.md
    outputs_dotenv: waggle.env  # GitLab: write the outputs as a dotenv artifact
    parallel: 10
    eval_node_limit: auto       # auto, or a number (0: all nodes in one evaluator)
    rollout:                    # deploy: as --waves, --max-failures, --confirm-timeout and
      waves: [1, 10%, 100%]     #   --no-health-checks (a list or "1,10%,100%")
      max_failures: 0           # N or P% of a wave
      confirm_timeout: 30       # seconds
      health_checks: true
    cache:                      # deploy: closures through a binary cache, as --cache ...
      url: s3://fleet-cache?region=eu-west-1   # where Waggle uploads (nix copy --to)
      substituter: https://cache.example.org   # where hosts fetch from (default: url)
      key: /run/secrets/cache.sec              # signing key file (relative: to this file)
      public_key: "cache.example.org-1:..."    # the key hosts trust for it
                                # (`cache: URL` alone is short for `cache: {url: URL}`)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from runner.deploy import waves as rollout_waves
from runner.errors import UsageError

if TYPE_CHECKING:
    from runner.deploy.pipeline import DeploySettings

CONFIG_NAME = "waggle.yaml"


class ConfigError(UsageError):
    """`waggle.yaml` cannot be read or holds a bad key or value (exit 2)."""


@dataclass(frozen=True)
class RolloutConfig:
    """`rollout:`, how `waggle ci` and `waggle watch` deploy; None: not set (the flag or its
    default applies)."""

    waves: tuple[str, ...] | None = None  # as --waves: "1", "10%", "100%"
    max_failures: str | None = None  # as --max-failures: "N" or "P%"
    confirm_timeout: float | None = None  # as --confirm-timeout, seconds
    health_checks: bool | None = None  # false: as --no-health-checks

    def over(
        self, deploy: DeploySettings, *, max_failures_given: bool, confirm_timeout_given: bool
    ) -> DeploySettings:
        """`deploy` (the flags' settings) with these where no flag was given (no --waves:
        `waves` is empty; --no-health-checks can only turn checks off)."""
        changes: dict[str, Any] = {}
        if self.waves is not None and not deploy.waves:
            changes["waves"] = self.waves
        if self.max_failures is not None and not max_failures_given:
            changes["max_failures"] = self.max_failures
        if self.confirm_timeout is not None and not confirm_timeout_given:
            changes["confirm_timeout"] = self.confirm_timeout
        if self.health_checks is not None and deploy.health_checks:
            changes["health_checks"] = self.health_checks
        return dataclasses.replace(deploy, **changes)


@dataclass(frozen=True)
class CacheConfig:
    """`cache:`, the binary cache deploys go through (as --cache, --cache-substituter,
    --cache-key, --cache-public-key); None: not set."""

    url: str | None = None
    substituter: str | None = None
    key: Path | None = None
    public_key: str | None = None


@dataclass(frozen=True)
class CiConfig:
    """The settings of `waggle ci`; every field has a default, so `CiConfig()` is valid."""

    hive: str | None = None
    on: str | None = None
    deploy_branches: tuple[str, ...] | None = None  # None: the default branch
    deploy_drifted: bool = True
    ignore: tuple[str, ...] = ()
    cache_dir: Path | None = None
    dry_activate_on_pr: bool = False
    comment: bool = False
    comment_forks: bool = False
    token_env: str | None = None
    junit: Path | None = None
    report_md: Path | None = None
    outputs_dotenv: Path | None = None
    parallel: int | None = None
    eval_node_limit: str | None = None  # "auto" or a number as text, like --eval-node-limit
    rollout: RolloutConfig = RolloutConfig()
    cache: CacheConfig = CacheConfig()
    source: Path | None = None  # the file these settings came from, if any


# -- value checks: (value, base directory for relative paths) -> typed value ----------------


class _BadValueError(Exception):
    """A value of the wrong type or range; the message says what was expected."""


class _NestedError(_BadValueError):
    """A bad `key` inside a section (e.g. rollout.waves), or an unknown one (`known` set)."""

    def __init__(self, key: str, value: object, message: str, known: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.key, self.value, self.known = key, value, known


def _str(value: object, _base: Path | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadValueError("must be a non-empty string")
    return value


def _str_list(value: object, _base: Path | None) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) and v.strip() for v in value
    ):
        raise _BadValueError("must be a list of non-empty strings")
    return tuple(value)


def _bool(value: object, _base: Path | None) -> bool:
    if not isinstance(value, bool):
        raise _BadValueError("must be true or false")
    return value


def _path(value: object, base: Path | None) -> Path:
    if isinstance(value, Path):
        path = value
    elif isinstance(value, str) and value.strip():
        path = Path(value).expanduser()
    else:
        raise _BadValueError("must be a path (a non-empty string)")
    return base / path if base is not None and not path.is_absolute() else path


def _hive(value: object, base: Path | None) -> str:
    text = str(value) if isinstance(value, Path) else _str(value, base)
    if base is None or ":" in text or "#" in text:  # a flake reference stays as written
        return text
    return str(_path(text, base))


def _count(value: object, _base: Path | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadValueError("must be a whole number, 0 or more")
    return value


def _node_limit(value: object, _base: Path | None) -> str:
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        return str(int(value))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    raise _BadValueError("must be auto or a whole number, 0 or more")


def _waves(value: object, _base: Path | None) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(
        isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value
    ):
        raise _BadValueError('must be a list of node counts and shares, e.g. [1, "10%", "100%"]')
    entries = tuple(str(v).strip() for v in value)
    try:
        rollout_waves.parse_waves(entries)
    except rollout_waves.SpecError as e:
        raise _BadValueError(str(e)) from None
    return entries


def _budget(value: object, _base: Path | None) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _BadValueError("must be a number of failed nodes N or a share P% of the wave")
    try:
        return rollout_waves.parse_budget(str(value)).text
    except rollout_waves.SpecError as e:
        raise _BadValueError(str(e)) from None


def _seconds(value: object, _base: Path | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _BadValueError("must be a number of seconds, more than 0")
    return float(value)


_ROLLOUT_KEYS: dict[str, Callable[[object, Path | None], Any]] = {
    "waves": _waves,
    "max_failures": _budget,
    "confirm_timeout": _seconds,
    "health_checks": _bool,
}


def _section(
    value: dict[Any, object],
    base: Path | None,
    keys: Mapping[str, Callable[[object, Path | None], Any]],
    name: str,
) -> dict[str, Any]:
    """The checked values of a section's keys; an unknown or bad one names `name.key`."""
    changes: dict[str, Any] = {}
    for key, item in value.items():
        check = keys.get(str(key))
        if check is None:
            raise _NestedError(str(key), item, "unknown", tuple(f"{name}.{k}" for k in keys))
        try:
            changes[str(key)] = check(item, base)
        except _BadValueError as e:
            raise _NestedError(str(key), item, str(e)) from None
    return changes


def _rollout(value: object, base: Path | None) -> RolloutConfig:
    if value is None:
        return RolloutConfig()
    if not isinstance(value, dict):
        raise _BadValueError("must be a mapping (waves, max_failures, confirm_timeout, ...)")
    return RolloutConfig(**_section(value, base, _ROLLOUT_KEYS, "rollout"))


_CACHE_KEYS: dict[str, Callable[[object, Path | None], Any]] = {
    "url": _str,
    "substituter": _str,
    "key": _path,
    "public_key": _str,
}


def _cache(value: object, base: Path | None) -> CacheConfig:
    if value is None:
        return CacheConfig()
    if isinstance(value, str):
        return CacheConfig(url=_str(value, base))
    if not isinstance(value, dict):
        raise _BadValueError("must be a store URL or a mapping (url, substituter, key, ...)")
    config = CacheConfig(**_section(value, base, _CACHE_KEYS, "cache"))
    if config.url is None:
        raise _BadValueError("needs url (the store Waggle uploads to)")
    return config


_KEYS: dict[str, Callable[[object, Path | None], Any]] = {
    "hive": _hive,
    "on": _str,
    "deploy_branches": _str_list,
    "deploy_drifted": _bool,
    "ignore": _str_list,
    "cache_dir": _path,
    "dry_activate_on_pr": _bool,
    "comment": _bool,
    "comment_forks": _bool,
    "token_env": _str,
    "junit": _path,
    "report_md": _path,
    "outputs_dotenv": _path,
    "parallel": _count,
    "eval_node_limit": _node_limit,
    "rollout": _rollout,
    "cache": _cache,
}
KNOWN_KEYS = tuple(_KEYS)


def find_config(start: Path, tree: Path | None = None) -> Path | None:
    """`waggle.yaml` in `start` or a parent, up to the repository root (holding `.git`), or
    up to `tree`, a commit's tree checked out without `.git` (the search never leaves it)."""
    here = start.resolve()
    top = tree.resolve() if tree is not None else None
    for directory in (here, *here.parents):
        candidate = directory / CONFIG_NAME
        if candidate.is_file():
            return candidate
        if (directory / ".git").exists() or directory == top:
            return None
    return None


def load_config(
    path: Path | None, *, search_from: Path, tree: Path | None = None, at: str = ""
) -> CiConfig:
    """The settings in `path` (which must exist), or in the `waggle.yaml` found from
    `search_from` (see `find_config`, `tree` too); defaults if there is none. Errors name
    the file, relative to `tree` if given, followed by `at` (e.g. "in commit 1a2b3c")."""
    if path is None:
        path = find_config(search_from, tree)
        if path is None:
            return CiConfig()
    elif not path.is_file():
        raise ConfigError(f"{path}: no such settings file")
    where = str(path)
    if tree is not None and path.is_relative_to(tree.resolve()):
        where = path.relative_to(tree.resolve()).as_posix()
    where = f"{where} {at}" if at else where
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read: {e}") from None
    return parse_config(text, source=path, where=where)


def parse_config(text: str, *, source: Path, where: str | None = None) -> CiConfig:
    """The settings in `text`, the content of the file `source` (relative paths are
    relative to its directory); errors name `where` (default: the file)."""
    where = where or str(source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
    if data is None:
        return CiConfig(source=source)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of settings, not {type(data).__name__}")
    return _apply(CiConfig(source=source), data, base=source.parent, where=where)


def merge(config: CiConfig, overrides: Mapping[str, object]) -> CiConfig:
    """`config` with each non-None value of `overrides` (flags, keyed like the file, `-` or
    `_`) in place of the file's; values are checked as the file's are. Relative paths in
    flags stay relative to the working directory."""
    given = {k.replace("-", "_"): v for k, v in overrides.items() if v is not None}
    return _apply(config, given, base=None, where="command line")


def _apply(
    config: CiConfig, data: Mapping[Any, object], *, base: Path | None, where: str
) -> CiConfig:
    changes: dict[str, Any] = {}
    for key, value in data.items():
        # YAML 1.1 reads a bare `on:` key as the boolean true (as in GitHub workflows)
        name = "on" if key is True else str(key)
        check = _KEYS.get(name)
        if check is None:
            known = ", ".join(KNOWN_KEYS)
            raise ConfigError(f"{where}: unknown setting {name!r} (known: {known})")
        try:
            changes[name] = check(value, base)
        except _BadValueError as e:
            if isinstance(e, _NestedError):  # a key of a section: rollout.waves
                name, value = f"{name}.{e.key}", e.value
                if e.known:
                    known = ", ".join(e.known)
                    raise ConfigError(
                        f"{where}: unknown setting {name!r} (known: {known})"
                    ) from None
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ConfigError(f"{where}: setting {name!r} {e} (got {shown})") from None
    return dataclasses.replace(config, **changes)
