"""The command line: arguments to typed requests, results to stdout, errors to exit codes.

This is the only module that knows about argparse and the only place that maps
exceptions to exit codes (see EXIT CODES in `waggle --help`). The use cases are in
`runner.app`; nothing below this module sees an `argparse.Namespace`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from typing_extensions import override

from runner import __version__, errors, interrupt
from runner.app import ci as ci_app
from runner.app import hosts, inspect, merge
from runner.app import requests as rq
from runner.app.plan import plan, write_plan_reports
from runner.app.run import apply
from runner.app.watch import run_watch
from runner.build import BuildSettings
from runner.deploy.cache import cache_settings
from runner.deploy.pipeline import DeploySettings
from runner.evaluate import EvalSettings, parse_size
from runner.gitops.plan import DEFAULT_IGNORE
from runner.goals import GOALS, Goal
from runner.hosts.ssh import SshSettings
from runner.nix import NixFlags
from runner.report import console, text

log = logging.getLogger("waggle")

EPILOG = errors.EXIT_CODES_HELP


Namespace = argparse.Namespace


class _Parser(argparse.ArgumentParser):
    """One-line errors; no abbreviated flags (a later flag would change old command lines)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    @override
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        self.exit(errors.EXIT_USAGE, f"waggle: error: {message} (see {self.prog} --help)\n")


# -- the parser: option groups, then one function per subcommand ------------------------


def _global_options(p: argparse.ArgumentParser) -> None:
    # SUPPRESS so a value given before the subcommand is not reset by the subcommand's own
    # default; defaults are applied in `_opt`.
    s = argparse.SUPPRESS
    p.add_argument("-f", "--config", metavar="HIVE", default=s,
                   help="hive.nix, a directory, a flake.nix or a flake reference "
                   "(default: search upward for flake.nix, then hive.nix)")  # fmt: skip
    p.add_argument("--show-trace", action="store_true", default=s, help="pass --show-trace to Nix")
    p.add_argument("--impure", action="store_true", default=s, help="allow impure flake evaluation")
    p.add_argument("--nix-option", nargs=2, action="append", metavar=("NAME", "VALUE"), default=s,
                   help="pass --option NAME VALUE to local Nix commands (repeatable)")  # fmt: skip
    p.add_argument("--builders", metavar="SPEC", default=s, help="remote builders for every evaluation and build "
                   "(Nix's `builders`: machines lines or @FILE; '' for none); replaces meta.machinesFile")  # fmt: skip
    p.add_argument(
        "-v", "--verbose", action="store_true", default=s, help="more log lines on stderr"
    )
    p.add_argument("--debug", action="store_true", default=s, help="show tracebacks of errors")
    p.add_argument("--plain", action="store_true", default=s,
                   help="one line per event instead of the live view (implied by -v, CI, no TTY)")  # fmt: skip
    p.add_argument("--color", choices=("auto", "always", "never"), default=s,
                   help="colour in progress output (auto honours NO_COLOR, CLICOLOR, CLICOLOR_FORCE)")  # fmt: skip
    p.add_argument("--timestamps", action="store_true", default=s,
                   help="prefix plain progress lines with the time")  # fmt: skip


def _opt(ns: Namespace, name: str, default: Any = None) -> Any:
    return getattr(ns, name, default)


def _selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on", metavar="NODES",
                   help="comma-separated node names, globs and @tag globs, e.g. 'web-*,@db'")  # fmt: skip


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-node-limit", default="auto", metavar="auto|N|0",
                   help="nodes per evaluator process: auto (restarted on memory and cost), at most N, 0: no limit")  # fmt: skip
    p.add_argument("--eval-memory", metavar="SIZE",
                   help="memory budget for evaluation, e.g. 8G (default: available memory, "
                   "capped by the cgroup limit, minus 1 GiB)")  # fmt: skip
    p.add_argument("--eval-jobs", type=int, default=0, metavar="N",
                   help="evaluation workers, one evaluator each (default: one per core, within the budget)")  # fmt: skip
    p.add_argument("--eval-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="seconds a node's evaluation may go without progress (default 1800)")  # fmt: skip


def _build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-result", action="store_true",
                   help="keep GC roots of built systems in <hive dir>/.gcroots/node-<name>")  # fmt: skip
    p.add_argument("--build-jobs", type=int, default=2, metavar="N",
                   help="nix-store --realise processes at once (default 2)")  # fmt: skip
    p.add_argument("--build-timeout", type=float, default=3 * 3600.0, metavar="SECONDS",
                   help="timeout of one node's build (default 10800)")  # fmt: skip


def _report_options(p: argparse.ArgumentParser, what: str = "run") -> None:
    p.add_argument("--junit", metavar="PATH", type=Path,
                   help=f"write the {what} as JUnit XML ('-' for stdout)")  # fmt: skip
    p.add_argument("--report-md", metavar="PATH", type=Path,
                   help=f"write the {what} as markdown ('-' for stdout; also appended to "
                   "$GITHUB_STEP_SUMMARY when set)")  # fmt: skip
    p.add_argument("--report-json", "--json", metavar="PATH", type=Path, dest="report_json",
                   help=f"write the {what} as JSON ('-' for stdout; see README)")  # fmt: skip


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore", action="append", metavar="GLOB",
                   help="paths whose changes affect no node (repeatable; default: **/*.md, "
                   "docs/**, .github/**)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="cache base evaluations here (keyed by tree id and Nix version)")  # fmt: skip


def _change_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--changed-since", metavar="REV",
                   help="deploy only nodes this git change affects, plus drifted hosts")  # fmt: skip
    _plan_options(p)
    p.add_argument("--no-drift", action="store_true",
                   help="with --changed-since: do not check unaffected hosts for drift")  # fmt: skip


def _ssh_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ssh-config", metavar="FILE", action="append",
                   help="ssh_config file(s) to use instead of ~/.ssh/config and "
                   "/etc/ssh/ssh_config, as with ssh -F (default also from $SSH_CONFIG_FILE)")  # fmt: skip
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="timeout of each SSH connection attempt (default 30)")  # fmt: skip
    p.add_argument("--known-hosts", metavar="FILE", action="append", default=[],
                   help="a known_hosts file whose keys are trusted for every host, besides the "
                   "ones ssh_config names (repeatable; host keys are always checked)")  # fmt: skip


def _deploy_options(p: argparse.ArgumentParser) -> None:
    _ssh_options(p)
    p.add_argument("-p", "--parallel", type=int, default=None, metavar="N",
                   help="nodes pushing or activating at once (default 10, 0: no limit)")  # fmt: skip
    for flag, default, what in (
        ("--push-timeout", 3600.0, "one node's closure push"),
        ("--activation-timeout", 600.0, "one node's activation"),
        ("--reboot-timeout", 600.0, "the wait for a rebooted node"),
        ("--confirm-timeout", 30.0, "the confirmation; unconfirmed hosts roll back"),
        ("--lock-timeout", 60.0, "the wait for a host another run holds"),
    ):
        p.add_argument(flag, type=float, default=None, metavar="SECONDS",  # None: DeploySettings'
                       help=f"timeout of {what} (default {default:g})")  # fmt: skip
    p.add_argument("--reboot", action="store_true",
                   help="reboot after activation and wait for the node (default goal: boot)")  # fmt: skip
    p.add_argument("--no-keys", action="store_true", help="do not upload deployment.keys")
    p.add_argument("--no-rollback", action="store_true", help="switch/test: no magic rollback")
    p.add_argument("--no-health-checks", action="store_true", help="skip deployment.healthChecks")
    p.add_argument("--waves", metavar="N|P%,...", help="deploy in waves reaching N nodes or P%% "
                   "of them by each wave's end, e.g. 1,10%%,100%% (canary nodes first)")  # fmt: skip
    p.add_argument("--max-failures", metavar="N|P%", help="failed nodes a wave may have before "
                   "later waves are not started (default 0)")  # fmt: skip
    p.add_argument("--wave-order", metavar="@TAG,...", help="order of nodes into waves by tag "
                   "(default: nodes tagged canary first, then by name)")  # fmt: skip
    p.add_argument("--cache", metavar="URL", help="upload closures once to this binary cache "
                   "(nix copy --to URL) and let hosts fetch them from it")  # fmt: skip
    p.add_argument("--cache-substituter", metavar="URL", help="where hosts fetch from "
                   "(default: the --cache URL)")  # fmt: skip
    p.add_argument("--cache-key", metavar="FILE", help="sign uploads with this secret key file")
    p.add_argument("--cache-public-key", metavar="KEY", help="the key hosts trust for the cache")
    p.add_argument("--no-substitute", "--no-substitutes", dest="no_substitute",
                   action="store_true", help="do not let hosts substitute missing paths")  # fmt: skip
    p.add_argument("--build-on-target", action="store_true", default=None,
                   help="build every node on its host (deployment.buildOnTarget for all)")  # fmt: skip
    p.add_argument("--no-build-on-target", dest="build_on_target", action="store_false",
                   help="build every node locally")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="activate even hosts that already run the new system")  # fmt: skip
    p.add_argument("--force-replace-unknown-profiles", action="store_true",
                   help="activate even where replaceUnknownProfiles is false and the host's "
                   "profile is unknown here")  # fmt: skip


def _sharded_selection(p: argparse.ArgumentParser) -> None:
    _selection_options(p)
    p.add_argument("--shard", metavar="K/N", help="only shard K of N: a stable share of the selected "
                   "nodes (see README; ci: default from CI_NODE_INDEX/CI_NODE_TOTAL or WAGGLE_SHARD)")  # fmt: skip


Adder = Callable[[str, str], argparse.ArgumentParser]


def _run_commands(add: Adder) -> None:
    p = add("build", "evaluate and build the selected nodes; print each node's system path")
    for group in (_sharded_selection, _eval_options, _build_options, _deploy_options):
        group(p)  # deploy options: for buildOnTarget nodes, which build on their hosts
    _report_options(p)
    p = add("apply", "evaluate, build and deploy the selected nodes")
    p.add_argument("goal", nargs="?", choices=GOALS, default=None,
                   help="build, push, switch (default; boot with --reboot), test, "
                   "dry-activate, upload-keys")  # fmt: skip
    for group in (_sharded_selection, _eval_options, _build_options, _deploy_options):
        group(p)
    _report_options(p)
    _change_options(p)
    p = add("upload-keys", "upload the selected nodes' deployment.keys (all) and nothing else")
    _selection_options(p)
    _deploy_options(p)
    _report_options(p)


def _gitops_commands(add: Adder) -> None:
    p = add("plan", "which nodes a git change affects, with package diffs (nothing is deployed)")
    p.add_argument("--base", required=True, metavar="REV",
                   help="the revision to compare against (SHA, branch, tag, HEAD~1, origin/main)")  # fmt: skip
    p.add_argument("--head", metavar="REV", help="the revision to plan (default: HEAD)")
    _sharded_selection(p)
    _plan_options(p)
    p.add_argument("--no-build", action="store_true", help="do not build the changed nodes")
    _eval_options(p)
    _build_options(p)
    _report_options(p, "plan")
    p = add("ci", "run as a CI step: plan on pull requests, deploy changes on pushes to a "
            "deploy branch, build otherwise (settings in waggle.yaml)")  # fmt: skip
    p.add_argument("--ci-config", type=Path, metavar="FILE",
                   help="waggle.yaml to use (default: searched upward from here)")  # fmt: skip
    p.add_argument("--comment", action="store_true", default=None,
                   help="post the plan as a sticky PR/MR comment (token from the environment)")  # fmt: skip
    p.add_argument("--no-comment", dest="comment", action="store_false")
    for group in (_sharded_selection, _eval_options, _build_options, _deploy_options):
        group(p)
    _report_options(p)
    _change_options(p)
    p = add("watch", "poll a git ref and deploy each new head (pull-based GitOps from one machine)")
    p.add_argument("--repo", type=Path, default=Path("."), metavar="PATH",
                   help="the clone to fetch into (default: .)")  # fmt: skip
    p.add_argument("--remote", default="origin", help="the remote to fetch (default origin)")
    p.add_argument("--ref", default="main", help="the branch to follow (default main)")
    p.add_argument("--interval", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between fetches (default 60)")  # fmt: skip
    p.add_argument("--fetch-timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--reports-dir", type=Path, metavar="DIR",
                   help="write JUnit, markdown and JSON reports per deployed commit here")  # fmt: skip
    p.add_argument("--metrics-file", type=Path, metavar="PATH",
                   help="a Prometheus textfile (for node_exporter's textfile collector)")  # fmt: skip
    p.add_argument("--allow-non-descendant", action="store_true",
                   help="deploy a force-pushed head that does not descend from the last one")  # fmt: skip
    p.add_argument("--once", action="store_true", help="one fetch and deploy, then exit")
    for group in (_selection_options, _eval_options, _build_options, _deploy_options):
        group(p)


def _host_commands(add: Adder) -> None:
    p = add("exec", "run a command on the selected nodes; output grouped per node")
    _selection_options(p)
    _ssh_options(p)
    p.add_argument("-p", "--parallel", type=int, default=0, metavar="N",
                   help="hosts at once (default 0: all)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="timeout of the command on each host (default 600)")  # fmt: skip
    p.add_argument("command_argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                   help="the command and its arguments after --; one argument is a shell "
                   "command line")  # fmt: skip
    p = add("apply-local", "build and activate a node on the machine Waggle runs on")
    p.add_argument("goal", nargs="?", choices=GOALS, default="switch",
                   help="switch (default), boot, test, dry-activate, build, upload-keys")  # fmt: skip
    p.add_argument("--node", help="the node to deploy (default: this machine's hostname)")
    p.add_argument("--sudo", action="store_true",
                   help="run privileged commands through deployment.privilegeEscalationCommand")  # fmt: skip
    p.add_argument("--no-keys", action="store_true", help="do not upload deployment.keys")
    p.add_argument("--activation-timeout", type=float, default=600.0, metavar="SECONDS")
    _eval_options(p)
    _build_options(p)


def _inspect_commands(add: Adder) -> None:
    p = add("eval", "evaluate an expression '{ nodes, pkgs, lib }: ...' against the hive; "
            "JSON on stdout")  # fmt: skip
    p.add_argument("file", nargs="?", help="a .nix file holding the function")
    p.add_argument("-E", "--expr", dest="expression", help="the function as a string")
    p = add("nodes", "list the hive's nodes with target, tags and options")
    _selection_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add("nix-info", "show the Nix version, flake support and the evaluation memory budget")
    p = add("report", "work with run reports (`report merge`: join --shard runs' reports)")
    p = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser).add_parser(
        "merge", help="merge shard runs' JSON reports into one run's reports (exit 1 if it failed)")  # fmt: skip
    p.add_argument("files", nargs="+", type=Path, metavar="REPORT.json", help="--report-json files of the shard runs")  # fmt: skip
    _report_options(p, "merged run")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="waggle", epilog=EPILOG,
                     description="Deploy NixOS fleets from CI: Colmena-compatible hives, "
                     "evaluated by workers within a memory budget.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("-V", "--version", action="version", version=f"waggle {__version__}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        aliases = ["introspect"] if name == "eval" else []
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=aliases,
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        _global_options(p)
        return p

    for commands in (_run_commands, _gitops_commands, _host_commands, _inspect_commands):
        commands(add)
    return parser


# -- requests from arguments -----------------------------------------------------------


def _hive_ref(ns: Namespace) -> rq.HiveRef:
    options = tuple((n, v) for n, v in (_opt(ns, "nix_option") or []))
    flags = NixFlags(bool(_opt(ns, "show_trace")), bool(_opt(ns, "impure")), options=options,
                     builders=_opt(ns, "builders"))  # fmt: skip
    return rq.HiveRef(config=_opt(ns, "config"), cwd=Path.cwd(), flags=flags)


def _view(ns: Namespace) -> rq.View:
    plain = bool(_opt(ns, "plain") or _opt(ns, "verbose"))
    return rq.View(plain, _opt(ns, "color", "auto"), bool(_opt(ns, "timestamps")))


def _eval_settings(ns: Namespace) -> EvalSettings:
    memory = None
    if ns.eval_memory is not None:
        try:
            memory = parse_size(ns.eval_memory)
        except ValueError as e:
            raise errors.UsageError(f"--eval-memory: {e}") from None
    if ns.eval_jobs < 0:
        raise errors.UsageError("--eval-jobs must not be negative")
    if ns.eval_timeout <= 0:
        raise errors.UsageError("--eval-timeout must be more than zero")
    limit = rq.parse_node_limit(ns.eval_node_limit)
    return EvalSettings(node_limit=limit, memory=memory, jobs=ns.eval_jobs, timeout=ns.eval_timeout)


def _build_settings(ns: Namespace) -> BuildSettings:
    return BuildSettings(jobs=max(1, ns.build_jobs), timeout=ns.build_timeout)


def _ssh_settings(ns: Namespace) -> SshSettings:
    env_file = os.environ.get("SSH_CONFIG_FILE")
    files = ns.ssh_config or ([env_file] if env_file else None)
    for flag, paths in (("--ssh-config", files or ()), ("--known-hosts", ns.known_hosts)):
        for f in paths:
            if not Path(f).is_file():
                raise errors.UsageError(f"{flag} {f}: no such file")
    if ns.connect_timeout <= 0:
        raise errors.UsageError("--connect-timeout must be more than zero")
    return SshSettings(
        config_files=tuple(files) if files is not None else None,
        connect_timeout=ns.connect_timeout,
        known_hosts_files=tuple(ns.known_hosts),
    )


def _deploy_settings(ns: Namespace, goal: Goal) -> DeploySettings:
    if ns.no_keys and goal is Goal.UPLOAD_KEYS:
        raise errors.UsageError("--no-keys contradicts the upload-keys goal")
    parallel = 10 if ns.parallel is None else ns.parallel
    if parallel < 0:
        raise errors.UsageError("--parallel must not be negative")
    timeouts = ("push_timeout", "activation_timeout", "reboot_timeout", "confirm_timeout")
    for flag in (*timeouts, "lock_timeout"):
        if getattr(ns, flag) is not None and getattr(ns, flag) <= 0:
            raise errors.UsageError(f"--{flag.replace('_', '-')} must be more than zero")
    same = (*timeouts, "lock_timeout", "reboot", "force", "force_replace_unknown_profiles",
            "build_on_target")  # fmt: skip
    return DeploySettings(goal=goal, parallel=parallel, ssh=_ssh_settings(ns),
                          keys=not ns.no_keys, substitute=not ns.no_substitute,
                          rollback=not ns.no_rollback, health_checks=not ns.no_health_checks,
                          waves=_split(ns.waves), max_failures=ns.max_failures or "0",
                          wave_order=_split(ns.wave_order), cache=cache_settings(ns.cache,
                          ns.cache_substituter, ns.cache_key, ns.cache_public_key),
                          **{n: v for n in same if (v := getattr(ns, n)) is not None})  # fmt: skip


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",")) if text else ()


def _reports(ns: Namespace) -> tuple[rq.Reports, str | None]:
    """The report files, and which report (if any) goes to stdout ('-')."""
    paths = {"junit": _opt(ns, "junit"), "markdown": _opt(ns, "report_md"),
             "json": _opt(ns, "report_json")}  # fmt: skip
    to_stdout = [kind for kind, p in paths.items() if p is not None and str(p) == "-"]
    if len(to_stdout) > 1:
        raise errors.UsageError("only one report can go to stdout ('-')")
    files = {k: (None if k in to_stdout else p) for k, p in paths.items()}
    return rq.Reports(**files), (to_stdout[0] if to_stdout else None)


def _ignore(ns: Namespace) -> tuple[str, ...]:
    return tuple(ns.ignore) if ns.ignore else DEFAULT_IGNORE


def apply_request(ns: Namespace, goal: Goal | None = None) -> rq.ApplyRequest:
    if goal is None:
        goal = Goal(ns.goal) if _opt(ns, "goal") else (Goal.BOOT if ns.reboot else Goal.SWITCH)
    since = _opt(ns, "changed_since")
    changes = None
    if since is not None and goal is not Goal.UPLOAD_KEYS:
        changes = rq.Changes(since, _ignore(ns), ns.cache_dir, drift=not ns.no_drift)
    upload = goal is Goal.UPLOAD_KEYS
    return rq.ApplyRequest(
        hive=_hive_ref(ns),
        on=ns.on,
        eval=EvalSettings() if upload else _eval_settings(ns),
        build=BuildSettings() if upload else _build_settings(ns),
        keep_result=bool(_opt(ns, "keep_result")),
        deploy=_deploy_settings(ns, goal),
        changes=changes,
        reports=_reports(ns)[0],
        view=_view(ns),
        command=ns.command,
        shard=rq.shard_of(_opt(ns, "shard")),
    )


# -- commands: build a request, call the use case, print, pick the exit code -------------


def _exit(ok: bool) -> int:
    return errors.EXIT_OK if ok else errors.EXIT_NODES_FAILED


async def cmd_apply(ns: Namespace, goal: Goal | None = None) -> int:
    summary = await apply(apply_request(ns, goal))
    console.print_summary(summary, _reports(ns)[1], bool(_opt(ns, "debug")))
    return _exit(summary.ok)


async def cmd_plan(ns: Namespace) -> int:
    reports, to_stdout = _reports(ns)
    request = rq.PlanRequest(base=ns.base, head=ns.head, hive=_hive_ref(ns), on=ns.on,
                          ignore=_ignore(ns), cache_dir=ns.cache_dir, eval=_eval_settings(ns),
                          build=not ns.no_build, build_jobs=ns.build_jobs,
                          build_timeout=ns.build_timeout, reports=reports, shard=rq.shard_of(ns.shard))  # fmt: skip
    result = await plan(request)
    console.print_plan(result, write_plan_reports(result, reports), to_stdout)
    return _exit(result.ok)


async def cmd_ci(ns: Namespace) -> int:
    reports, to_stdout = _reports(ns)
    request = rq.CiRequest(apply=replace(apply_request(ns, Goal.BUILD), changes=None),
                        ci_config=ns.ci_config, on=ns.on, reports=reports, comment=ns.comment,
                        cache_dir=ns.cache_dir, ignore=tuple(ns.ignore) if ns.ignore else None,
                        parallel_given=ns.parallel is not None,
                        max_failures_given=ns.max_failures is not None,
                        confirm_timeout_given=ns.confirm_timeout is not None)  # fmt: skip
    debug = bool(_opt(ns, "debug"))
    printer = ci_app.CiPrinter(  # a report asked for on stdout ('-') replaces the usual output
        mode=lambda line: print(line, file=sys.stderr, flush=True),
        plan=lambda result, text: console.print_plan(result, text, to_stdout),
        run=lambda s: console.print_summary(s, to_stdout, debug),
        dry_run=lambda s: console.print_summary(s, debug=debug, err=to_stdout is not None),
    )
    outcome = await ci_app.run_ci(request, printer)
    for line in outcome.annotations:
        print(line, flush=True)
    return _exit(outcome.ok)


async def cmd_report(ns: Namespace) -> int:  # `report merge`, its only action
    summary = merge.merge_reports(rq.MergeRequest(tuple(ns.files), _reports(ns)[0]))
    console.print_summary(summary, _reports(ns)[1], bool(_opt(ns, "debug")))
    return _exit(summary.ok)


async def cmd_watch(ns: Namespace) -> int:
    request = rq.WatchRequest(repo=ns.repo, apply=apply_request(ns, Goal.SWITCH), remote=ns.remote,
                           ref=ns.ref, interval=ns.interval, fetch_timeout=ns.fetch_timeout,
                           reports_dir=ns.reports_dir, metrics_file=ns.metrics_file,
                           allow_non_descendant=ns.allow_non_descendant, once=ns.once,
                           max_failures_given=ns.max_failures is not None,
                           confirm_timeout_given=ns.confirm_timeout is not None)  # fmt: skip
    debug = bool(_opt(ns, "debug"))
    outcome = await run_watch(request, on_deploy=lambda s: console.print_summary(s, debug=debug))
    if outcome.stopped_by == signal.SIGINT:
        return errors.EXIT_INTERRUPTED
    result = outcome.result
    return _exit(result.ok and not result.fetch_errors and not result.refused) if ns.once else 0


async def cmd_exec(ns: Namespace) -> int:
    argv = list(ns.command_argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    outcomes = await hosts.exec_command(
        rq.ExecRequest(
            tuple(argv), _hive_ref(ns), ns.on, _ssh_settings(ns), ns.parallel, ns.timeout
        )
    )
    console.print_exec(outcomes)
    failed = sum(not o.ok for o in outcomes)
    if failed:
        log.warning("exec failed on %d of %d nodes", failed, len(outcomes))
    return _exit(not failed)


async def cmd_apply_local(ns: Namespace) -> int:
    request = rq.ApplyLocalRequest(goal=Goal(ns.goal), node=ns.node, hive=_hive_ref(ns),
                                sudo=ns.sudo, keys=not ns.no_keys,
                                activation_timeout=ns.activation_timeout, eval=_eval_settings(ns),
                                build=_build_settings(ns), keep_result=ns.keep_result,
                                view=_view(ns))  # fmt: skip
    results = await hosts.apply_local(request)
    console.lines(text.deployed_lines(results))
    return _exit(all(r.ok for r in results))


async def cmd_eval(ns: Namespace) -> int:
    print(json.dumps(await inspect.introspect(_hive_ref(ns), ns.file, ns.expression)))
    return errors.EXIT_OK


async def cmd_nodes(ns: Namespace) -> int:
    configs = await inspect.nodes(_hive_ref(ns), ns.on)
    if ns.json:
        print(json.dumps([inspect.node_json(c) for c in configs], indent=2))
    else:
        console.lines(text.nodes_table(configs))
    return errors.EXIT_OK


async def cmd_nix_info(_ns: Namespace) -> int:
    info = await inspect.nix_info()
    console.lines(text.nix_info_lines(info.version, info.flakes, info.cores, info.budget))
    return errors.EXIT_OK


COMMANDS: dict[str, Callable[[Namespace], Coroutine[Any, Any, int]]] = {
    "build": lambda ns: cmd_apply(ns, Goal.BUILD),
    "apply": cmd_apply,
    "upload-keys": lambda ns: cmd_apply(ns, Goal.UPLOAD_KEYS),
    "watch": cmd_watch,
    "ci": cmd_ci,
    "plan": cmd_plan,
    "exec": cmd_exec,
    "apply-local": cmd_apply_local,
    "eval": cmd_eval,
    "introspect": cmd_eval,
    "nodes": cmd_nodes,
    "nix-info": cmd_nix_info,
    "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    debug = bool(_opt(ns, "debug", False))
    level = logging.DEBUG if debug else logging.INFO if _opt(ns, "verbose") else logging.WARNING
    logging.basicConfig(level=level, format="waggle: %(message)s", stream=sys.stderr)
    try:
        return asyncio.run(interrupt.cancelled_on_signals(COMMANDS[ns.command](ns)))
    except errors.WaggleError as e:
        if debug:
            traceback.print_exc()
        console.print_error(e)
        return e.exit_code
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"waggle: {interrupt.reason()}", file=sys.stderr)
        return interrupt.exit_status(errors.EXIT_INTERRUPTED)
