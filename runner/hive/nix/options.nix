# Waggle's option declarations: the hive's `meta` options and every node's
# `deployment.*` options, with Colmena's names, types and defaults so that a
# hive written for Colmena evaluates unchanged.
{ lib }:
let
  inherit (lib) mkOption types;

  keyType = types.submodule ({ name, config, ... }: {
    options = {
      name = mkOption {
        description = "File name of the key on the node.";
        type = types.str;
        default = name;
      };
      text = mkOption {
        description = "Content of the key. Exactly one of text, keyFile and keyCommand must be set.";
        type = types.nullOr types.str;
        default = null;
      };
      keyFile = mkOption {
        description = "A file on the deploying machine whose content is the key. Never copied into the Nix store.";
        type = types.nullOr types.path;
        default = null;
        apply = v: if v == null then null else toString v;
      };
      keyCommand = mkOption {
        description = "A command (argv list) run on the deploying machine whose standard output is the key.";
        type = types.nullOr (types.nonEmptyListOf types.str);
        default = null;
      };
      destDir = mkOption {
        description = "Directory on the node the key is written to.";
        type = types.path;
        default = "/run/keys";
      };
      path = mkOption {
        description = "Full path of the key on the node (read-only).";
        type = types.path;
        default = "${config.destDir}/${config.name}";
        internal = true;
      };
      user = mkOption {
        description = "Owner of the key file.";
        type = types.str;
        default = "root";
      };
      group = mkOption {
        description = "Group of the key file.";
        type = types.str;
        default = "root";
      };
      permissions = mkOption {
        description = "Mode of the key file, as chmod takes it.";
        type = types.str;
        default = "0600";
      };
      uploadAt = mkOption {
        description = "When the key is uploaded: before or after activation.";
        type = types.enum [ "pre-activation" "post-activation" ];
        default = "pre-activation";
      };
    };
  });

  # Health checks in morph's format (morph's names and defaults), so that a
  # morph hive's `deployment.healthChecks` carries over unchanged.
  periodOption = mkOption {
    description = "Seconds between two tries of the check.";
    type = types.numbers.positive;
    default = 2;
  };
  timeoutOption = mkOption {
    description = "Seconds the check may take in all to pass (tries included) before it fails.";
    type = types.numbers.positive;
    default = 5;
  };

  cmdCheckType = types.submodule {
    options = {
      description = mkOption {
        description = "What the check checks, as reports name it.";
        type = types.str;
      };
      cmd = mkOption {
        description = "The command (argv list) run on the node as root; exit status 0 passes.";
        type = types.nonEmptyListOf types.str;
      };
      period = periodOption;
      timeout = timeoutOption;
    };
  };

  httpCheckType = types.submodule {
    options = {
      description = mkOption {
        description = "What the check checks, as reports name it.";
        type = types.str;
      };
      scheme = mkOption {
        description = "http, or https (the certificate is verified unless insecureSSL).";
        type = types.enum [ "http" "https" ];
        default = "http";
      };
      host = mkOption {
        description = "The host to ask; null means the node's targetHost.";
        type = types.nullOr types.str;
        default = null;
      };
      port = mkOption {
        description = "The port to ask.";
        type = types.ints.between 1 65535;
      };
      path = mkOption {
        description = "The path of the GET request, starting with /.";
        type = types.str;
        default = "/";
      };
      headers = mkOption {
        description = "Extra request headers (Host included).";
        type = types.attrsOf types.str;
        default = { };
      };
      period = periodOption;
      timeout = timeoutOption;
      insecureSSL = mkOption {
        description = "Accept any certificate for https.";
        type = types.bool;
        default = false;
      };
    };
  };
in
{
  metaOptions = { ... }: {
    options = {
      name = mkOption {
        description = "Name of the hive.";
        type = types.str;
        default = "hive";
      };
      description = mkOption {
        description = "A short description of the hive.";
        type = types.str;
        default = "A Colmena Hive";
      };
      nixpkgs = mkOption {
        description = "The pinned Nixpkgs: a path, a function, or an initialised package set.";
        type = types.unspecified;
        default = null;
      };
      nodeNixpkgs = mkOption {
        description = "Per-node Nixpkgs pins.";
        type = types.attrsOf types.unspecified;
        default = { };
      };
      specialArgs = mkOption {
        description = "Extra special arguments for every node's module evaluation.";
        type = types.attrsOf types.unspecified;
        default = { };
      };
      nodeSpecialArgs = mkOption {
        description = "Per-node special arguments, merged over specialArgs.";
        type = types.attrsOf types.unspecified;
        default = { };
      };
      machinesFile = mkOption {
        description = "A Nix machines file used as builders for local evaluation and builds.";
        type = types.nullOr types.path;
        default = null;
        apply = v: if v == null then null else toString v;
      };
      allowApplyAll = mkOption {
        description = "Whether deploying without --on is allowed.";
        type = types.bool;
        default = true;
      };
    };
  };

  deploymentOptions = { name, ... }: {
    options.deployment = {
      targetHost = mkOption {
        description = "The host to deploy to over SSH; null means SSH deployment is impossible.";
        type = types.nullOr types.str;
        default = name;
      };
      targetPort = mkOption {
        description = "The SSH port; null means 22 or what ssh_config says.";
        type = types.nullOr types.port;
        default = null;
      };
      targetUser = mkOption {
        description = "The SSH user; anything but root runs remote commands through privilegeEscalationCommand.";
        type = types.nullOr types.str;
        default = "root";
      };
      allowLocalDeployment = mkOption {
        description = "Whether apply-local may deploy this node on the machine Waggle runs on.";
        type = types.bool;
        default = false;
      };
      buildOnTarget = mkOption {
        description = "Build the system on the node instead of the deploying machine.";
        type = types.bool;
        default = false;
      };
      tags = mkOption {
        description = "Tags for --on @tag.";
        type = types.listOf types.str;
        default = [ ];
      };
      keys = mkOption {
        description = "Secrets uploaded to the node out of band, never through the Nix store.";
        type = types.attrsOf keyType;
        default = { };
      };
      replaceUnknownProfiles = mkOption {
        description = "Whether to replace a system profile the deploying machine does not know.";
        type = types.bool;
        default = true;
      };
      privilegeEscalationCommand = mkOption {
        description = "Prefix for remote commands when targetUser is not root.";
        type = types.listOf types.str;
        default = [ "sudo" "-H" "--" ];
      };
      sshOptions = mkOption {
        description = "Extra ssh options for this node.";
        type = types.listOf types.str;
        default = [ ];
      };
      healthChecks = {
        cmd = mkOption {
          description = "Commands run on the node after activation, each retried every period seconds until it passes or its timeout is spent.";
          type = types.listOf cmdCheckType;
          default = [ ];
        };
        http = mkOption {
          description = "HTTP GET requests from the deploying machine after activation; a 2xx answer passes, retried as cmd checks are.";
          type = types.listOf httpCheckType;
          default = [ ];
        };
      };
    };
  };
}
