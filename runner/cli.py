"""The command line: argparse to typed settings, and errors to exit codes.

This is the only module that knows about argparse and the only place that
maps exceptions to exit codes (see EXIT CODES in `waggle --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from typing_extensions import override

from runner import __version__, nix
from runner.build import BuildSettings, evaluate_and_build
from runner.errors import (
    EXIT_INTERRUPTED,
    EXIT_NODES_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    HiveError,
    UsageError,
    WaggleError,
)
from runner.evaluate import EvalSettings, MemoryBudget, parse_size
from runner.hive.discovery import locate
from runner.hive.hive import Hive, nix_string
from runner.hive.model import NodeConfig
from runner.hive.selection import Selector, parse_on
from runner.results import NodeResult

log = logging.getLogger("waggle")

EPILOG = """\
exit codes:
  0    everything asked for succeeded (or nothing needed doing)
  1    one or more nodes failed; the others still ran
  2    usage or hive error before any node ran (bad flag, bad --on,
       hive not found or does not evaluate, nix missing)
  130  interrupted
"""

GOALS = ("build", "push", "switch", "boot", "test", "dry-activate", "upload-keys")
DEPLOYING_GOALS = frozenset(GOALS) - {"build"}


class _Parser(argparse.ArgumentParser):
    @override
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        self.exit(
            EXIT_USAGE, f"waggle: error: {message} (see waggle {self.prog.split()[-1]} --help)\n"
        )


def _global_options(p: argparse.ArgumentParser) -> None:
    # SUPPRESS so a value given before the subcommand is not reset by the
    # subcommand's own default; defaults are applied in `_opt`.
    s = argparse.SUPPRESS
    p.add_argument(
        "-f",
        "--config",
        metavar="HIVE",
        default=s,
        help="hive.nix, a directory, a flake.nix or a flake reference "
        "(default: search upward for flake.nix, then hive.nix)",
    )
    p.add_argument("--show-trace", action="store_true", default=s, help="pass --show-trace to Nix")
    p.add_argument("--impure", action="store_true", default=s, help="allow impure flake evaluation")
    p.add_argument(
        "--nix-option",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        default=s,
        help="pass --option NAME VALUE to local Nix commands (repeatable)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", default=s, help="more log lines on stderr"
    )
    p.add_argument("--debug", action="store_true", default=s, help="show tracebacks of errors")


def _opt(ns: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(ns, name, default)


def _selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--on",
        metavar="NODES",
        help="comma-separated node names, globs and @tag globs, e.g. 'web-*,@db'",
    )


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-node-limit",
        default="auto",
        metavar="auto|N|0",
        help="nodes per evaluator process: auto (measured), N, or 0 for all in one",
    )
    p.add_argument(
        "--eval-memory",
        metavar="SIZE",
        help="memory budget for evaluation, e.g. 8G (default: available memory, "
        "capped by the cgroup limit, minus 1 GiB)",
    )
    p.add_argument(
        "--eval-jobs",
        type=int,
        default=0,
        metavar="N",
        help="evaluator processes at once (default: one per core, within the budget)",
    )
    p.add_argument(
        "--eval-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="timeout of one evaluator process (default 1800)",
    )


def _build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-result",
        action="store_true",
        help="keep GC roots of built systems in <hive dir>/.gcroots/node-<name>",
    )
    p.add_argument(
        "--build-jobs",
        type=int,
        default=2,
        metavar="N",
        help="nix-store --realise processes at once (default 2)",
    )
    p.add_argument(
        "--build-timeout",
        type=float,
        default=3 * 3600.0,
        metavar="SECONDS",
        help="timeout of one node's build (default 10800)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="waggle",
        description="Deploy NixOS fleets from CI: Colmena-compatible hives, evaluated in "
        "RAM-sized chunks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"waggle {__version__}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_text: str, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            aliases=list(aliases),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_options(p)
        return p

    p = add("build", "evaluate and build the selected nodes; print each node's system path")
    _selection_options(p)
    _eval_options(p)
    _build_options(p)

    p = add("apply", "evaluate, build and deploy the selected nodes")
    p.add_argument(
        "goal",
        nargs="?",
        choices=GOALS,
        default="switch",
        help="build, push, switch (default), boot, test, dry-activate, upload-keys",
    )
    _selection_options(p)
    _eval_options(p)
    _build_options(p)

    p = add(
        "eval",
        "evaluate an expression '{ nodes, pkgs, lib }: ...' against the hive; JSON on stdout",
        aliases=["introspect"],
    )
    p.add_argument("file", nargs="?", help="a .nix file holding the function")
    p.add_argument("-E", "--expr", dest="expression", help="the function as a string")

    p = add("nodes", "list the hive's nodes with target, tags and options")
    _selection_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    add("nix-info", "show the Nix version, flake support and the evaluation memory budget")
    return parser


# -- settings from arguments -----------------------------------------------------


def _eval_settings(ns: argparse.Namespace) -> EvalSettings:
    text = str(ns.eval_node_limit).strip()
    limit: int | None
    if text == "auto":
        limit = None
    else:
        try:
            limit = int(text)
        except ValueError:
            raise UsageError(f"--eval-node-limit {text!r}: must be auto, a number, or 0") from None
        if limit < 0:
            raise UsageError(f"--eval-node-limit {text!r}: must not be negative")
    memory = None
    if ns.eval_memory is not None:
        try:
            memory = parse_size(ns.eval_memory)
        except ValueError as e:
            raise UsageError(f"--eval-memory: {e}") from None
    if ns.eval_jobs < 0:
        raise UsageError("--eval-jobs must not be negative")
    if ns.eval_timeout <= 0:
        raise UsageError("--eval-timeout must be more than zero")
    return EvalSettings(node_limit=limit, memory=memory, jobs=ns.eval_jobs, timeout=ns.eval_timeout)


def _nix_flags(ns: argparse.Namespace) -> nix.NixFlags:
    options = tuple((n, v) for n, v in (_opt(ns, "nix_option") or []))
    return nix.NixFlags(
        show_trace=bool(_opt(ns, "show_trace", False)),
        impure=bool(_opt(ns, "impure", False)),
        options=options,
    )


@dataclass(frozen=True)
class Selection:
    names: list[str]
    configs: dict[str, NodeConfig]


async def _open_hive(ns: argparse.Namespace) -> Hive:
    source = locate(_opt(ns, "config"), Path.cwd())
    log.info("hive: %s", source.describe())
    return await Hive(source, _nix_flags(ns)).prepared()


async def _select(hive: Hive, on: str | None) -> Selection:
    selector: Selector | None = parse_on(on) if on is not None else None
    names = await hive.node_names()
    if not names:
        raise HiveError(f"{hive.source.describe()}: the hive has no nodes")
    if selector is None:
        configs = await hive.deployment(names)
        return Selection(names, configs)
    if selector.needs_tags:
        configs = await hive.deployment(names)
        chosen = selector.select(names, {n: c.tags for n, c in configs.items()})
        return Selection(chosen, {n: configs[n] for n in chosen})
    chosen = selector.select(names, {})
    return Selection(chosen, await hive.deployment(chosen))


# -- commands ----------------------------------------------------------------------


def _print_results(results: Sequence[NodeResult]) -> None:
    for r in results:
        if r.ok:
            print(f"{r.name}\t{r.out_path}", flush=True)
    failed = [r for r in results if not r.ok]
    for r in failed:
        f = r.failure
        assert f is not None
        log.error("node %s: %s failed: %s", r.name, f.stage, f.message)
        if f.detail and f.detail != f.message:
            for line in f.detail.splitlines()[-20:]:
                log.error("  %s | %s", r.name, line)
    ok = len(results) - len(failed)
    log.warning(
        "%d of %d nodes built%s", ok, len(results), f", {len(failed)} failed" if failed else ""
    )


async def cmd_build(ns: argparse.Namespace, *, goal: str = "build") -> int:
    eval_settings = _eval_settings(ns)
    hive = await _open_hive(ns)
    meta = await hive.meta()
    if goal in DEPLOYING_GOALS and ns.on is None and not meta.allow_apply_all:
        raise UsageError(
            "no node filter: meta.allowApplyAll is false in this hive, so deploying needs --on"
        )
    if goal != "build":
        raise UsageError(f"apply {goal}: deploying to hosts is not built yet; use 'waggle build'")
    hive = hive.with_flags(replace(hive.flags, machines_file=meta.machines_file))
    selection = await _select(hive, ns.on)
    gc_dir = None
    if ns.keep_result:
        gc_dir = (hive.source.directory or Path.cwd()) / ".gcroots"
    build_settings = BuildSettings(
        jobs=max(1, ns.build_jobs), timeout=ns.build_timeout, gc_root_dir=gc_dir
    )
    budget = MemoryBudget.measure(eval_settings.memory)
    log.info(
        "evaluating %d node(s); memory budget %.1f GiB", len(selection.names), budget.budget / 2**30
    )
    run = await evaluate_and_build(hive, selection.names, eval_settings, build_settings)
    sizes = [len(c.names) for c in run.evaluation.chunks]
    log.info(
        "evaluation: %d process(es), chunk sizes %s, peak %.0f MiB",
        len(sizes),
        sizes,
        run.evaluation.peak_rss_total / 2**20,
    )
    _print_results(run.nodes)
    return EXIT_OK if all(r.ok for r in run.nodes) else EXIT_NODES_FAILED


async def cmd_apply(ns: argparse.Namespace) -> int:
    return await cmd_build(ns, goal=ns.goal)


async def cmd_eval(ns: argparse.Namespace) -> int:
    if ns.file and ns.expression:
        raise UsageError("eval: give either FILE or -E EXPR, not both")
    if ns.file:
        path = Path(ns.file).resolve()
        if not path.is_file():
            raise UsageError(f"eval: {ns.file}: no such file")
        function = f"import {nix_string(str(path))}"
    elif ns.expression:
        function = ns.expression
    else:
        raise UsageError("eval: give a FILE or -E '{ nodes, pkgs, lib }: ...'")
    hive = await _open_hive(ns)
    value = await hive.introspect(function)
    print(json.dumps(value))
    return EXIT_OK


def _options_summary(c: NodeConfig) -> str:
    parts = []
    if c.target_port is not None:
        parts.append(f"port={c.target_port}")
    if c.build_on_target:
        parts.append("buildOnTarget")
    if c.allow_local_deployment:
        parts.append("allowLocalDeployment")
    if not c.replace_unknown_profiles:
        parts.append("replaceUnknownProfiles=false")
    if c.ssh_options:
        parts.append(f"sshOptions={len(c.ssh_options)}")
    return ", ".join(parts) or "-"


def _node_json(c: NodeConfig) -> dict[str, Any]:
    return {
        "name": c.name,
        "targetHost": c.target_host,
        "targetPort": c.target_port,
        "targetUser": c.target_user,
        "tags": list(c.tags),
        "allowLocalDeployment": c.allow_local_deployment,
        "buildOnTarget": c.build_on_target,
        "replaceUnknownProfiles": c.replace_unknown_profiles,
        "privilegeEscalationCommand": list(c.privilege_escalation_command),
        "sshOptions": list(c.ssh_options),
        # Key contents are never printed: only where each key goes and how.
        "keys": [
            {
                "name": k.name,
                "path": k.path,
                "source": k.source.kind,
                "user": k.user,
                "group": k.group,
                "permissions": k.permissions,
                "uploadAt": str(k.upload_at),
            }
            for k in c.keys
        ],
    }


async def cmd_nodes(ns: argparse.Namespace) -> int:
    hive = await _open_hive(ns)
    selection = await _select(hive, ns.on)
    configs = [selection.configs[n] for n in selection.names]
    if ns.json:
        print(json.dumps([_node_json(c) for c in configs], indent=2))
        return EXIT_OK
    rows = [("NODE", "TARGET", "TAGS", "KEYS", "OPTIONS")]
    for c in configs:
        target = (
            "-"
            if c.target_host is None
            else (f"{c.target_user + '@' if c.target_user else ''}{c.target_host}")
        )
        rows.append(
            (c.name, target, ",".join(c.tags) or "-", str(len(c.keys)), _options_summary(c))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


async def cmd_nix_info(_ns: argparse.Namespace) -> int:
    info = await nix.info()
    budget = MemoryBudget.measure()
    print(f"Nix version:        {info.version}")
    print(f"Flakes supported:   {'yes' if info.flakes else 'no'}")
    print(f"CPU cores:          {os.cpu_count()}")
    print(f"Memory available:   {budget.available / 2**30:.1f} GiB")
    room = "none" if budget.cgroup_room is None else f"{budget.cgroup_room / 2**30:.1f} GiB"
    print(f"cgroup memory room: {room}")
    print(
        f"Evaluation budget:  {budget.budget / 2**30:.1f} GiB (reserve {budget.reserve / 2**30:.1f} GiB)"
    )
    return EXIT_OK


COMMANDS = {
    "build": cmd_build,
    "apply": cmd_apply,
    "eval": cmd_eval,
    "introspect": cmd_eval,
    "nodes": cmd_nodes,
    "nix-info": cmd_nix_info,
}


def _print_error(e: WaggleError) -> None:
    print(f"waggle: error: {e.message}", file=sys.stderr)
    if e.detail and e.detail.strip() and e.detail.strip() not in e.message:
        for line in e.detail.strip().splitlines()[-30:]:
            print(f"  | {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    debug = bool(_opt(ns, "debug", False))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if _opt(ns, "verbose") else logging.WARNING,
        format="waggle: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(COMMANDS[ns.command](ns))
    except WaggleError as e:
        if debug:
            traceback.print_exc()
        _print_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("waggle: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
