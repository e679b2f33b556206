"""The command line: argparse to typed settings, and errors to exit codes.

This is the only module that knows about argparse and the only place that
maps exceptions to exit codes (see EXIT CODES in `waggle --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from typing_extensions import override

from runner import __version__, interrupt, nix
from runner.build import BuildSettings, evaluate_and_build
from runner.deploy.pipeline import DeploySettings, Goal, deploy, goal_stages
from runner.errors import (
    EXIT_INTERRUPTED,
    EXIT_NODES_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    HiveError,
    UsageError,
    WaggleError,
)


class ReportError(WaggleError):
    """A report file could not be written (the run itself happened)."""

    exit_code = EXIT_NODES_FAILED


from runner.deploy.exec import run_everywhere
from runner.evaluate import EvalRun, EvalSettings, MemoryBudget, parse_size
from runner.events import Recorder, Sink
from runner.gitinfo import head_commit
from runner.gitops import ci, comments, trust
from runner.gitops.changed import select_changed
from runner.gitops.changes import GitError, open_repo
from runner.gitops.config import load_config, merge
from runner.gitops.plan import (
    DEFAULT_IGNORE,
    NodeChange,
    Plan,
    PlanBuildSettings,
    build_and_diff,
    compute_plan,
    hive_path_of,
    plan_json,
    plan_junit,
    plan_markdown,
)
from runner.gitops.watch import WatchSettings, watch
from runner.hive.discovery import locate
from runner.hive.hive import Hive, nix_string
from runner.hive.model import NodeConfig
from runner.hive.selection import Selector, parse_on
from runner.hosts.local import LocalHost
from runner.hosts.ssh import SshSettings
from runner.progress import choose_output
from runner.report import jsonreport, junit, markdown
from runner.results import NodeResult, RunSummary, Stage, Status

log = logging.getLogger("waggle")

EPILOG = """\
exit codes:
  0    everything asked for succeeded (or nothing needed doing)
  1    one or more nodes failed; the others still ran
  2    usage or hive error before any node ran (bad flag, bad --on,
       hive not found or does not evaluate, nix missing)
  130  interrupted (SIGINT, Ctrl-C)
  143  terminated (SIGTERM, e.g. a cancelled CI job); reports are still written
"""

GOALS = tuple(str(g) for g in Goal)


class _Parser(argparse.ArgumentParser):
    """One-line errors; no abbreviated flags (a later flag would change old command lines)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    @override
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        self.exit(EXIT_USAGE, f"waggle: error: {message} (see {self.prog} --help)\n")


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
    p.add_argument(
        "--plain",
        action="store_true",
        default=s,
        help="one line per event instead of the live view (implied by -v, CI, no TTY)",
    )
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default=s,
        help="colour in progress output (auto honours NO_COLOR, CLICOLOR, CLICOLOR_FORCE)",
    )
    p.add_argument(
        "--timestamps",
        action="store_true",
        default=s,
        help="prefix plain progress lines with the time",
    )


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


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--junit",
        metavar="PATH",
        type=Path,
        help="write a JUnit XML report: one testcase per node and stage",
    )
    p.add_argument(
        "--report-md",
        metavar="PATH",
        type=Path,
        help="write a markdown report (also appended to $GITHUB_STEP_SUMMARY when set)",
    )
    p.add_argument(
        "--report-json",
        metavar="PATH",
        type=Path,
        help="write a JSON report (schema waggle.report/1, see README)",
    )


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ignore",
        action="append",
        metavar="GLOB",
        help="paths whose changes affect no node (repeatable; default: **/*.md, "
        "docs/**, .github/**)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="cache base evaluations here (keyed by tree id and Nix version)",
    )


def _change_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--changed-since",
        metavar="REV",
        help="deploy only nodes this git change affects, plus drifted hosts",
    )
    _plan_options(p)
    p.add_argument(
        "--no-drift",
        action="store_true",
        help="with --changed-since: do not check unaffected hosts for drift",
    )


def _ssh_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ssh-config",
        metavar="FILE",
        action="append",
        help="ssh_config file(s) to use instead of ~/.ssh/config and /etc/ssh/ssh_config, "
        "as with ssh -F (default also from $SSH_CONFIG_FILE)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="timeout of each SSH connection attempt (default 30)",
    )
    p.add_argument(
        "--known-hosts",
        metavar="FILE",
        action="append",
        default=[],
        help="a known_hosts file whose keys are trusted for every host, besides the ones "
        "ssh_config names (repeatable; host keys are always checked)",
    )


def _deploy_options(p: argparse.ArgumentParser) -> None:
    _ssh_options(p)
    p.add_argument(
        "-p",
        "--parallel",
        type=int,
        default=10,
        metavar="N",
        help="nodes pushing or activating at once (default 10, 0: no limit)",
    )
    p.add_argument(
        "--push-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="timeout of one node's closure push (default 3600)",
    )
    p.add_argument(
        "--activation-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="timeout of one node's activation (default 600)",
    )
    p.add_argument(
        "--reboot",
        action="store_true",
        help="reboot after activation and wait for the node (default goal: boot)",
    )
    p.add_argument(
        "--reboot-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for a rebooted node (default 600)",
    )
    p.add_argument("--no-keys", action="store_true", help="do not upload deployment.keys")
    p.add_argument(
        "--no-substitute",
        "--no-substitutes",
        dest="no_substitute",
        action="store_true",
        help="do not let hosts substitute missing paths",
    )
    p.add_argument(
        "--build-on-target",
        action="store_true",
        default=None,
        help="build every node on its host (deployment.buildOnTarget for all)",
    )
    p.add_argument(
        "--no-build-on-target",
        dest="build_on_target",
        action="store_false",
        help="build every node locally",
    )
    p.add_argument(
        "--force", action="store_true", help="activate even hosts that already run the new system"
    )
    p.add_argument(
        "--force-replace-unknown-profiles",
        action="store_true",
        help="activate even where replaceUnknownProfiles is false and the host's "
        "profile is unknown here",
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
    _deploy_options(p)  # for buildOnTarget nodes, which build on their hosts
    _report_options(p)

    p = add("apply", "evaluate, build and deploy the selected nodes")
    p.add_argument(
        "goal",
        nargs="?",
        choices=GOALS,
        default=None,
        help="build, push, switch (default; boot with --reboot), test, dry-activate, upload-keys",
    )
    _selection_options(p)
    _eval_options(p)
    _build_options(p)
    _deploy_options(p)
    _report_options(p)
    _change_options(p)

    p = add(
        "upload-keys", "upload the selected nodes' deployment.keys (all of them) and nothing else"
    )
    _selection_options(p)
    _deploy_options(p)
    _report_options(p)

    p = add("plan", "which nodes a git change affects, with package diffs (nothing is deployed)")
    p.add_argument(
        "--base",
        required=True,
        metavar="REV",
        help="the revision to compare against (SHA, branch, tag, HEAD~1, origin/main)",
    )
    p.add_argument("--head", metavar="REV", help="the revision to plan (default: HEAD)")
    _selection_options(p)
    _plan_options(p)
    p.add_argument("--no-build", action="store_true", help="do not build the changed nodes")
    p.add_argument(
        "--json",
        metavar="PATH",
        type=Path,
        dest="plan_json",
        help="write the plan as JSON ('-' for stdout)",
    )
    _eval_options(p)
    _build_options(p)
    _report_options(p)

    p = add(
        "ci",
        "run as a CI step: plan on pull requests, deploy changes on pushes to a "
        "deploy branch, build otherwise (settings in waggle.yaml)",
    )
    p.add_argument(
        "--ci-config",
        type=Path,
        metavar="FILE",
        help="waggle.yaml to use (default: searched upward from here)",
    )
    p.add_argument(
        "--comment",
        action="store_true",
        default=None,
        help="post the plan as a sticky PR/MR comment (token from the environment)",
    )
    p.add_argument("--no-comment", dest="comment", action="store_false")
    _selection_options(p)
    _eval_options(p)
    _build_options(p)
    _deploy_options(p)
    _report_options(p)
    _change_options(p)

    p = add("watch", "poll a git ref and deploy each new head (pull-based GitOps from one machine)")
    p.add_argument(
        "--repo",
        type=Path,
        default=Path("."),
        metavar="PATH",
        help="the clone to fetch into (default: .)",
    )
    p.add_argument("--remote", default="origin", help="the remote to fetch (default origin)")
    p.add_argument("--ref", default="main", help="the branch to follow (default main)")
    p.add_argument(
        "--interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds between fetches (default 60)",
    )
    p.add_argument("--fetch-timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument(
        "--reports-dir",
        type=Path,
        metavar="DIR",
        help="write JUnit, markdown and JSON reports per deployed commit here",
    )
    p.add_argument(
        "--metrics-file",
        type=Path,
        metavar="PATH",
        help="a Prometheus textfile (for node_exporter's textfile collector)",
    )
    p.add_argument(
        "--allow-non-descendant",
        action="store_true",
        help="deploy a force-pushed head that does not descend from the last one",
    )
    p.add_argument("--once", action="store_true", help="one fetch and deploy, then exit")
    _selection_options(p)
    _eval_options(p)
    _build_options(p)
    _deploy_options(p)

    p = add("exec", "run a command on the selected nodes; output grouped per node")
    _selection_options(p)
    _ssh_options(p)
    p.add_argument(
        "-p", "--parallel", type=int, default=0, metavar="N", help="hosts at once (default 0: all)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="timeout of the command on each host (default 600)",
    )
    p.add_argument(
        "command_argv",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND...",
        help="the command and its arguments, after --",
    )

    p = add("apply-local", "build and activate a node on the machine Waggle runs on")
    p.add_argument(
        "goal",
        nargs="?",
        choices=GOALS,
        default="switch",
        help="switch (default), boot, test, dry-activate, build, upload-keys",
    )
    p.add_argument("--node", help="the node to deploy (default: this machine's hostname)")
    p.add_argument(
        "--sudo",
        action="store_true",
        help="run privileged commands through deployment.privilegeEscalationCommand",
    )
    p.add_argument("--no-keys", action="store_true", help="do not upload deployment.keys")
    p.add_argument("--activation-timeout", type=float, default=600.0, metavar="SECONDS")
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
    all_names: tuple[str, ...] = ()


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
        return Selection(names, await hive.deployment(names), tuple(names))
    if selector.needs_tags:
        configs = await hive.deployment(names)
        chosen = selector.select(names, {n: c.tags for n, c in configs.items()})
        return Selection(chosen, {n: configs[n] for n in chosen}, tuple(names))
    chosen = selector.select(names, {})
    return Selection(chosen, await hive.deployment(chosen), tuple(names))


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


async def _hive_for_run(ns: argparse.Namespace, goal: Goal) -> tuple[Hive, Selection]:
    hive = await _open_hive(ns)
    meta = await hive.meta()
    if goal is not Goal.BUILD and ns.on is None and not meta.allow_apply_all:
        raise UsageError(
            "no node filter: meta.allowApplyAll is false in this hive, so deploying needs --on"
        )
    hive = hive.with_flags(replace(hive.flags, machines_file=meta.machines_file))
    return hive, await _select(hive, ns.on)


def _build_settings(ns: argparse.Namespace, hive: Hive) -> BuildSettings:
    gc_dir = None
    if getattr(ns, "keep_result", False):
        gc_dir = (hive.source.directory or Path.cwd()) / ".gcroots"
    return BuildSettings(jobs=max(1, ns.build_jobs), timeout=ns.build_timeout, gc_root_dir=gc_dir)


def _log_evaluation(run: EvalRun) -> None:
    sizes = [len(c.names) for c in run.chunks]
    log.info(
        "evaluation: %d process(es), chunk sizes %s, peak %.0f MiB of a %.1f GiB budget",
        len(sizes),
        sizes,
        run.peak_rss_total / 2**20,
        run.budget.budget / 2**30,
    )


async def cmd_build(ns: argparse.Namespace) -> int:
    return await cmd_apply(ns, goal=Goal.BUILD)


def _ssh_settings(ns: argparse.Namespace) -> SshSettings:
    files = ns.ssh_config or (
        [os.environ["SSH_CONFIG_FILE"]] if os.environ.get("SSH_CONFIG_FILE") else None
    )
    for f in files or ():
        if not Path(f).is_file():
            raise UsageError(f"--ssh-config {f}: no such file")
    if ns.connect_timeout <= 0:
        raise UsageError("--connect-timeout must be more than zero")
    for f in ns.known_hosts:
        if not Path(f).is_file():
            raise UsageError(f"--known-hosts {f}: no such file")
    return SshSettings(
        config_files=tuple(files) if files is not None else None,
        connect_timeout=ns.connect_timeout,
        known_hosts_files=tuple(ns.known_hosts),
    )


def _deploy_settings(ns: argparse.Namespace, goal: Goal, hive: Hive) -> DeploySettings:
    if ns.no_keys and goal is Goal.UPLOAD_KEYS:
        raise UsageError("--no-keys contradicts the upload-keys goal")
    if ns.parallel < 0:
        raise UsageError("--parallel must not be negative")
    for flag in ("push_timeout", "activation_timeout", "reboot_timeout"):
        if getattr(ns, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be more than zero")
    return DeploySettings(
        goal=goal,
        parallel=ns.parallel,
        push_timeout=ns.push_timeout,
        activation_timeout=ns.activation_timeout,
        reboot=ns.reboot,
        reboot_timeout=ns.reboot_timeout,
        keys=not ns.no_keys,
        substitute=not ns.no_substitute,
        force=ns.force,
        force_replace_unknown_profiles=ns.force_replace_unknown_profiles,
        build_on_target=ns.build_on_target,
        ssh=_ssh_settings(ns),
        base_dir=hive.source.directory,
    )


@contextlib.contextmanager
def _progress(
    ns: argparse.Namespace, names: Sequence[str], *, plain: bool = False
) -> Iterator[Sink]:
    """The live view on a terminal, else the plain log; log lines go through it meanwhile."""
    out = choose_output(
        sys.stderr,
        plain=plain or bool(_opt(ns, "plain") or _opt(ns, "verbose")),
        color=_opt(ns, "color", "auto"),
        env=os.environ,
        timestamps=bool(_opt(ns, "timestamps")),
        names=names,
    )
    root = logging.getLogger()
    saved = root.handlers[:]
    with out:
        handler = out.log_handler()
        handler.setFormatter(logging.Formatter("waggle: %(message)s"))
        root.handlers = [handler]
        try:
            yield out
        finally:
            root.handlers = saved


def _print_deploy(results: Sequence[NodeResult]) -> None:
    """One line per node on stdout: node, outcome, last message."""
    for r in results:
        f = r.failure
        if f is not None:
            print(f"{r.name}\tfailed\t{f.stage}: {f.message}", flush=True)
            continue
        skipped = next((st for st in r.stages if st.status is Status.SKIPPED), None)
        if skipped is not None:
            print(f"{r.name}\t{skipped.message or 'skipped'}\t{r.out_path or ''}", flush=True)
            continue
        main = next(
            (st for st in reversed(r.stages) if st.stage in (Stage.ACTIVATE, Stage.CONFIRM)),
            r.stages[-1] if r.stages else None,
        )
        print(f"{r.name}\tok\t{main.message if main else ''}", flush=True)


async def cmd_apply(ns: argparse.Namespace, *, goal: Goal | None = None) -> int:
    summary = await _run_apply(ns, goal)
    return EXIT_OK if summary.ok else EXIT_NODES_FAILED


async def _run_apply(ns: argparse.Namespace, goal: Goal | None = None) -> RunSummary:
    """Evaluate, build and (for deploying goals) deploy; print and write the reports."""
    if goal is None:
        goal = Goal(ns.goal) if ns.goal else (Goal.BOOT if ns.reboot else Goal.SWITCH)
    started_at, start = time.time(), time.monotonic()
    eval_settings = _eval_settings(ns) if goal is not Goal.UPLOAD_KEYS else EvalSettings()
    hive, selection = await _hive_for_run(ns, goal)
    build_settings = _build_settings(ns, hive) if goal is not Goal.UPLOAD_KEYS else BuildSettings()
    left_alone: list[NodeResult] = []
    changed_since = getattr(ns, "changed_since", None)
    if changed_since is not None and goal is not Goal.UPLOAD_KEYS:
        changes = await select_changed(
            hive,
            hive_path_of(hive.source),
            changed_since,
            selection.names,
            selection.configs,
            selector=parse_on(ns.on) if ns.on is not None else None,
            ignore=tuple(ns.ignore) if ns.ignore else DEFAULT_IGNORE,
            cache_dir=ns.cache_dir,
            flags=hive.flags,
            eval_settings=eval_settings,
            ssh=_ssh_settings(ns),
            parallel=ns.parallel,
            drift=goal.activates and not ns.no_drift,
        )
        for node, why in changes.deploy.items():
            log.info("%s: deploying (%s)", node, why)
        log.info("%d node(s) unchanged since %s", len(changes.unchanged), changed_since)
        left_alone = changes.unchanged_results(started_at)
        chosen = [n for n in selection.names if n in changes.deploy]
        selection = Selection(
            chosen, {n: selection.configs[n] for n in chosen}, selection.all_names
        )
    stages = goal_stages(
        goal, reboot=getattr(ns, "reboot", False), keys=not getattr(ns, "no_keys", False)
    )
    recorder = Recorder()
    stopped: asyncio.CancelledError | None = None
    try:
        nodes = await _evaluate_or_deploy(
            ns, goal, hive, selection, eval_settings, build_settings, recorder
        )
    except asyncio.CancelledError as e:  # SIGTERM / Ctrl-C: report what is known, then stop
        stopped = e
        nodes = recorder.results(selection.names, stages, interrupt.reason())
    if changed_since is not None and goal is not Goal.UPLOAD_KEYS:
        nodes = [replace(r, reason=changes.deploy.get(r.name, "")) for r in nodes]
    order = {n: i for i, n in enumerate(selection.all_names)}
    nodes = sorted([*nodes, *left_alone], key=lambda r: order.get(r.name, len(order)))
    if goal is Goal.BUILD:
        _print_results(nodes)
    else:
        _print_deploy(nodes)
    taken = {r.name for r in nodes}
    summary = RunSummary(
        command=f"{ns.command} {goal}" if ns.command == "apply" else str(ns.command),
        goal=str(goal),
        hive=hive.source.describe(),
        commit=head_commit(hive.source.directory),
        started_at=started_at,
        seconds=time.monotonic() - start,
        stages=stages,
        nodes=tuple(nodes),
        not_selected=tuple(n for n in selection.all_names if n not in taken),
    )
    _write_reports(ns, summary)
    if stopped is not None:
        raise stopped
    return summary


async def _evaluate_or_deploy(
    ns: argparse.Namespace,
    goal: Goal,
    hive: Hive,
    selection: Selection,
    eval_settings: EvalSettings,
    build_settings: BuildSettings,
    recorder: Recorder,
) -> list[NodeResult]:
    on_target = ns.build_on_target
    if not selection.names:
        return []  # nothing changed: nothing to evaluate, build or deploy
    if goal is Goal.BUILD and not (
        on_target
        or (on_target is None and any(c.build_on_target for c in selection.configs.values()))
    ):
        # Nothing goes to a host: evaluate and build here.
        with _progress(ns, selection.names) as out:
            recorder.sink = out
            built = await evaluate_and_build(
                hive, selection.names, eval_settings, build_settings, events=recorder
            )
            _log_evaluation(built.evaluation)
        return list(built.nodes)
    settings = _deploy_settings(ns, goal, hive)
    with _progress(ns, selection.names, plain=goal is Goal.DRY_ACTIVATE) as out:
        recorder.sink = out
        run = await deploy(
            hive,
            selection.configs,
            selection.names,
            eval_settings,
            build_settings,
            settings,
            events=recorder,
        )
        if run.build is not None:
            _log_evaluation(run.build.evaluation)
    return list(run.nodes)


def _write_reports(ns: argparse.Namespace, summary: RunSummary) -> None:
    """The reports asked for; a report that cannot be written is an error, after the run."""
    try:
        for path in (ns.junit, ns.report_md, ns.report_json):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        if ns.junit is not None:
            junit.write_junit(summary, ns.junit)
            log.info("JUnit report: %s", ns.junit)
        if ns.report_md is not None:
            markdown.write_markdown(summary, ns.report_md)
            log.info("markdown report: %s", ns.report_md)
        if ns.report_json is not None:
            jsonreport.write_json(summary, ns.report_json)
            log.info("JSON report: %s", ns.report_json)
        step_summary = markdown.step_summary_path(os.environ)
        if step_summary is not None:
            markdown.write_step_summary(summary, step_summary)
    except OSError as e:
        raise ReportError(f"cannot write a report: {e.filename}: {e.strerror}") from e


def _write_plan_reports(
    plan: Plan, *, md: Path | None, junit: Path | None, json_path: Path | None
) -> str:
    """Write the plan's reports and the GitHub step summary; return the markdown."""
    text = plan_markdown(plan)
    renderers: tuple[tuple[Path | None, Callable[[], str]], ...] = (
        (md, lambda: text),
        (junit, lambda: plan_junit(plan)),
        (json_path, lambda: json.dumps(plan_json(plan), indent=2)),
    )
    try:
        for path, render in renderers:
            if path is None or str(path) == "-":
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render())
        step_summary = markdown.step_summary_path(os.environ)
        if step_summary is not None:
            markdown.append_step_summary(text, step_summary)
    except OSError as e:
        raise ReportError(f"cannot write a report: {e.filename}: {e.strerror}") from e
    return text


async def cmd_plan(ns: argparse.Namespace) -> int:
    source = locate(_opt(ns, "config"), Path.cwd())
    selector = parse_on(ns.on) if ns.on is not None else None
    eval_settings = _eval_settings(ns)
    flags = _nix_flags(ns)
    plan = await compute_plan(
        hive_path_of(source),
        ns.base,
        ns.head,
        selector=selector,
        ignore=tuple(ns.ignore) if ns.ignore else DEFAULT_IGNORE,
        cache_dir=ns.cache_dir,
        flags=flags,
        eval_settings=eval_settings,
    )
    plan = await build_and_diff(
        plan,
        flags,
        PlanBuildSettings(
            jobs=max(1, ns.build_jobs), timeout=ns.build_timeout, build=not ns.no_build
        ),
    )
    text = _write_plan_reports(plan, md=ns.report_md, junit=ns.junit, json_path=ns.plan_json)
    if ns.plan_json is not None and str(ns.plan_json) == "-":
        print(json.dumps(plan_json(plan), indent=2))
    else:
        print(text)
    return EXIT_OK if plan.ok else EXIT_NODES_FAILED


async def cmd_ci(ns: argparse.Namespace) -> int:
    context = ci.detect(os.environ)
    # A pull request runs code it controls: its settings come from the base commit (see
    # runner.gitops.trust); other events run what is already on their branch.
    pr_settings = (
        trust.pr_config(ns.ci_config, search_from=Path.cwd(), base=context.base)
        if context.is_pull_request
        else None
    )
    config = merge(
        pr_settings.config
        if pr_settings is not None
        else load_config(ns.ci_config, search_from=Path.cwd()),
        {
            "on": ns.on,
            "junit": ns.junit,
            "report_md": ns.report_md,
            "comment": ns.comment,
            "cache_dir": ns.cache_dir,
            "ignore": tuple(ns.ignore) if ns.ignore else None,
        },
    )
    chosen = ci.mode(context, config)
    print(f"waggle ci: {ci.mode_reason(context, config)}", file=sys.stderr, flush=True)
    # The file's settings fill in what no flag gave.
    if config.hive and _opt(ns, "config") is None:
        ns.config = config.hive
    ns.on = config.on
    ns.junit, ns.report_md = config.junit, config.report_md
    ns.cache_dir = config.cache_dir
    ns.ignore = list(config.ignore) or None
    if config.parallel is not None:
        ns.parallel = config.parallel
    if config.eval_node_limit is not None and ns.eval_node_limit == "auto":
        ns.eval_node_limit = config.eval_node_limit
    failed: list[tuple[str, str]]
    if chosen == "plan":
        settings = pr_settings or trust.PrSettings(config)
        policy = trust.dry_activation_policy(context, replace(settings, config=config))
        # The comment's token is taken now; the PR's code is evaluated without any token.
        token = comments.token_from_env(context, os.environ, config.token_env)
        trust.withhold_secrets(os.environ, config.token_env)
        source = locate(_opt(ns, "config"), Path.cwd())
        flags = _nix_flags(ns)
        plan = await compute_plan(
            hive_path_of(source),
            context.base,
            None,
            selector=parse_on(ns.on) if ns.on else None,
            ignore=tuple(ns.ignore) if ns.ignore else DEFAULT_IGNORE,
            cache_dir=ns.cache_dir,
            flags=flags,
            eval_settings=_eval_settings(ns),
            host_access=policy.enabled,
        )
        plan = await build_and_diff(
            plan, flags, PlanBuildSettings(jobs=max(1, ns.build_jobs), timeout=ns.build_timeout)
        )
        plan = trust.decide_dry_activation(plan, policy)
        plan = replace(plan, notes=(*plan.notes, *settings.notes))
        text = _write_plan_reports(plan, md=ns.report_md, junit=ns.junit, json_path=None)
        print(text)
        if config.comment:
            if token is None:
                log.warning("no API token in the environment: the plan is not posted")
            else:
                try:
                    outcome = comments.upsert_comment(
                        context,
                        text,
                        token=token.value,
                        token_header=token.header,
                        allow_fork=config.comment_forks,
                    )
                    log.warning("plan comment %s", outcome)
                except WaggleError as e:  # the plan itself stands
                    log.warning("plan comment failed: %s", e.message)
        affected = [n.name for n in plan.affected if n.kind != "removed"]
        failed = [(n.name, n.error or "build failed") for n in plan.failed]
        ok = plan.ok
        planned = [n for n in plan.nodes if n.dry_activate_planned]
        if planned:
            # Show on the hosts what activation would change; nothing is switched.
            dry = await _dry_activate_pr(ns, planned)
            failed += ci.failed_nodes(dry)
            ok = dry.ok
        outputs = ci.node_outputs(chosen, affected, [], [n for n, _ in failed])
    else:
        ns.goal = "switch" if chosen == "deploy" else "build"
        ns.changed_since = (context.base or "0" * 40) if chosen == "deploy" else None
        ns.no_drift = not config.deploy_drifted
        summary = await _run_apply(ns)
        failed = ci.failed_nodes(summary)
        moved = [r.name for r in summary.nodes if r.ok and not _untouched(r)]
        outputs = ci.node_outputs(
            chosen, moved, moved if chosen == "deploy" else [], [n for n, _ in failed]
        )
        ok = summary.ok
    for line in ci.annotations(failed, context.provider):
        print(line, flush=True)
    ci.write_outputs(context, outputs, os.environ, dotenv=config.outputs_dotenv)
    return EXIT_OK if ok else EXIT_NODES_FAILED


async def _dry_activate_pr(ns: argparse.Namespace, planned: Sequence[NodeChange]) -> RunSummary:
    """Dry-activate a pull request's planned nodes: the PR's systems (built from the
    checked-out tree), each host reached only with the base's connection settings, no
    keys, no build on a target, no remote builders from the PR's meta; nothing switched."""
    started_at, start = time.time(), time.monotonic()
    hive = await _open_hive(ns)
    names = [n.name for n in planned]
    configs = {n.name: trust.dry_activation_config(n) for n in planned}
    settings = replace(
        _deploy_settings(ns, Goal.DRY_ACTIVATE, hive),
        keys=False,
        build_on_target=False,
        reboot=False,
    )
    with _progress(ns, names, plain=True) as out:
        run = await deploy(
            hive,
            configs,
            names,
            _eval_settings(ns),
            _build_settings(ns, hive),
            settings,
            events=out,
        )
        if run.build is not None:
            _log_evaluation(run.build.evaluation)
    nodes = list(run.nodes)
    _print_deploy(nodes)
    return RunSummary(
        command="ci dry-activate",
        goal=str(Goal.DRY_ACTIVATE),
        hive=hive.source.describe(),
        commit=head_commit(hive.source.directory),
        started_at=started_at,
        seconds=time.monotonic() - start,
        stages=goal_stages(Goal.DRY_ACTIVATE, keys=False),
        nodes=tuple(nodes),
    )


def _untouched(result: NodeResult) -> bool:
    return any(st.status is Status.SKIPPED for st in result.stages)


def _watch_hive(repo: Path, hive_arg: str | None) -> str | None:
    """`-f` of `waggle watch` as a path inside the clone (each deploy reads it from the
    fetched commit's tree); None: found in the tree as usual. UsageError naming the file
    and the repository when it is not inside the clone."""
    if hive_arg is None:
        return None
    try:
        workdir = open_repo(repo).workdir
    except GitError:
        workdir = None  # watch itself reports a bad --repo
    root = Path(workdir).resolve() if workdir else repo.resolve()
    path = (Path.cwd() / hive_arg).resolve()
    if not path.is_relative_to(root):
        what = (
            f"is a flake reference, not a path inside the repository {root}"
            if ":" in hive_arg and not path.exists()
            else f"({path}) is outside the repository {root}"
        )
        raise UsageError(
            f"watch: -f {hive_arg} {what} (--repo): watch deploys the hive of each fetched "
            "commit, so -f must name a file or directory inside the clone"
        )
    rel = path.relative_to(root).as_posix()
    return rel if rel != "." else ""


async def cmd_watch(ns: argparse.Namespace) -> int:
    settings = WatchSettings(
        repo=ns.repo.resolve(),
        remote=ns.remote,
        ref=ns.ref,
        interval=ns.interval,
        reports_dir=ns.reports_dir,
        metrics_file=ns.metrics_file,
        allow_non_descendant=ns.allow_non_descendant,
        once=ns.once,
        fetch_timeout=ns.fetch_timeout,
    )
    hive_arg = _watch_hive(ns.repo, _opt(ns, "config"))

    async def deploy_commit(sha: str, tree: Path) -> RunSummary:
        each = argparse.Namespace(**vars(ns))
        each.config = str(tree / hive_arg) if hive_arg else str(locate(None, tree).ref)
        each.goal, each.changed_since = "switch", None
        each.junit = each.report_md = each.report_json = None  # watch writes its own per commit
        summary = await _run_apply(each, Goal.SWITCH)
        return replace(summary, commit=sha)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        result = await watch(settings, deploy_commit, stop=stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    if received and received[-1] == signal.SIGINT:
        return EXIT_INTERRUPTED
    if ns.once:
        return (
            EXIT_OK
            if result.ok and not result.fetch_errors and not result.refused
            else EXIT_NODES_FAILED
        )
    return EXIT_OK


async def cmd_upload_keys(ns: argparse.Namespace) -> int:
    return await cmd_apply(ns, goal=Goal.UPLOAD_KEYS)


async def cmd_exec(ns: argparse.Namespace) -> int:
    argv = list(ns.command_argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("exec: give the command after --, e.g. waggle exec -- uptime")
    if ns.parallel < 0:
        raise UsageError("--parallel must not be negative")
    hive = await _open_hive(ns)
    selection = await _select(hive, ns.on)
    outcomes = await run_everywhere(
        selection.configs,
        selection.names,
        argv,
        _ssh_settings(ns),
        parallel=ns.parallel,
        timeout=ns.timeout,
    )
    failed = 0
    for o in outcomes:
        print(f"=== {o.node}: {o.status} ===", flush=True)
        if o.stdout:
            print(o.stdout.rstrip("\n"), flush=True)
        if o.stderr:
            print(o.stderr.rstrip("\n"), file=sys.stderr, flush=True)
        failed += not o.ok
    if failed:
        log.warning("exec failed on %d of %d nodes", failed, len(outcomes))
    return EXIT_NODES_FAILED if failed else EXIT_OK


async def cmd_apply_local(ns: argparse.Namespace) -> int:
    goal = Goal(ns.goal)
    node = ns.node or socket.gethostname()
    hive = await _open_hive(ns)
    names = await hive.node_names()
    if node not in names:
        raise UsageError(
            f"apply-local: this machine's node {node!r} is not in the hive (use --node NAME)"
        )
    config = (await hive.deployment([node]))[node]
    if not config.allow_local_deployment:
        raise UsageError(f"apply-local: node {node} does not set deployment.allowLocalDeployment")
    if goal.activates and not _is_nixos():
        raise UsageError("apply-local: this machine is not NixOS (/etc/os-release has no ID=nixos)")
    meta = await hive.meta()
    hive = hive.with_flags(replace(hive.flags, machines_file=meta.machines_file))
    settings = DeploySettings(
        goal=goal,
        activation_timeout=ns.activation_timeout,
        keys=not ns.no_keys,
        build_on_target=False,
        base_dir=hive.source.directory,
    )
    escalation = config.privilege_escalation_command if ns.sudo else ()
    if not ns.sudo and os.geteuid() != 0:
        log.warning("apply-local runs as a non-root user without --sudo; activation may fail")
    # sudo may prompt, and dry-activate's output is the point: plain lines then.
    with _progress(ns, [node], plain=ns.sudo or goal is Goal.DRY_ACTIVATE) as out:
        run = await deploy(
            hive,
            {node: config},
            [node],
            _eval_settings(ns),
            _build_settings(ns, hive),
            settings,
            host_factory=lambda c: LocalHost(c.name, tuple(escalation)),
            require_target_host=False,
            events=out,
        )
    _print_deploy(run.nodes)
    return EXIT_OK if all(r.ok for r in run.nodes) else EXIT_NODES_FAILED


def _is_nixos(os_release: Path = Path("/etc/os-release")) -> bool:
    try:
        lines = os_release.read_text().splitlines()
    except OSError:
        return False
    return any(line.strip() in ("ID=nixos", 'ID="nixos"') for line in lines)


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
    "upload-keys": cmd_upload_keys,
    "watch": cmd_watch,
    "ci": cmd_ci,
    "plan": cmd_plan,
    "exec": cmd_exec,
    "apply-local": cmd_apply_local,
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
        return asyncio.run(interrupt.cancelled_on_signals(COMMANDS[ns.command](ns)))
    except WaggleError as e:
        if debug:
            traceback.print_exc()
        _print_error(e)
        return e.exit_code
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"waggle: {interrupt.reason()}", file=sys.stderr)
        return interrupt.exit_status(EXIT_INTERRUPTED)
