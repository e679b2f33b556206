# The queries Waggle runs against an evaluated hive. They use only the hive's
# published interface (schema "v0.5"), so they work the same for Waggle's own
# evaluator, a flake's `colmenaHive` and the nixosConfigurations adapter.
hive:
let
  inherit (builtins) attrNames listToAttrs map seq trace tryEval;
  defaultMeta = { name = "hive"; description = "A Colmena Hive"; machinesFile = null; allowApplyAll = true; };
in
assert hive.__schema or null == "v0.5"
  || throw "waggle: the hive's schema is ${toString (hive.__schema or "missing")}, Waggle reads schema v0.5";
{
  nodeNames = attrNames hive.nodes;

  # Colmena's makeHive exposes `meta`, newer ones `metaConfig`.
  metaConfig = defaultMeta // (hive.metaConfig or (builtins.intersectAttrs defaultMeta (hive.meta or { })));

  deployment = names: hive.deploymentConfigSelected names;

  # Evaluates each named node's toplevel. A node whose evaluation throws is
  # reported as { error = true; } (Waggle re-evaluates it alone for its
  # message); other errors end the process and Waggle bisects the chunk. A
  # trace line marks each finished node so Waggle can time nodes as they go.
  evalChunk = names:
    let selected = hive.evalSelected names; in
    listToAttrs (map (name:
      let
        t = selected.${name};
        r = tryEval (seq t.drvPath { drv = t.drvPath; out = t.outPath; });
      in {
        inherit name;
        value = seq r.success (trace "waggle-node-done ${name}" (if r.success then r.value else { error = true; }));
      }) names);

  # Without tryEval, so the node's own error message reaches its report.
  # (Keys are not named outPath: a set with outPath prints as a string in JSON.)
  evalOne = name: let t = (hive.evalSelected [ name ]).${name}; in { drv = t.drvPath; out = t.outPath; };

  introspect = f: hive.introspect f;
}
