"""Tests of the nixpkgs stand-in (tests/fixtures/nixpkgs) with real Nix, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "nixpkgs"
NIX_OPTS = ["--option", "substituters", ""]

pytestmark = pytest.mark.skipif(
    subprocess.run(
        ["sh", "-c", "command -v nix-instantiate"], capture_output=True, check=False
    ).returncode
    != 0,
    reason="nix-instantiate not installed",
)


def nix_eval(expr: str, *, read_write: bool = False) -> Any:
    cmd = ["nix-instantiate", *NIX_OPTS, "--eval", "--strict", "--json", "-E", expr]
    if read_write:
        cmd.append("--read-write-mode")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def nix_eval_error(expr: str) -> str:
    res = subprocess.run(
        ["nix-instantiate", *NIX_OPTS, "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode != 0, f"expected failure, got {res.stdout}"
    return res.stderr


def nix_build(expr: str) -> Path:
    res = subprocess.run(
        ["nix-build", *NIX_OPTS, "--no-out-link", "-E", expr],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1])


LIB = f"(import {FIXTURE}/lib)"


def modules_expr(body: str, modules: str) -> str:
    """evalModules over `modules` (a Nix list), then `body` with `r` = result."""
    return textwrap.dedent(f"""
        let lib = {LIB}; inherit (lib) mkOption types mkIf mkMerge mkDefault mkForce
          mkBefore mkAfter mkOverride mkOptionDefault;
        r = lib.evalModules {{ modules = {modules}; }};
        in {body}
    """)


def node_expr(module: str, *, attr: str = "config.system.build.toplevel", extra: str = "") -> str:
    """A node evaluated with the stand-in's eval-config.nix."""
    return textwrap.dedent(f"""
        let
          evalConfig = import {FIXTURE}/nixos/lib/eval-config.nix;
          lib = {LIB};
          node = evalConfig {{
            system = "x86_64-linux";
            modules = [ ({module}) ];
            {extra}
          }};
        in node.{attr}
    """)


# --- lib ---------------------------------------------------------------------


def test_lib_names_and_semantics() -> None:
    got = nix_eval(f"""
      let lib = {LIB}; in {{
        version = lib.version;
        release = lib.trivial.release;
        colmenaCheck = lib.versionAtLeast lib.version "22.11pre";
        topo = lib.toposort (a: b: a < b) [ 3 1 2 ];
        cyc = lib.toposort (a: b: true) [ 1 2 ];
        ru = lib.recursiveUpdate {{ a.b = 1; a.c = 2; }} {{ a.b = 3; }};
        esc = lib.escapeShellArgs [ "a b" "it's" "plain" ];
        split = lib.splitString "," "a,,b";
        fix = (lib.fix (lib.extends (f: p: {{ y = p.x + 1; }}) (self: {{ x = 1; z = self.y; }}))).z;
        many = (lib.composeManyExtensions [ (f: p: {{ a = 1; }}) (f: p: {{ b = p.a + 1; }}) ] {{}} {{}}).b;
        ns = [ (lib.attrsets ? mapAttrs') (lib.lists ? foldl') (lib.strings ? hasPrefix) (lib.modules ? evalModules)
               (lib.options ? mkOption) (lib.trivial ? id) (builtins.isFunction lib.types.submoduleWith) ];
        misc = [ (lib.removePrefix "ab" "abc") (lib.removeSuffix "bc" "abc") (lib.toUpper "ab")
                 (lib.concatMapStringsSep "-" toString [ 1 2 ]) (lib.optionalString false "x") ];
        lists = [ (lib.unique [ 1 2 1 ]) (lib.flatten [ 1 [ 2 [ 3 ] ] ]) (lib.take 2 [ 1 2 3 ])
                  (lib.imap1 (i: x: i * x) [ 5 5 ]) (lib.last [ 1 2 ]) (lib.init [ 1 2 ]) ];
        zip = lib.zipAttrsWith (n: vs: vs) [ {{ a = 1; }} {{ a = 2; b = 3; }} ];
      }}
    """)
    assert got["version"] == "23.11.standin"
    assert got["release"] == "23.11"
    assert got["colmenaCheck"] is True
    assert got["topo"] == {"result": [1, 2, 3]}
    assert set(got["cyc"]) == {"cycle", "loops"}
    assert got["ru"] == {"a": {"b": 3, "c": 2}}
    assert got["esc"] == "'a b' 'it'\\''s' plain"
    assert got["split"] == ["a", "", "b"]
    assert got["fix"] == 2 and got["many"] == 2
    assert all(got["ns"])
    assert got["misc"] == ["c", "a", "AB", "1-2", ""]
    assert got["lists"] == [[1, 2], [1, 2, 3], [1, 2], [5, 10], 2, [1]]
    assert got["zip"] == {"a": [1, 2], "b": [3]}


# --- module system -------------------------------------------------------------

DECLS = """
  ({ config, ... }: {
    options.s = mkOption { type = types.str; default = "default"; };
    options.l = mkOption { type = types.listOf types.int; default = [ ]; };
    options.e = mkOption { type = types.bool; default = false; };
    options.t = mkOption { type = types.lines; default = ""; };
    options.a = mkOption { type = types.attrsOf types.int; default = { }; };
    options.deployment.targetPort = mkOption { type = types.nullOr types.ints.unsigned; default = null; };
    options.subs = mkOption {
      default = { };
      type = types.attrsOf (types.submodule ({ name, config, ... }: {
        options.label = mkOption { type = types.str; default = "label-${name}"; };
        options.n = mkOption { type = types.int; default = 1; };
        options.double = mkOption { type = types.int; default = config.n * 2; };
      }));
    };
    config = mkIf config.e { t = mkAfter "from-if"; };
  })
"""


def test_priorities_mkif_mkmerge_and_order() -> None:
    got = nix_eval(
        modules_expr(
            "{ inherit (r.config) s l t a e; prio = r.options.s.highestPrio; }",
            f"""[
      {DECLS}
      {{ s = mkDefault "mkdefault"; l = [ 1 2 ]; e = true; t = "plain"; a.x = 1; }}
      {{ s = mkForce "forced"; l = mkBefore [ 0 ]; t = mkBefore "first"; a = mkMerge [ {{ y = 2; }} (mkIf false {{ z = 3; }}) ]; }}
      {{ s = "normal"; l = mkAfter [ 9 ]; a.w = mkIf true 4; }}
    ]""",
        )
    )
    assert got["s"] == "forced" and got["prio"] == 50
    assert got["l"] == [0, 1, 2, 9]
    assert got["t"] == "first\nplain\nfrom-if"
    assert got["a"] == {"x": 1, "y": 2, "w": 4}
    got = nix_eval(
        modules_expr(
            "r.config.s",
            f"""[ {DECLS} {{ s = mkDefault "d"; }} {{ s = mkOptionDefault "od"; }} ]""",
        )
    )
    assert got == "d"
    assert nix_eval(modules_expr("r.config.s", f"[ {DECLS} ]")) == "default"


def test_submodules_receive_name_and_merge() -> None:
    got = nix_eval(
        modules_expr(
            "r.config.subs",
            f"""[
      {DECLS}
      {{ subs.foo.n = 5; subs.bar = {{ }}; }}
      {{ subs.foo.label = "custom"; subs.baz = mkIf false {{ n = 3; }}; }}
    ]""",
        )
    )
    assert got == {
        "bar": {"label": "label-bar", "n": 1, "double": 2},
        "foo": {"label": "custom", "n": 5, "double": 10},
    }


def test_option_metadata() -> None:
    got = nix_eval(
        modules_expr(
            "{ inherit (r.options.l) isDefined files; v = r.options.l.value; t = r.options.l.type.name; "
            "d = r.options.l.default; defs = r.options.l.definitions; }",
            f"""[ {DECLS} {{ _file = "/x/one.nix"; l = [ 1 ]; }} ]""",
        )
    )
    assert got == {
        "isDefined": True,
        "files": ["/x/one.nix"],
        "v": [1],
        "t": "listOf",
        "d": [],
        "defs": [[1]],
    }


def test_unknown_option_is_an_error_naming_it() -> None:
    err = nix_eval_error(
        modules_expr("r.config.s", f"[ {DECLS} {{ deployment.noSuchOption = 1; }} ]")
    )
    assert "The option `deployment.noSuchOption' does not exist" in err


def test_module_check_false_ignores_unknown_options() -> None:
    got = nix_eval(
        modules_expr(
            "r.config.s", f"[ {DECLS} {{ deployment.noSuchOption = 1; _module.check = false; }} ]"
        )
    )
    assert got == "default"


def test_type_error_names_the_option() -> None:
    err = nix_eval_error(
        modules_expr(
            "r.config.deployment.targetPort", f"""[ {DECLS} {{ deployment.targetPort = "22"; }} ]"""
        )
    )
    assert "A definition for option `deployment.targetPort' is not of type" in err
    err = nix_eval_error(
        modules_expr("r.config.s", f"""[ {DECLS} {{ s = "a"; }} {{ s = "b"; }} ]""")
    )
    assert "The option `s' has conflicting definition values" in err


def test_evaluation_is_lazy() -> None:
    got = nix_eval(
        modules_expr("r.config.l", f"""[ {DECLS} {{ s = throw "never forced"; l = [ 3 ]; }} ]""")
    )
    assert got == [3]


# --- nixpkgs / eval-config -----------------------------------------------------


def test_pkgs_overlays_and_attributes() -> None:
    got = nix_eval(f"""
      let pkgs = import {FIXTURE} {{
        system = "x86_64-linux";
        overlays = [ (final: prev: {{ openssl = prev.openssl // {{ tag = "o1"; }}; }})
                     (final: prev: {{ marker = prev.openssl.tag + "-o2"; }}) ];
        config = {{ allowUnfree = true; }};
      }}; in {{
        inherit (pkgs) system config marker;
        nOverlays = builtins.length pkgs.overlays;
        path = toString pkgs.path;
        names = map (p: p.name) [ pkgs.hello pkgs.cowsay pkgs.htop pkgs.nginx pkgs.curl pkgs.jq pkgs.git pkgs.openssl pkgs.bash pkgs.inotify-tools ];
        pv = [ pkgs.curl.pname pkgs.curl.version ];
        alias = pkgs.inotifyTools.name;
      }}
    """)
    assert got["system"] == "x86_64-linux" and got["config"] == {"allowUnfree": True}
    assert got["marker"] == "o1-o2" and got["nOverlays"] == 2
    assert got["path"] == str(FIXTURE)
    assert "hello-2.12" in got["names"] and "inotify-tools-4.23.9.0" in got["names"]
    assert got["pv"] == ["curl", "8.4.0"] and got["alias"] == "inotify-tools-4.23.9.0"


COLMENA_LIKE = """
  # What Colmena's eval.nix adds to each node: meta.nixpkgs overlays/config with mkBefore.
  ({ lib, ... }: {
    nixpkgs.overlays = lib.mkBefore [ (final: prev: { greeting = "meta"; }) ];
    nixpkgs.config = lib.mkBefore { fromMeta = true; shared = "meta"; nested = { a = 1; b = 1; }; };
  })
"""


def test_node_overlays_and_nixpkgs_config_node_wins() -> None:
    got = nix_eval(
        node_expr(
            """{ pkgs, lib, ... }: {
          imports = [ """
            + COLMENA_LIKE
            + """ ];
          nixpkgs.overlays = [ (final: prev: { greeting = prev.greeting + "+node"; hello = prev.hello // { tagged = true; }; }) ];
          nixpkgs.config = { shared = "node"; nested.b = 2; };
          environment.etc.greeting.text = pkgs.greeting;
        }""",
            attr="config",
            extra="",
        ).replace(
            "in node.config",
            "in { g = node.config.environment.etc.greeting.text; c = node.pkgs.config; "
            "t = node.pkgs.hello.tagged; s = node.config.nixpkgs.system; }",
        )
    )
    assert got["g"] == "meta+node"
    assert got["c"] == {"fromMeta": True, "shared": "node", "nested": {"a": 1, "b": 2}}
    assert got["t"] is True and got["s"] == "x86_64-linux"


def test_cross_system_node_evaluates() -> None:
    drv = nix_eval(
        node_expr(
            '{ nixpkgs.system = "armv5tel-linux"; networking.hostName = "arm"; }',
            attr="config.system.build.toplevel.drvPath",
        ),
        read_write=True,
    )
    assert drv.endswith("-nixos-system-arm-23.11.standin.drv")


def test_assertions_fail_with_message_and_warnings_trace() -> None:
    err = nix_eval_error(
        node_expr(
            '{ assertions = [ { assertion = false; message = "keys need a source"; } { assertion = true; message = "ok"; } ]; }',
            attr="config.system.build.toplevel.drvPath",
        )
    )
    assert "Failed assertions:\n" in err and "- keys need a source" in err and "- ok" not in err
    res = subprocess.run(
        [
            "nix-instantiate",
            *NIX_OPTS,
            "--eval",
            "--json",
            "-E",
            node_expr(
                '{ warnings = [ "mind the gap" ]; }', attr="config.system.build.toplevel.drvPath"
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0 and "warning: mind the gap" in res.stderr


HOST = """{ pkgs, lib, config, ... }: {
  networking.hostName = "alpha";
  environment.systemPackages = [ pkgs.hello pkgs.git ];
  environment.etc."motd".text = "hello from alpha";
  environment.etc."app/secret.conf" = { text = "s3cret"; mode = "0600"; };
  environment.etc."disabled".text = "no";
  environment.etc."disabled".enable = false;
  users.users.alice = { isNormalUser = true; extraGroups = [ "wheel" ]; };
  users.groups.ops.members = [ "alice" ];
  services.nginx.enable = true;
  services.foo.bar.baz = 1;
  systemd.services.web = { after = [ "network.target" ]; serviceConfig.Restart = "always"; path = [ pkgs.inotify-tools ]; };
  systemd.paths.web-key = { wantedBy = [ "paths.target" ]; pathConfig.PathExists = "/run/keys/web"; };
  system.activationScripts.zz-marker = lib.stringAfter [ "etc" ] ''
    cat "$STANDIN_ROOT/etc/motd" > "$STANDIN_ROOT/run/standin/marker"
  '';
  system.activationScripts.aa-first = "echo first >> \\"$STANDIN_ROOT/run/standin/order\\"";
  STANDIN_EXTRA
}"""


def host(extra: str = "") -> str:
    return HOST.replace("STANDIN_EXTRA", extra)


def test_second_definition_of_unit_lists_concatenates() -> None:
    got = nix_eval(
        node_expr(
            host('imports = [ { systemd.services.web.after = [ "db.service" ]; } ];'),
            attr="config.systemd.services.web.after",
        )
    )
    assert sorted(got) == ["db.service", "network.target"]
    assert set(got) == {"network.target", "db.service"}


@pytest.fixture(scope="module")
def toplevel() -> Path:
    return nix_build(node_expr(host()))


def test_toplevel_contents(toplevel: Path) -> None:
    assert toplevel.name.endswith("-nixos-system-alpha-23.11.standin")
    assert os.access(toplevel / "bin" / "switch-to-configuration", os.X_OK)
    assert os.access(toplevel / "activate", os.X_OK)
    assert (toplevel / "etc" / "motd").read_text() == "hello from alpha"
    assert (toplevel / "etc" / "app" / "secret.conf").read_text() == "s3cret"
    assert not (toplevel / "etc" / "disabled").exists()
    assert (toplevel / "nixos-version").read_text().strip() == "23.11.standin"
    assert (toplevel / "system").read_text() == "x86_64-linux"
    assert (
        subprocess.run(
            [toplevel / "sw" / "bin" / "hello"], capture_output=True, text=True, check=False
        ).stdout
        == "hello 2.12\n"
    )
    assert (toplevel / "sw" / "bin" / "git").exists()
    assert json.loads((toplevel / "services.json").read_text()) == {
        "foo": {"bar": {"baz": 1}},
        "nginx": {"enable": True},
    }
    web = json.loads((toplevel / "systemd" / "web.service.json").read_text())
    assert web["after"] == ["network.target"] and web["serviceConfig"] == {"Restart": "always"}
    assert web["path"][0].endswith("-inotify-tools-4.23.9.0")
    assert json.loads((toplevel / "systemd" / "web-key.path.json").read_text())["pathConfig"] == {
        "PathExists": "/run/keys/web"
    }
    users = json.loads((toplevel / "users.json").read_text())
    assert (
        users["users"]["alice"]["home"] == "/home/alice"
        and users["users"]["alice"]["group"] == "users"
    )
    activate = (toplevel / "activate").read_text()
    order = [activate.index(f"snippet {n}:") for n in ("users", "groups", "etc", "zz-marker")]
    assert order == sorted(order)


def test_closure_has_versioned_package_paths(toplevel: Path) -> None:
    closure = subprocess.run(
        ["nix-store", "-qR", str(toplevel)], capture_output=True, text=True, check=True
    ).stdout.split()
    names = {p.split("-", 1)[1] for p in closure}
    assert {
        "hello-2.12",
        "git-2.42.0",
        "curl-8.4.0",
        "openssl-3.0.12",
        "inotify-tools-4.23.9.0",
    } <= names
    assert (toplevel / "packages").read_text().count("/nix/store/") == 2


def run_switch(
    toplevel: Path, goal: str, root: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STANDIN_ROOT=str(root))
    return subprocess.run(
        [str(toplevel / "bin" / "switch-to-configuration"), goal],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def test_switch_to_configuration_goals(toplevel: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dry = run_switch(toplevel, "dry-activate", root)
    assert dry.returncode == 0, dry.stderr
    assert "would write /etc/motd" in dry.stdout
    assert not (root / "run" / "current-system").exists() and not (root / "etc").exists()

    test = run_switch(toplevel, "test", root)
    assert test.returncode == 0, test.stderr
    assert os.readlink(root / "run" / "current-system") == str(toplevel)
    assert (root / "etc" / "motd").read_text() == "hello from alpha"
    secret = root / "etc" / "app" / "secret.conf"
    assert secret.read_text() == "s3cret" and (secret.stat().st_mode & 0o777) == 0o600
    assert (root / "run" / "standin" / "marker").read_text() == "hello from alpha"
    accounts = (root / "run" / "standin" / "accounts").read_text()
    assert (
        "group ops" in accounts
        and "user alice group=users home=/home/alice extraGroups=wheel" in accounts
    )
    assert not (root / "nix" / "var" / "nix" / "profiles" / ".standin-boot-default").exists()

    boot = run_switch(toplevel, "boot", root)
    assert boot.returncode == 0, boot.stderr
    assert os.readlink(root / "nix" / "var" / "nix" / "profiles" / ".standin-boot-default") == str(
        toplevel
    )

    sw = run_switch(toplevel, "switch", root)
    assert sw.returncode == 0, sw.stderr
    log = (root / "run" / "standin" / "activations.log").read_text().splitlines()
    assert [line.split()[0] for line in log] == ["dry-activate", "test", "boot", "switch"]
    assert all(line.split()[1] == str(toplevel) and line.split()[2].isdigit() for line in log)

    bad = run_switch(toplevel, "nonsense", root)
    assert bad.returncode == 1


def test_fault_injection_fail_and_hang(tmp_path: Path) -> None:
    failing = nix_build(
        node_expr(
            '{ networking.hostName = "bad"; standin.activation.fail = true; standin.activation.hangSeconds = 1; }'
        )
    )
    root = tmp_path / "r"
    root.mkdir()
    import time

    start = time.monotonic()
    res = run_switch(failing, "switch", root)
    assert time.monotonic() - start >= 1
    assert res.returncode == 1 and "standin.activation.fail" in res.stderr
    assert not (root / "run" / "current-system").exists()
    assert not (root / "nix" / "var" / "nix" / "profiles" / ".standin-boot-default").exists()
    assert (root / "run" / "standin" / "activations.log").read_text().startswith("switch ")
    opts = nix_eval(node_expr("{ }", attr="config.standin.activation"))
    assert opts == {"fail": False, "hangSeconds": 0, "cutSsh": False, "blockLogins": 0}


def test_failing_snippet_exits_2(tmp_path: Path) -> None:
    top = nix_build(
        node_expr('{ networking.hostName = "snip"; system.activationScripts.broken = "false"; }')
    )
    res = run_switch(top, "test", tmp_path)
    assert res.returncode == 2 and "snippet 'broken' failed" in res.stderr
    assert os.readlink(tmp_path / "run" / "current-system") == str(top)


def test_colmena_style_modules_and_unchecked_nodes() -> None:
    """Colmena's own option/key modules (verbatim patterns) evaluate against the stand-in."""
    got = nix_eval(
        f"""
      let
        lib = {LIB};
        evalConfig = import {FIXTURE}/nixos/lib/eval-config.nix;
        deploymentOptions = {{ name, lib, ... }}: let inherit (lib) types; in {{
          options.deployment = {{
            targetHost = lib.mkOption {{ type = types.nullOr types.str; default = name; }};
            targetPort = lib.mkOption {{ type = types.nullOr types.ints.unsigned; default = null; }};
            tags = lib.mkOption {{ type = types.listOf types.str; default = [ ]; }};
            keys = lib.mkOption {{
              default = {{ }};
              type = types.attrsOf (types.submodule ({{ name, config, ... }}: {{
                options = {{
                  name = lib.mkOption {{ type = types.str; default = name; }};
                  text = lib.mkOption {{ type = types.nullOr types.str; default = null; }};
                  keyCommand = lib.mkOption {{ default = null;
                    type = types.nullOr (types.addCheck (types.listOf types.str) (l: builtins.length l > 0)); }};
                  keyFile = lib.mkOption {{ default = null; type = types.nullOr types.path;
                    apply = v: if v == null then null else toString v; }};
                  destDir = lib.mkOption {{ type = types.path; default = "/run/keys"; }};
                  path = lib.mkOption {{ type = types.path; default = "${{config.destDir}}/${{config.name}}"; internal = true; }};
                  user = lib.mkOption {{ type = types.str; default = "root"; }};
                  group = lib.mkOption {{ type = types.str; default = "root"; }};
                  uploadAt = lib.mkOption {{ type = types.enum [ "pre-activation" "post-activation" ]; default = "pre-activation"; }};
                }};
              }}));
            }};
          }};
        }};
        keyModule = {{ pkgs, lib, config, ... }}: {{
          system.activationScripts.colmena-chown-keys = lib.mkIf (config.deployment.keys != {{ }})
            (lib.stringAfter (if config.system.activationScripts ? groups then [ "groups" ] else [ "users" ]) "true");
          systemd.paths = lib.mapAttrs' (name: val: {{ name = "${{name}}-key"; value = {{ wantedBy = [ "paths.target" ]; pathConfig.PathExists = val.path; }}; }}) config.deployment.keys;
          systemd.services = lib.mapAttrs' (name: val: {{ name = "${{name}}-key"; value = {{ path = [ pkgs.inotifyTools ]; script = "inotifywait ${{val.path}}"; }}; }}) config.deployment.keys;
          assertions = lib.mapAttrsToList (key: opts: {{
            assertion = builtins.length (builtins.filter (x: x != null) [ opts.text opts.keyCommand opts.keyFile ]) == 1;
            message = "Exactly one of text, keyCommand and keyFile must be set for ${{key}}.";
          }}) config.deployment.keys;
        }};
        hive = {{
          defaults = {{ deployment.tags = [ "all" ]; }};
          "web-1.example" = {{ name, nodes, ... }}: {{
            deployment.tags = [ "web" ];
            deployment.keys.tls = {{ text = "k"; user = "nginx"; }};
            networking.hostName = "web-1";
            environment.etc.peer.text = nodes.db.config.networking.hostName;
          }};
          db = {{ networking.hostName = "db"; deployment.targetPort = 2222; }};
        }};
        names = [ "web-1.example" "db" ];
        evalNode = name: extra: evalConfig {{
          system = "x86_64-linux";
          modules = [ keyModule deploymentOptions hive.defaults hive.${{name}} ] ++ extra;
          specialArgs = {{ inherit name; nodes = unchecked; }};
        }};
        unchecked = lib.genAttrs names (n: evalNode n [ {{ _module.check = false; }} ]);
        checked = lib.genAttrs names (n: evalNode n [ ]);
      in {{
        deployment = lib.mapAttrs (n: v: {{ inherit (v.config.deployment) targetHost targetPort tags; }}) checked;
        peer = checked."web-1.example".config.environment.etc.peer.text;
        keyPath = checked."web-1.example".config.deployment.keys.tls.path;
        units = builtins.attrNames checked."web-1.example".config.systemd.paths;
        drvs = lib.mapAttrs (n: v: v.config.system.build.toplevel.drvPath) checked;
      }}
    """,
        read_write=True,
    )
    assert got["deployment"]["db"] == {"targetHost": "db", "targetPort": 2222, "tags": ["all"]}
    assert sorted(got["deployment"]["web-1.example"]["tags"]) == ["all", "web"]
    assert got["deployment"]["web-1.example"]["targetHost"] == "web-1.example"
    assert got["peer"] == "db" and got["keyPath"] == "/run/keys/tls" and got["units"] == ["tls-key"]
    assert got["drvs"]["db"].endswith("-nixos-system-db-23.11.standin.drv")


def test_bench_heavy_via_modules_path() -> None:
    got = nix_eval(
        node_expr(
            '{ modulesPath, ... }: { imports = [ (modulesPath + "/bench-heavy.nix") ]; networking.hostName = "heavy"; }',
            attr="config",
        ).replace(
            "in node.config",
            "in { n = builtins.length (builtins.attrNames node.config.bench.heavy); "
            "s = node.config.bench.heavy.opt6.summary; "
            'etc = builtins.stringLength node.config.environment.etc."bench-heavy.txt".text; '
            "drv = node.config.system.build.toplevel.drvPath; }",
        ),
        read_write=True,
    )
    assert got["n"] == 600
    assert got["s"].startswith("opt6:18:even,t6:")
    assert got["etc"] > 100_000
    assert got["drv"].endswith("-nixos-system-heavy-23.11.standin.drv")


def test_cut_ssh_kills_only_sessions_in_own_mount_namespace(tmp_path: Path) -> None:
    """cutSsh kills sshd processes whose parent is an sshd (sessions), not the listener.

    Run in a private mount namespace, with a fake `sshd` (a copy of /bin/sh), so that
    no real sshd of this machine can be touched.
    """
    if (
        subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False).returncode
        != 0
    ):
        pytest.skip("unshare --mount not permitted")
    top = nix_build(node_expr('{ networking.hostName = "cut"; standin.activation.cutSsh = true; }'))
    fake = tmp_path / "sshd"
    fake.write_bytes(Path("/bin/sh").read_bytes())
    fake.chmod(0o755)
    root = tmp_path / "root"
    root.mkdir()
    script = textwrap.dedent(f"""
        count() {{
          n=0; me=$(readlink /proc/$$/ns/mnt)
          for d in /proc/[0-9]*; do
            [ "$(cat $d/comm 2>/dev/null)" = sshd ] || continue
            [ "$(readlink $d/ns/mnt 2>/dev/null)" = "$me" ] && n=$((n+1))
          done
          echo $n
        }}
        {fake} -c '{fake} -c "sleep 3; true" & sleep 3; true' &
        listener=$!
        sleep 0.3
        echo "before=$(count)"
        STANDIN_ROOT={root} {top}/bin/switch-to-configuration test
        echo "rc=$?"
        sleep 0.1
        echo "after=$(count)"
        kill -0 $listener && echo listener-alive
    """)
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "before=2" in res.stdout, res.stdout + res.stderr
    assert "rc=0" in res.stdout and "after=1" in res.stdout and "listener-alive" in res.stdout, (
        res.stdout + res.stderr
    )
    assert os.readlink(root / "run" / "current-system") == str(top)
