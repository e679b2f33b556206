"""Colmena hive semantics, evaluated by real nix against the stand-in."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

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


def test_key_units_are_named_after_the_attribute(tmp_path):
    # Colmena's names: `keys.wg = { name = "private.key"; }` gives wg-key.service/.path.
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = {
        deployment.keys.wg = { name = "private.key"; text = "x"; };
        deployment.keys.other = { name = "private.key"; destDir = "/run/other"; text = "y"; };
      };
    }
    """,
    )
    got = introspect(
        tmp_path,
        """{ nodes, lib, ... }: let c = nodes.alpha.config; in {
      services = lib.filter (lib.hasSuffix "-key") (lib.attrNames c.systemd.services);
      paths = lib.attrNames c.systemd.paths;
      wg = c.systemd.paths.wg-key.pathConfig;
      other = c.systemd.paths.other-key.pathConfig;
    }""",
    )
    assert got["services"] == ["other-key", "wg-key"]
    assert got["paths"] == ["other-key", "wg-key"]
    assert got["wg"]["PathExists"] == "/run/keys/private.key"
    assert got["wg"]["Unit"] == "wg-key.service"
    assert got["other"]["PathExists"] == "/run/other/private.key"


def test_two_keys_with_one_path_are_an_error(tmp_path):
    write_hive(
        tmp_path,
        """
    {
      meta.nixpkgs = import @NIXPKGS@ { };
      alpha = {
        deployment.keys.first = { name = "tls.pem"; text = "1"; };
        deployment.keys.second = { name = "tls.pem"; destDir = "/run/keys/"; text = "2"; };
        deployment.keys.third = { name = "tls.pem"; destDir = "/run/elsewhere"; text = "3"; };
      };
    }
    """,
    )
    message = (
        "node alpha: deployment.keys.first and deployment.keys.second are both written"
        " to /run/keys/tls.pem"
    )
    done = waggle("nodes", "--json", cwd=tmp_path)
    assert_clean_error(done, 2, message)
    assert "third" not in done.stderr
    # And the node's own assertion, when its system is built.
    built = waggle(
        "eval",
        "-E",
        "{ nodes, ... }: nodes.alpha.config.system.build.toplevel.drvPath",
        cwd=tmp_path,
    )
    assert built.returncode == 2
    assert message.removeprefix("node alpha: ") in built.stderr


def key_unit_hive(tmp_path, dest: Path) -> None:
    write_hive(
        tmp_path,
        f"""
    {{
      meta.nixpkgs = import @NIXPKGS@ {{ }};
      alpha = {{ deployment.keys.wg = {{ destDir = "{dest}"; text = "x"; }}; }};
    }}
    """,
    )


def test_a_key_unit_waits_for_its_file(tmp_path):
    # The unit is started (a service wants it) before the key is uploaded: it must wait,
    # not fail and restart into systemd's start limit.
    dest = tmp_path / "keys"
    key_unit_hive(tmp_path, dest)
    unit = introspect(
        tmp_path,
        """{ nodes, ... }: let s = nodes.alpha.config.systemd.services.wg-key; in {
      inherit (s) preStart script serviceConfig;
    }""",
    )
    env = {"PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    waiting = subprocess.Popen(["sh", "-ec", unit["preStart"]], env=env)
    try:
        time.sleep(0.6)
        assert waiting.poll() is None, f"the key unit did not wait: exit {waiting.returncode}"
        dest.mkdir()
        (dest / "wg").write_text("x")
        appeared = time.monotonic()
        assert waiting.wait(timeout=5) == 0
        assert time.monotonic() - appeared < 3
    finally:
        waiting.kill()
        waiting.wait()
    assert time.monotonic() - start < 10
    # The main process ends cleanly (no restart loop) when the key is gone.
    (dest / "wg").unlink()
    gone = subprocess.run(["sh", "-ec", unit["script"]], env=env, timeout=10, check=False)
    assert gone.returncode == 0
    # systemd lets the wait take as long as it takes; a crash of the watch restarts it.
    assert unit["serviceConfig"]["TimeoutStartSec"] == "infinity"
    assert unit["serviceConfig"]["Restart"] == "on-failure"


def test_activation_never_chowns_through_a_swapped_key(tmp_path):
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("changing owners needs root")
    keys = tmp_path / "keys"
    unsafe = tmp_path / "unsafe"
    keys.mkdir()
    unsafe.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root:hash\n")
    victim.chmod(0o644)
    (keys / "swapped").symlink_to(victim)  # the key's owner swapped the key for a symlink
    os.link(victim, keys / "linked")  # or for a hard link
    (keys / "good").write_text("k")
    (unsafe / "there").write_text("k")
    os.chown(unsafe, 65534, 65534)  # a destDir the key's owner controls
    write_hive(
        tmp_path,
        f"""
    {{
      meta.nixpkgs = import @NIXPKGS@ {{ }};
      alpha = {{
        deployment.keys = {{
          swapped = {{ destDir = "{keys}"; text = "x"; user = "nobody"; group = "nogroup"; }};
          linked = {{ destDir = "{keys}"; text = "x"; user = "nobody"; group = "nogroup"; }};
          good = {{ destDir = "{keys}"; text = "x"; user = "nobody"; group = "nogroup"; }};
          missing = {{ destDir = "{keys}"; text = "x"; user = "nobody"; }};
          there = {{ destDir = "{unsafe}"; text = "x"; user = "nobody"; }};
          later = {{ destDir = "{keys}"; text = "x"; user = "nobody"; uploadAt = "post-activation"; }};
        }};
      }};
    }}
    """,
    )
    (keys / "later").symlink_to(victim)  # post-activation keys are not this snippet's
    text = introspect(
        tmp_path,
        "{ nodes, ... }: nodes.alpha.config.system.activationScripts.waggle-chown-keys.text",
    )
    # NixOS runs activation with bash, the stand-in with sh (dash here): both.
    for shell in [s for s in ("/bin/bash", "/bin/dash") if Path(s).exists()]:
        os.chown(keys / "good", 0, 0)
        done = subprocess.run(
            ["sh", "-ec", text],
            executable=shell,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        st = victim.stat()
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (0, 0, "0o644"), done.stderr
        assert victim.read_text() == "root:hash\n"
        assert (keys / "good").stat().st_uid == 65534 and (keys / "good").stat().st_gid == 65534
        assert (unsafe / "there").stat().st_uid == 0
        assert done.returncode != 0, shell
        err = done.stderr
        assert f"key {keys}/swapped is not a regular file" in err
        assert f"key {keys}/linked has more than one link" in err
        assert f"unsafe destDir {unsafe}: {unsafe} is owned by uid 65534, not root" in err
        assert f"key {keys}/missing does not exist" in err
        assert "later" not in err


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


def _counting_evals(monkeypatch) -> list[str]:
    """The deployment queries the hive sends to Nix, as they are sent."""
    from runner import nix

    sent: list[str] = []
    real = nix.eval_json

    async def counting(expr, *args, **kwargs):
        if re.search(r"deployment(Each)? \(builtins.fromJSON", expr):
            sent.append(expr)
        return await real(expr, *args, **kwargs)

    monkeypatch.setattr(nix, "eval_json", counting)
    return sent


def test_deployment_settings_are_asked_once_and_broken_nodes_cost_a_bisection(
    tmp_path, monkeypatch
):
    import asyncio

    from runner.errors import HiveError
    from runner.hive.discovery import locate
    from runner.hive.hive import Hive
    from runner.hive.model import NodeConfig
    from runner.nix import NixFlags

    def user(i: int) -> str:
        return 'throw "no user"' if i in (2, 13) else f'"u{i}"'

    nodes = "\n".join(f"  n{i} = {{ deployment.targetUser = {user(i)}; }};" for i in range(16))
    write_hive(tmp_path, "{\n  meta.nixpkgs = import @NIXPKGS@ { };\n" + nodes + "\n}\n")
    sent = _counting_evals(monkeypatch)
    hive = Hive(locate(None, tmp_path), NixFlags())
    names = [f"n{i}" for i in range(16)]
    each = asyncio.run(hive.deployment_each(names))
    broken = {n for n, c in each.items() if isinstance(c, HiveError)}
    assert broken == {"n2", "n13"}
    assert "node n2" in str(each["n2"]) and "no user" in str(each["n2"])
    assert isinstance(each["n5"], NodeConfig) and each["n5"].target_user == "u5"
    # one query, then each broken node alone for its message (asking each node alone after
    # the first failure took 1 + 16)
    assert len(sent) == 1 + 2, sent
    asked = len(sent)
    # Asked again (the selection, host access and buildOnTarget of one plan): no new query.
    with pytest.raises(HiveError, match="node n2"):
        asyncio.run(hive.deployment(names))
    assert asyncio.run(hive.deployment(["n0", "n1"]))["n1"].target_user == "u1"
    assert len(sent) == asked


def test_settings_with_an_error_no_tryeval_catches_are_found_by_halving(tmp_path, monkeypatch):
    import asyncio

    from runner.errors import HiveError
    from runner.hive.discovery import locate
    from runner.hive.hive import Hive
    from runner.nix import NixFlags

    def user(i: int) -> str:  # a missing attribute ends the whole Nix process
        return "{ }.missing" if i == 5 else f'"u{i}"'

    nodes = "\n".join(f"  n{i} = {{ deployment.targetUser = {user(i)}; }};" for i in range(8))
    write_hive(tmp_path, "{\n  meta.nixpkgs = import @NIXPKGS@ { };\n" + nodes + "\n}\n")
    sent = _counting_evals(monkeypatch)
    hive = Hive(locate(None, tmp_path), NixFlags())
    each = asyncio.run(hive.deployment_each([f"n{i}" for i in range(8)]))
    assert {n for n, c in each.items() if isinstance(c, HiveError)} == {"n5"}
    assert "missing" in str(each["n5"]) and "node n5" in str(each["n5"])
    assert len(sent) <= 1 + 2 * 3, sent  # halves: 8 -> 4 -> 2 -> 1, both halves each time
