# Waggle's hive evaluator. It takes a raw hive (the attribute set of a
# hive.nix, or a flake's `colmena` output) and returns an evaluated hive with
# Colmena's published interface (schema "v0.5"), so the rest of Waggle reads a
# raw hive, a flake's `colmenaHive` and a `nixosConfigurations` adapter alike.
{ rawHive
, hermetic ? false  # true for flakes: <nixpkgs> may not be used
}:
let
  inherit (builtins) attrNames elem filter hasAttr listToAttrs typeOf;

  reservedNames = [ "defaults" "network" "meta" ];

  uncheckedHive =
    if typeOf rawHive == "lambda" || rawHive ? __functor then rawHive { }
    else if typeOf rawHive == "set" then rawHive
    else throw "waggle: the hive must evaluate to an attribute set or a function with defaulted arguments, not a ${typeOf rawHive}";

  uncheckedUserMeta =
    if uncheckedHive ? meta && uncheckedHive ? network then
      throw "waggle: the hive sets both `meta` and `network`; `network` is only an alias of `meta`, keep one"
    else uncheckedHive.meta or uncheckedHive.network or { };

  # Turns the forms meta.nixpkgs may take into an initialised package set.
  mkNixpkgs = optionName: value:
    let
      uninitialised = what: throw ''
        waggle: ${optionName} is ${what}; in a flake it must be an initialised package set, e.g.
          ${optionName} = import nixpkgs { system = "x86_64-linux"; };'';
    in
    if typeOf value == "path" || typeOf value == "string" || (typeOf value == "set" && value ? outPath && !(value ? lib)) then
      (if hermetic then uninitialised "a path" else mkNixpkgs optionName (import value))
    else if typeOf value == "lambda" then
      (if hermetic then uninitialised "a function" else value { overlays = [ ]; })
    else if typeOf value == "set" then
      (if value ? outputs then uninitialised "an uninitialised flake input" else value)
    else throw "waggle: ${optionName} must be a path to Nixpkgs, a Nixpkgs function or an initialised package set, not a ${typeOf value}";

  nixpkgs =
    if uncheckedUserMeta ? nixpkgs && uncheckedUserMeta.nixpkgs != null then mkNixpkgs "meta.nixpkgs" uncheckedUserMeta.nixpkgs
    else if hermetic then throw "waggle: meta.nixpkgs must be set in a flake hive"
    else mkNixpkgs "meta.nixpkgs" (import <nixpkgs>);

  lib = nixpkgs.lib;
  options = import ./options.nix { inherit lib; };
  modules = import ./modules.nix;

  meta = (lib.evalModules {
    modules = [ options.metaOptions { _file = "meta"; config = uncheckedUserMeta; } ];
  }).config;

  defaults = uncheckedHive.defaults or { };

  nodeNames = filter (name: !(elem name reservedNames)) (attrNames uncheckedHive);

  configsFor = name:
    let value = uncheckedHive.${name}; in
    if typeOf value == "list" then value else [ value ];

  evalNode = name: extraModules:
    let
      npkgs =
        if hasAttr name meta.nodeNixpkgs
        then mkNixpkgs "meta.nodeNixpkgs.${name}" meta.nodeNixpkgs.${name}
        else nixpkgs;
      evalConfig = import (npkgs.path + "/nixos/lib/eval-config.nix");
      # The meta package set's overlays and config come first; the node's own
      # nixpkgs.* settings merge after them and win.
      nixpkgsModule = { lib, ... }: {
        nixpkgs.overlays = lib.mkBefore (npkgs.overlays or [ ]);
        nixpkgs.config = lib.mkBefore (npkgs.config or { });
      };
    in
    evalConfig {
      inherit (npkgs) system;
      modules = [
        nixpkgsModule
        modules.assertionModule
        modules.keyChownModule
        modules.keyServiceModule
        options.deploymentOptions
        { _file = "hive defaults"; imports = [ defaults ]; }
      ] ++ extraModules ++ map (m: { _file = "hive node ${name}"; imports = [ m ]; }) (configsFor name);
      specialArgs = { inherit name; nodes = uncheckedNodes; }
        // meta.specialArgs
        // (meta.nodeSpecialArgs.${name} or { });
    };

  # What modules see as `nodes`: a second, lazily evaluated copy of every node
  # without unknown-option checks, as Colmena does.
  uncheckedNodes = listToAttrs (map (name: {
    inherit name;
    value = evalNode name [ { _module.check = false; } ];
  }) nodeNames);

  nodes = listToAttrs (map (name: {
    inherit name;
    value = evalNode name [ ];
  }) nodeNames);

  toplevel = lib.mapAttrs (_: node: node.config.system.build.toplevel) nodes;
  deploymentConfig = lib.mapAttrs (_: node: node.config.deployment) nodes;
  deploymentConfigSelected = names:
    listToAttrs (map (name: { inherit name; value = nodes.${name}.config.deployment; }) names);
  evalSelected = names: listToAttrs (map (name: { inherit name; value = toplevel.${name}; }) names);
in
{
  __schema = "v0.5";
  inherit nodes toplevel deploymentConfig deploymentConfigSelected evalSelected;
  evalAll = evalSelected nodeNames;
  evalSelectedDrvPaths = names: lib.mapAttrs (_: t: t.drvPath) (evalSelected names);
  introspect = f: f { inherit lib; pkgs = nixpkgs; nodes = uncheckedNodes; };
  meta = meta;
  metaConfig = { inherit (meta) name description machinesFile allowApplyAll; };
  nixosModules = { inherit (options) deploymentOptions metaOptions; } // modules;
}
