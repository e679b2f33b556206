# Modules Waggle adds to every node, with the behaviour Colmena's own modules
# have, because hives rely on it:
# - assertionModule: every key has exactly one source, and no two keys are
#   written to the same file.
# - keyChownModule: an activation snippet, ordered after user and group
#   creation, that gives pre-activation keys to their owners once they exist
#   (chown-key.sh after dest-dir-lib.sh: never through a symlink, never in a
#   directory others can change).
# - keyServiceModule: `<attr>-key.path` / `<attr>-key.service` units, named
#   after the key's attribute as Colmena names them, that are active while the
#   key file exists (NixOps-compatible). A unit started before its key is
#   uploaded waits for the file.
let
  # "/run//keys/./x" -> "/run/keys/x": how two destDirs can name one directory.
  normalise = lib: p:
    "/" + lib.concatStringsSep "/" (lib.filter (c: c != "" && c != ".") (lib.splitString "/" p));
in
{
  assertionModule = { config, lib, name, ... }:
    let
      keys = config.deployment.keys;
      attrs = lib.attrNames keys;
      pathOf = attr: normalise lib keys.${attr}.path;
      # For each key, the keys before it (by attribute name) that write the same file.
      clashes = attr: lib.filter (other: other < attr && pathOf other == pathOf attr) attrs;
    in {
      assertions = lib.mapAttrsToList (attr: key:
        let
          sources = lib.filter (s: s != null) [ key.text key.keyFile key.keyCommand ];
        in {
          assertion = builtins.length sources == 1;
          message = "deployment.keys.${attr}: exactly one of text, keyFile and keyCommand must be set (found ${toString (builtins.length sources)})";
        }) keys
      ++ map (attr:
        let earlier = clashes attr; in {
          assertion = earlier == [ ];
          message = "node ${name}: deployment.keys.${builtins.head earlier} and deployment.keys.${attr} are both written to ${pathOf attr}";
        }) attrs;
    };

  keyChownModule = { config, lib, ... }:
    let
      preKeys = lib.filter (k: k.uploadAt == "pre-activation") (lib.attrValues config.deployment.keys);
      scripts = config.system.activationScripts;
      deps = lib.filter (d: scripts ? ${d}) [ "users" "groups" ];
      chownOne = key: ''
        waggle_chown_key ${lib.escapeShellArg key.path} ${lib.escapeShellArg "${key.user}:${key.group}"} || failed=1
      '';
    in {
      system.activationScripts.waggle-chown-keys = lib.mkIf (preKeys != [ ]) {
        inherit deps;
        text = ''
          ${builtins.readFile ./dest-dir-lib.sh}
          ${builtins.readFile ./chown-key.sh}
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
    systemd.paths = lib.mapAttrs' (attr: key: lib.nameValuePair "${attr}-key" {
      wantedBy = [ "paths.target" ];
      pathConfig = {
        PathExists = key.path;
        PathChanged = key.path;
        Unit = "${attr}-key.service";
      };
    }) config.deployment.keys;

    systemd.services = lib.mapAttrs' (attr: key:
      let
        path = lib.escapeShellArg key.path;
        dir = lib.escapeShellArg (dirOf key.path);
      in lib.nameValuePair "${attr}-key" {
        enable = true;
        description = "Key ${attr} (${key.path}) is present";
        serviceConfig = {
          Type = "simple";
          Restart = "on-failure";
          RestartSec = 1;
          # Waiting for the key is the unit's start: it may take until the next deploy.
          TimeoutStartSec = "infinity";
          TimeoutStopSec = 10;
        };
        path = [ pkgs.inotify-tools ];
        # Until the key exists the unit is starting, so units ordered after it wait
        # too, instead of it failing and restarting into systemd's start limit.
        # inotifywait wakes it at once; its timeout and `sleep 1` (no directory yet,
        # or no inotify) bound a missed event.
        preStart = ''
          while [ ! -e ${path} ]; do
            if [ -d ${dir} ]; then
              inotifywait -qq -t 5 -e create -e moved_to -e attrib -- ${dir} || [ $? = 2 ] || sleep 1
            else
              sleep 1
            fi
          done
        '';
        # Active while the key exists: ends (successfully) when it is deleted or
        # replaced; the path unit starts it again when a key is there.
        script = ''
          inotifywait -qq -e delete_self -- ${path} || [ ! -e ${path} ]
        '';
      }) config.deployment.keys;
  };
}
