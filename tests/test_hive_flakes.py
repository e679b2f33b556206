"""Flake hives: the raw `colmena` output, `colmenaHive` and `nixosConfigurations`."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest

from tests.conftest import STANDIN
from tests.helpers import assert_clean_error, waggle

SYSTEM = f"{platform.machine()}-linux"


@pytest.fixture
def flake_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fleet"
    d.mkdir()
    # Pure flake evaluation may only read the flake's own files.
    shutil.copytree(STANDIN, d / "nixpkgs")
    return d


def write_flake(d: Path, outputs: str) -> None:
    (d / "flake.nix").write_text(
        '{ outputs = { self }: let pkgs = import ./nixpkgs { system = "'
        + SYSTEM
        + '"; }; in '
        + outputs
        + "; }"
    )


def test_flake_colmena_output(flake_dir):
    write_flake(
        flake_dir,
        """{
      colmena = {
        meta.nixpkgs = pkgs;
        defaults = { name, ... }: { networking.hostName = name; deployment.tags = [ "all" ]; };
        alpha = { deployment.tags = [ "web" ]; };
        beta = { };
      };
    }""",
    )
    done = waggle("nodes", "--json", "--on", "@web", cwd=flake_dir)
    assert done.returncode == 0, done.stderr
    assert [n["name"] for n in json.loads(done.stdout)] == ["alpha"]
    done = waggle("build", cwd=flake_dir)
    assert done.returncode == 0, done.stderr
    built = dict(line.split("\t") for line in done.stdout.splitlines())
    assert sorted(built) == ["alpha", "beta"]
    assert Path(built["alpha"], "bin", "switch-to-configuration").exists()


def test_flake_is_pure_unless_impure(flake_dir):
    write_flake(
        flake_dir,
        """{
      colmena = {
        meta.nixpkgs = pkgs;
        alpha = { environment.etc.h.text = builtins.readFile /etc/hostname; };
      };
    }""",
    )
    expr = "{ nodes, ... }: nodes.alpha.config.environment.etc.h.text"
    assert_clean_error(waggle("eval", "-E", expr, cwd=flake_dir), 2, "pure eval mode")
    done = waggle("--impure", "eval", "-E", expr, cwd=flake_dir)
    assert done.returncode == 0, done.stderr


COLMENA_HIVE = """{
  # A hand-written hive exposing only Colmena's published v0.5 interface,
  # as colmena.lib.makeHive does (no metaConfig: Colmena's exposes `meta`).
  colmenaHive = let
    lib = pkgs.lib;
    evalNode = name: import ./nixpkgs/nixos/lib/eval-config.nix {
      system = pkgs.system;
      modules = [ { networking.hostName = "hand-${name}"; } ];
    };
    names = [ "one" "two" ];
    nodes = lib.genAttrs names evalNode;
    toplevel = lib.mapAttrs (n: v: v.config.system.build.toplevel) nodes;
    deployment = name: {
      targetHost = "${name}.example"; targetPort = null; targetUser = "root";
      allowLocalDeployment = false; buildOnTarget = false; tags = [ "hand" ];
      keys = { }; replaceUnknownProfiles = true;
      privilegeEscalationCommand = [ "sudo" "-H" "--" ]; sshOptions = [ ];
    };
  in {
    __schema = "v0.5";
    inherit nodes toplevel;
    meta = { name = "hand"; allowApplyAll = false; nixpkgs = pkgs; };
    deploymentConfig = lib.genAttrs names deployment;
    deploymentConfigSelected = sel: lib.genAttrs sel deployment;
    evalSelected = sel: lib.filterAttrs (n: _: builtins.elem n sel) toplevel;
    evalSelectedDrvPaths = sel: lib.mapAttrs (_: v: v.drvPath) (lib.filterAttrs (n: _: builtins.elem n sel) toplevel);
    introspect = f: f { inherit lib pkgs nodes; };
  };
}"""


def test_flake_colmena_hive_output(flake_dir):
    write_flake(flake_dir, COLMENA_HIVE)
    done = waggle("nodes", "--json", cwd=flake_dir)
    assert done.returncode == 0, done.stderr
    nodes = json.loads(done.stdout)
    assert [(n["name"], n["targetHost"], n["tags"]) for n in nodes] == [
        ("one", "one.example", ["hand"]),
        ("two", "two.example", ["hand"]),
    ]
    done = waggle(
        "eval", "-E", "{ nodes, ... }: nodes.two.config.networking.hostName", cwd=flake_dir
    )
    assert json.loads(done.stdout) == "hand-two"
    done = waggle("build", "--on", "two", cwd=flake_dir)
    assert done.returncode == 0, done.stderr
    assert "hand-two" in done.stdout
    # meta.allowApplyAll from Colmena's `meta` is honoured.
    assert_clean_error(waggle("apply", cwd=flake_dir), 2, "allowApplyAll")


def test_flake_colmena_hive_schema_checked(flake_dir):
    write_flake(flake_dir, '{ colmenaHive = { __schema = "v0.4"; nodes = { }; }; }')
    assert_clean_error(waggle("nodes", cwd=flake_dir), 2, "v0.4")


def test_flake_nixos_configurations(flake_dir):
    write_flake(
        flake_dir,
        """{
      nixosConfigurations = pkgs.lib.genAttrs [ "desk" "laptop" ] (name:
        import ./nixpkgs/nixos/lib/eval-config.nix {
          system = pkgs.system;
          modules = [ { networking.hostName = name; environment.systemPackages = [ pkgs.hello ]; } ];
        });
    }""",
    )
    done = waggle("nodes", "--json", cwd=flake_dir)
    assert done.returncode == 0, done.stderr
    nodes = json.loads(done.stdout)
    assert [(n["name"], n["targetHost"], n["targetUser"]) for n in nodes] == [
        ("desk", "desk", "root"),
        ("laptop", "laptop", "root"),
    ]
    done = waggle("build", cwd=flake_dir)
    assert done.returncode == 0, done.stderr
    built = dict(line.split("\t") for line in done.stdout.splitlines())
    assert "nixos-system-laptop" in built["laptop"]


def test_flake_without_hive_output(flake_dir):
    write_flake(flake_dir, "{ packages = { }; }")
    assert_clean_error(
        waggle("nodes", cwd=flake_dir), 2, "no colmenaHive, colmena or nixosConfigurations"
    )
