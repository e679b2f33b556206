# Modules Waggle adds to every node, with the behaviour Colmena's own modules
# have, because hives rely on it:
# - assertionModule: every key has exactly one source.
# - keyChownModule: an activation snippet, ordered after user and group
#   creation, that gives pre-activation keys to their owners once they exist.
# - keyServiceModule: `<name>-key.path` / `<name>-key.service` units that are
#   active while the key file exists (NixOps-compatible).
{
  assertionModule = { config, lib, ... }: {
    assertions = lib.mapAttrsToList (attr: key:
      let
        sources = lib.filter (s: s != null) [ key.text key.keyFile key.keyCommand ];
      in {
        assertion = builtins.length sources == 1;
        message = "deployment.keys.${attr}: exactly one of text, keyFile and keyCommand must be set (found ${toString (builtins.length sources)})";
      }) config.deployment.keys;
  };

  keyChownModule = { config, lib, ... }:
    let
      preKeys = lib.filter (k: k.uploadAt == "pre-activation") (lib.attrValues config.deployment.keys);
      scripts = config.system.activationScripts;
      deps = lib.filter (d: scripts ? ${d}) [ "users" "groups" ];
      chownOne = key: ''
        if [ -e ${lib.escapeShellArg key.path} ]; then
          chown ${lib.escapeShellArg "${key.user}:${key.group}"} ${lib.escapeShellArg key.path} || failed=1
        fi
      '';
    in {
      system.activationScripts.waggle-chown-keys = {
        inherit deps;
        text = ''
          failed=0
          ${lib.concatMapStrings chownOne preKeys}
          if [ "$failed" != 0 ]; then
            echo "waggle: failed to change the owner of one or more keys" >&2
            false
          fi
        '';
      };
    };

  keyServiceModule = { config, lib, pkgs, ... }: {
    systemd.paths = lib.mapAttrs' (attr: key: lib.nameValuePair "${key.name}-key" {
      wantedBy = [ "paths.target" ];
      pathConfig = {
        PathExists = key.path;
        PathChanged = key.path;
        Unit = "${key.name}-key.service";
      };
    }) config.deployment.keys;

    systemd.services = lib.mapAttrs' (attr: key: lib.nameValuePair "${key.name}-key" {
      enable = true;
      description = "Key ${key.name} is present";
      serviceConfig = {
        Type = "simple";
        Restart = "on-failure";
        TimeoutStopSec = 10;
        RestartSec = 1;
      };
      path = [ pkgs.inotify-tools ];
      script = ''
        if [ ! -e ${lib.escapeShellArg key.path} ]; then
          exit 1
        fi
        inotifywait -qq -e delete_self ${lib.escapeShellArg key.path} &
        if [ ! -e ${lib.escapeShellArg key.path} ]; then
          exit 0
        fi
        wait %1
      '';
    }) config.deployment.keys;
  };
}
