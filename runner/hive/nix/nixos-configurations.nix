# Adapter: a flake's plain `nixosConfigurations` as a hive with Colmena's
# interface (schema "v0.5"). Each configuration is a node; its deployment
# options are the defaults unless the configuration declares `deployment`
# itself (for instance by importing Waggle's or Colmena's deployment module).
configurations:
let
  inherit (builtins) attrNames listToAttrs mapAttrs map;
  defaultsFor = name: {
    targetHost = name;
    targetPort = null;
    targetUser = "root";
    allowLocalDeployment = false;
    buildOnTarget = false;
    tags = [ ];
    keys = { };
    replaceUnknownProfiles = true;
    privilegeEscalationCommand = [ "sudo" "-H" "--" ];
    sshOptions = [ ];
  };
  deploymentOf = name: c: defaultsFor name // (c.config.deployment or { });
  toplevel = mapAttrs (_: c: c.config.system.build.toplevel) configurations;
  evalSelected = names: listToAttrs (map (name: { inherit name; value = toplevel.${name}; }) names);
  anyConfig = builtins.head (builtins.attrValues configurations ++ [ null ]);
in
{
  __schema = "v0.5";
  nodes = configurations;
  inherit toplevel evalSelected;
  deploymentConfig = mapAttrs deploymentOf configurations;
  deploymentConfigSelected = names:
    listToAttrs (map (name: { inherit name; value = deploymentOf name configurations.${name}; }) names);
  evalAll = evalSelected (attrNames configurations);
  evalSelectedDrvPaths = names: mapAttrs (_: t: t.drvPath) (evalSelected names);
  introspect = f: f {
    nodes = configurations;
    pkgs = if anyConfig == null then { } else anyConfig.pkgs;
    lib = if anyConfig == null then { } else anyConfig.pkgs.lib;
  };
  metaConfig = { name = "nixosConfigurations"; description = "A flake's nixosConfigurations"; machinesFile = null; allowApplyAll = true; };
}
