"""End-to-end tests of the CLI with real nix against the stand-in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from tests.conftest import EXAMPLE, STANDIN, write_hive
from tests.helpers import assert_clean_error, waggle

SIMPLE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, ... }: {
    environment.etc.node-name.text = name;
    deployment.tags = [ "common" ];
  };
  alpha = { deployment.tags = [ "web" ]; };
  beta = { deployment.tags = [ "db" ]; deployment.targetHost = "beta.example"; deployment.targetPort = 2222; };
  "gamma.tld" = { };
}
"""


def test_nodes_json_tags_merge_and_defaults(tmp_path):
    write_hive(tmp_path, SIMPLE)
    done = waggle("nodes", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    nodes = {n["name"]: n for n in json.loads(done.stdout)}
    assert sorted(nodes) == ["alpha", "beta", "gamma.tld"]
    assert sorted(nodes["alpha"]["tags"]) == ["common", "web"]
    assert nodes["alpha"]["targetHost"] == "alpha"
    assert nodes["alpha"]["targetUser"] == "root"
    assert nodes["alpha"]["targetPort"] is None
    assert nodes["beta"]["targetHost"] == "beta.example"
    assert nodes["beta"]["targetPort"] == 2222
    assert nodes["gamma.tld"]["targetHost"] == "gamma.tld"


def test_nodes_table_and_selection(tmp_path):
    write_hive(tmp_path, SIMPLE)
    done = waggle("nodes", "--on", "@db,gamma*", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NODE", "TARGET", "TAGS", "KEYS", "OPTIONS"]
    assert [line.split()[0] for line in lines[1:]] == ["beta", "gamma.tld"]
    assert "root@beta.example" in lines[1] and "port=2222" in lines[1]


def test_build_example_hive_prints_paths(tmp_path):
    done = waggle("-f", str(EXAMPLE), "build", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    built = dict(line.split("\t") for line in done.stdout.splitlines())
    assert sorted(built) == [
        "bastion",
        "cache-1",
        "db-1",
        "db-2",
        "monitor",
        "web-1",
        "web-2",
        "web-3",
    ]
    for node, path in built.items():
        assert Path(path, "bin", "switch-to-configuration").exists(), node
        assert f"nixos-system-{node}" in path


def test_keep_result_makes_gc_roots(tmp_path):
    write_hive(tmp_path, SIMPLE)
    done = waggle("build", "--on", "alpha,gamma.tld", "--keep-result", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    built = dict(line.split("\t") for line in done.stdout.splitlines())
    for node, path in built.items():
        root = tmp_path / ".gcroots" / f"node-{node}"
        assert os.path.realpath(root) == path
    assert not (tmp_path / ".gcroots" / "node-beta").exists()
    # Registered with Nix as a root, so garbage collection keeps it.
    roots = subprocess.run(
        ["nix-store", "--gc", "--print-roots"], capture_output=True, text=True, check=True
    )
    assert str(tmp_path / ".gcroots" / "node-alpha") in roots.stdout


def test_eval_expression_and_file(tmp_path):
    write_hive(tmp_path, SIMPLE)
    done = waggle("eval", "-E", "{ nodes, pkgs, lib }: lib.attrNames nodes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["alpha", "beta", "gamma.tld"]
    (tmp_path / "q.nix").write_text(
        "{ nodes, ... }: builtins.mapAttrs (n: v: v.config.environment.etc.node-name.text) nodes"
    )
    done = waggle("introspect", "q.nix", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"alpha": "alpha", "beta": "beta", "gamma.tld": "gamma.tld"}
    assert done.stderr == ""


def test_nix_info():
    done = waggle("nix-info")
    assert done.returncode == 0, done.stderr
    assert "Nix version:" in done.stdout and "2." in done.stdout
    assert "Evaluation budget:" in done.stdout


# -- bad input: one clear line, exit 2, no traceback --------------------------------


def test_no_hive_found(tmp_path):
    assert_clean_error(waggle("nodes", cwd=tmp_path), 2, "no hive found")


def test_missing_config_file(tmp_path):
    assert_clean_error(waggle("-f", "nope.nix", "nodes", cwd=tmp_path), 2, "nope.nix")


def test_syntax_error_shows_nix_message(tmp_path):
    (tmp_path / "hive.nix").write_text("{ alpha = { ; }")
    done = waggle("nodes", cwd=tmp_path)
    assert_clean_error(done, 2, "syntax error", "hive.nix")


def test_unknown_deployment_option_named(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = { deployment.noSuchOption = true; };
      beta = { };
    }
    """,
    )
    assert_clean_error(waggle("nodes", cwd=tmp_path), 2, "deployment.noSuchOption", "alpha")


def test_unknown_meta_option_named(tmp_path):
    write_hive(
        tmp_path,
        """
    { meta = { nixpkgs = import @NIXPKGS@ { }; colour = "blue"; }; alpha = { }; }
    """,
    )
    assert_clean_error(waggle("nodes", cwd=tmp_path), 2, "colour")


def test_key_with_two_sources(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = { deployment.keys.secret = { text = "a"; keyCommand = [ "echo" "b" ]; }; };
    }
    """,
    )
    done = waggle("nodes", cwd=tmp_path)
    assert_clean_error(done, 2, "alpha", "deployment.keys.secret", "exactly one")
    assert '"a"' not in done.stderr


def test_key_command_must_be_a_list(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = { deployment.keys.secret.keyCommand = "echo b"; };
    }
    """,
    )
    assert_clean_error(waggle("nodes", cwd=tmp_path), 2, "keyCommand")


def test_bad_on(tmp_path):
    write_hive(tmp_path, SIMPLE)
    assert_clean_error(waggle("build", "--on", "alpha,,beta", cwd=tmp_path), 2, "--on", "empty")
    assert_clean_error(waggle("build", "--on", "zeta-*", cwd=tmp_path), 2, "matches no node")


def test_bad_flags(tmp_path):
    write_hive(tmp_path, SIMPLE)
    assert_clean_error(
        waggle("build", "--eval-node-limit", "lots", cwd=tmp_path), 2, "--eval-node-limit"
    )
    assert_clean_error(waggle("build", "--eval-memory", "huge", cwd=tmp_path), 2, "--eval-memory")
    done = waggle("build", "--no-such-flag", cwd=tmp_path)
    assert (
        done.returncode == 2 and "--no-such-flag" in done.stderr and "Traceback" not in done.stderr
    )


def test_nix_missing(tmp_path):
    write_hive(tmp_path, SIMPLE)
    env_path = tmp_path / "bin"
    env_path.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "runner", "nodes"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(env_path), "PYTHONPATH": str(Path(__file__).parent.parent)},
        check=False,
    )
    assert_clean_error(done, 2, "nix-instantiate is not installed")


def test_allow_apply_all_false_refuses_deploy_without_on(tmp_path):
    write_hive(
        tmp_path,
        """
    { meta = { nixpkgs = import @NIXPKGS@ { }; allowApplyAll = false; }; alpha = { }; }
    """,
    )
    assert_clean_error(waggle("apply", "switch", cwd=tmp_path), 2, "allowApplyAll", "--on")
    # Building is allowed without --on.
    done = waggle("apply", "build", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_standin_path_is_real():
    assert (STANDIN / "default.nix").is_file()


def test_machines_file_builders_reach_nix(tmp_path):
    # A unique node so its system must be built; with max-jobs 0 Nix must use
    # meta.machinesFile's builder, a loopback address where nothing listens.
    write_hive(
        tmp_path,
        f"""
    {{
      meta = {{ nixpkgs = import @NIXPKGS@ {{ }}; machinesFile = ./machines; }};
      alpha = {{ environment.etc.unique.text = "{tmp_path}"; }};
    }}
    """,
    )
    (tmp_path / "machines").write_text(f"ssh://root@127.0.0.254 {platform.machine()}-linux - 4 1\n")
    done = waggle("--nix-option", "max-jobs", "0", "build", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "node alpha: build failed" in done.stderr
    assert "127.0.0.254" in done.stderr
    assert "Traceback" not in done.stderr


def test_abbreviated_flags_are_refused(tmp_path):
    # argparse would take `--cache` as `--cache-dir` (plan) and `--paral` as `--parallel`:
    # a later flag starting the same way would then change what existing CI command lines
    # mean (as `--cache URL` did for apply).
    write_hive(tmp_path, SIMPLE)
    for args in (
        ("apply", "switch", "--cache-sub", "x"),
        ("apply", "switch", "--paral", "2"),
        ("plan", "--base", "HEAD", "--cache", "x"),
        ("--show-tr", "nodes"),
    ):
        done = waggle(*args, cwd=tmp_path)
        assert_clean_error(done, 2, "unrecognized arguments")


def test_no_parser_allows_abbreviations():
    import argparse

    from runner.cli import build_parser

    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [parser, *(p for s in subparsers for p in s.choices.values())]
    assert len(parsers) > 10
    assert all(p.allow_abbrev is False for p in parsers)


def test_a_report_to_stdout_replaces_the_node_lines(tmp_path):
    write_hive(tmp_path, SIMPLE)
    done = waggle("build", "--on", "alpha", "--report-json", "-", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)  # stdout is the report alone
    assert data["schema"].startswith("waggle.report/")
    assert [n["name"] for n in data["nodes"]] == ["alpha"]
    done = waggle("build", "--on", "alpha", "--junit", "-", "--report-md", "-", cwd=tmp_path)
    assert_clean_error(done, 2, "only one report can go to stdout")
