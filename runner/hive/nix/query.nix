# The queries Waggle runs against an evaluated hive. They use only the hive's
# published interface (schema "v0.5"), so they work the same for Waggle's own
# evaluator, a flake's `colmenaHive` and the nixosConfigurations adapter.
hive:
let
  inherit (builtins) attrNames deepSeq map mapAttrs seq trace tryEval;
  defaultMeta = { name = "hive"; description = "A Colmena Hive"; machinesFile = null; allowApplyAll = true; };
in
assert hive.__schema or null == "v0.5"
  || throw "waggle: the hive's schema is ${toString (hive.__schema or "missing")}, Waggle reads schema v0.5";
{
  nodeNames = attrNames hive.nodes;

  # Colmena's makeHive exposes `meta`, newer ones `metaConfig`.
  metaConfig = defaultMeta // (hive.metaConfig or (builtins.intersectAttrs defaultMeta (hive.meta or { })));

  deployment = names: hive.deploymentConfigSelected names;

  # The same, each node's settings forced on their own: { ok = settings; } or, when
  # tryEval caught a throw or an assertion, { error = true; } (Waggle then asks that node
  # alone for its message). Errors tryEval cannot catch end the process.
  deploymentEach = names:
    mapAttrs (_: d: let r = tryEval (deepSeq d d); in if r.success then { ok = r.value; } else { error = true; })
      (hive.deploymentConfigSelected names);

  # Evaluates the named nodes one after another, in the list's order (a list
  # is forced element by element; an attribute set would go by name). After
  # each node a trace line `waggle-node-done {"name":..,"drv":..,"out":..}`
  # (or "error":true when tryEval caught a throw) carries its result, so
  # Waggle has it the moment it is done and loses nothing if it stops the
  # process there. Errors tryEval cannot catch end the process: Waggle names
  # the first node without a line as the broken one.
  evalQueue = names:
    let selected = hive.evalSelected names; in
    map (name:
      let
        t = selected.${name};
        r = tryEval (seq t.drvPath { drv = t.drvPath; out = t.outPath; });
        done = builtins.toJSON ({ inherit name; } // (if r.success then r.value else { error = true; }));
      in trace "waggle-node-done ${done}" null) names;

  # Without tryEval, so the node's own error message reaches its report.
  # (Keys are not named outPath: a set with outPath prints as a string in JSON.)
  evalOne = name: let t = (hive.evalSelected [ name ]).${name}; in { drv = t.drvPath; out = t.outPath; };

  introspect = f: hive.introspect f;
}
