"""Colmena hive semantics, evaluated by real nix against the stand-in."""

from __future__ import annotations

import json

from tests.conftest import write_hive
from tests.helpers import assert_clean_error, waggle


def introspect(tmp_path, expr: str):
    done = waggle("eval", "-E", expr, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_node_reads_another_node_through_nodes(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = { nodes, name, ... }: {
        networking.hostName = "${name}-host";
        environment.etc.peer.text = nodes.beta.config.networking.hostName;
      };
      beta = { networking.hostName = "beta-host"; };
    }
    """,
    )
    got = introspect(tmp_path, "{ nodes, ... }: nodes.alpha.config.environment.etc.peer.text")
    assert got == "beta-host"
    assert (
        introspect(tmp_path, "{ nodes, ... }: nodes.alpha.config.networking.hostName")
        == "alpha-host"
    )


def test_node_as_list_of_modules(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = [
        { deployment.tags = [ "one" ]; }
        ({ lib, ... }: { deployment.tags = [ "two" ]; networking.hostName = lib.mkForce "listy"; })
      ];
    }
    """,
    )
    assert introspect(tmp_path, "{ nodes, ... }: nodes.alpha.config.networking.hostName") == "listy"
    got = introspect(tmp_path, "{ nodes, ... }: nodes.alpha.config.deployment.tags")
    assert sorted(got) == ["one", "two"]


def test_special_args_and_node_special_args(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta = {
        nixpkgs = import @NIXPKGS@ { };
        specialArgs = { site = "ams"; rack = "r1"; };
        nodeSpecialArgs.beta = { site = "fra"; };
      };
      defaults = { site, rack, ... }: { environment.etc.where.text = "${site}/${rack}"; };
      alpha = { };
      beta = { };
    }
    """,
    )
    got = introspect(
        tmp_path,
        "{ nodes, lib, ... }: lib.mapAttrs (n: v: v.config.environment.etc.where.text) nodes",
    )
    assert got == {"alpha": "ams/r1", "beta": "fra/r1"}


def test_node_nixpkgs_and_overlays_and_config(tmp_path):
    write_hive(
        tmp_path,
        """
    let
      standin = @NIXPKGS@;
    in {
      meta = {
        nixpkgs = import standin { overlays = [ (final: prev: { marker = "meta"; fromMeta = true; }) ]; config.colour = "blue"; config.size = 1; };
        nodeNixpkgs.beta = import standin { overlays = [ (final: prev: { marker = "beta"; }) ]; };
      };
      defaults = { pkgs, ... }: { environment.etc.marker.text = pkgs.marker; };
      alpha = { nixpkgs.config.colour = "red"; nixpkgs.overlays = [ (final: prev: { nodeOverlay = true; }) ]; };
      beta = { };
    }
    """,
    )
    got = introspect(
        tmp_path,
        """{ nodes, ... }: {
      alpha = nodes.alpha.config.environment.etc.marker.text;
      beta = nodes.beta.config.environment.etc.marker.text;
      alphaConfig = nodes.alpha.config.nixpkgs.config;
      alphaBoth = nodes.alpha.pkgs.fromMeta && nodes.alpha.pkgs.nodeOverlay;
    }""",
    )
    assert got["alpha"] == "meta"
    assert got["beta"] == "beta"
    assert got["alphaConfig"]["colour"] == "red" and got["alphaConfig"]["size"] == 1
    assert got["alphaBoth"] is True


def test_nixpkgs_system_propagates_and_node_overrides(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { system = "armv5tel-linux"; };
      alpha = { };
      beta = { nixpkgs.system = "aarch64-linux"; };
    }
    """,
    )
    got = introspect(
        tmp_path, "{ nodes, ... }: { a = nodes.alpha.pkgs.system; b = nodes.beta.pkgs.system; }"
    )
    assert got == {"a": "armv5tel-linux", "b": "aarch64-linux"}


def test_hive_function_with_defaults_is_called(tmp_path):
    write_hive(
        tmp_path,
        """
    { suffix ? "-x" }: {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = { networking.hostName = "alpha${suffix}"; };
    }
    """,
    )
    assert (
        introspect(tmp_path, "{ nodes, ... }: nodes.alpha.config.networking.hostName") == "alpha-x"
    )


def test_hive_function_with_required_argument_fails(tmp_path):
    write_hive(
        tmp_path,
        """
    { suffix }: { meta.nixpkgs = import @NIXPKGS@ { }; alpha = { }; }
    """,
    )
    assert_clean_error(waggle("nodes", cwd=tmp_path), 2, "suffix")


def test_network_is_an_alias_of_meta(tmp_path):
    write_hive(
        tmp_path,
        """
    { network = { nixpkgs = import @NIXPKGS@ { }; allowApplyAll = false; name = "old"; }; alpha = { }; }
    """,
    )
    done = waggle("apply", "switch", cwd=tmp_path)
    assert_clean_error(done, 2, "allowApplyAll")


def test_meta_and_network_together_is_an_error(tmp_path):
    write_hive(
        tmp_path,
        """
    { meta.nixpkgs = import @NIXPKGS@ { }; network.name = "x"; alpha = { }; }
    """,
    )
    assert_clean_error(waggle("nodes", cwd=tmp_path), 2, "network", "meta")


def test_key_options_defaults_and_paths(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = {
        deployment.keys.plain.text = "s3cret";
        deployment.keys.renamed = { name = "other"; destDir = "/etc/secrets"; keyFile = ./k; uploadAt = "post-activation"; };
        deployment.keys.cmd.keyCommand = [ "echo" "hi" ];
      };
    }
    """,
    )
    (tmp_path / "k").write_text("file-secret")
    done = waggle("nodes", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    keys = {k["name"]: k for k in json.loads(done.stdout)[0]["keys"]}
    assert keys["plain"]["path"] == "/run/keys/plain" and keys["plain"]["permissions"] == "0600"
    assert keys["plain"]["source"] == "text"
    assert keys["other"]["path"] == "/etc/secrets/other"
    assert keys["other"]["uploadAt"] == "post-activation" and keys["other"]["source"] == "keyFile"
    assert keys["cmd"]["source"] == "keyCommand"
    assert "s3cret" not in done.stdout and "file-secret" not in done.stdout
    # The key file's path is read, never copied into the store.
    got = introspect(tmp_path, "{ nodes, ... }: nodes.alpha.config.deployment.keys.renamed.keyFile")
    assert got == str(tmp_path / "k")


def test_key_services_and_chown_script(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = { deployment.keys.tls = { text = "x"; user = "nginx"; }; };
    }
    """,
    )
    got = introspect(
        tmp_path,
        """{ nodes, lib, ... }: let c = nodes.alpha.config; in {
      services = lib.attrNames c.systemd.services;
      paths = lib.attrNames c.systemd.paths;
      chown = c.system.activationScripts.waggle-chown-keys.text;
    }""",
    )
    assert "tls-key" in got["services"] and "tls-key" in got["paths"]
    assert "nginx:root" in got["chown"] and "/run/keys/tls" in got["chown"]


def test_key_assertion_checked_when_building(tmp_path):
    # Validation in Nix too: exactly one source is a NixOS assertion on the toplevel.
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = { deployment.keys.none = { }; };
    }
    """,
    )
    done = waggle(
        "eval",
        "-E",
        "{ nodes, ... }: nodes.alpha.config.system.build.toplevel.drvPath",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "exactly one of text, keyFile and keyCommand" in done.stderr


def test_show_trace_reaches_nix(tmp_path):
    write_hive(
        tmp_path,
        """
    { meta.nixpkgs = import @NIXPKGS@ { }; alpha = { environment.etc.x.text = throw "boom"; }; }
    """,
    )
    expr = "{ nodes, ... }: nodes.alpha.config.environment.etc.x.text"
    plain = waggle("eval", "-E", expr, cwd=tmp_path)
    traced = waggle("--show-trace", "eval", "-E", expr, cwd=tmp_path)
    assert plain.returncode == traced.returncode == 2
    assert "boom" in plain.stderr and "boom" in traced.stderr
    assert "while evaluating" in traced.stderr and "while evaluating" not in plain.stderr


def test_nix_option_reaches_nix(tmp_path):
    write_hive(
        tmp_path,
        """
    { meta.nixpkgs = import @NIXPKGS@ { }; alpha = { }; }
    """,
    )
    # A restricted evaluation forbids reading the hive: proves the option is passed.
    done = waggle("--nix-option", "restrict-eval", "true", "nodes", cwd=tmp_path)
    assert_clean_error(done, 2, "restricted")
