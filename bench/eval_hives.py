"""Generated hives for the evaluation benchmark (bench/eval_chunks.py), on the stand-in.

- "shared": FILES attribute-set files of ATTRS attributes each, imported by every node,
  which reads one attribute of each; OPTIONS options per node. Parsing the files (once per
  evaluator process) dominates: start-up.
- "heavy": every node imports the stand-in's bench-heavy.nix scaled to HEAVY_OPTIONS
  submodule options, each defined through several merged definitions and fed into the
  toplevel. The heap grows with every node and the garbage collector dominates.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "fixtures" / "nixpkgs"
FILES, ATTRS, OPTIONS = 60, 3000, 1000
HEAVY_OPTIONS = 1500

HIVE = """
let
  pkgs = import {standin} {{ }};
  node = i: {{
    name = "node-${{toString i}}";
    value = {{ name, ... }}: {{
      imports = [ {module} ];
      networking.hostName = name;
      environment.etc."node-id".text = "node ${{toString i}}\\n";
    }};
  }};
in
{{ meta.nixpkgs = pkgs; }} // builtins.listToAttrs (map node (builtins.genList (i: i + 1) {count}))
"""

SHARED_MODULE = """{{ lib, config, ... }}:
let data = map (i: import (./. + "/f${{toString i}}.nix")) (lib.range 0 {last}); in
{{
  options.bench.shared = {{
{options}
  }};
  config.bench.shared = lib.listToAttrs (lib.imap0 (i: d:
    lib.nameValuePair "o${{toString i}}" d."a${{toString (lib.mod (i * 7) {attrs})}}".value) data);
  config.environment.etc."shared.txt".text =
    lib.concatStringsSep "\\n" (lib.attrValues config.bench.shared);
}}
"""


def _shared_module(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(FILES):
        lines = (
            f'  a{a} = {{ value = "file {f} attribute {a}"; weight = {a};'
            f' tags = [ "t{a % 7}" "u{a % 11}" ]; }};'
            for a in range(ATTRS)
        )
        (directory / f"f{f}.nix").write_text("{\n" + "\n".join(lines) + "\n}\n")
    options = "\n".join(
        f'    o{i} = lib.mkOption {{ type = lib.types.str; default = "d{i}"; }};'
        for i in range(OPTIONS)
    )
    module = directory / "options.nix"
    module.write_text(SHARED_MODULE.format(last=FILES - 1, attrs=ATTRS, options=options))
    return module


def _heavy_module(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = (STANDIN / "nixos" / "modules" / "bench-heavy.nix").read_text()
    assert "count = 600;" in text
    module = directory / "heavy.nix"
    module.write_text(text.replace("count = 600;", f"count = {HEAVY_OPTIONS};"))
    return module


SHAPES = {"shared": _shared_module, "heavy": _heavy_module}


def write_shape(directory: Path, shape: str, count: int) -> Path:
    """Write a hive of `count` nodes of `shape` into `directory`; its path."""
    module = SHAPES[shape](directory / "modules")
    path = directory / "hive.nix"
    path.write_text(HIVE.format(standin=STANDIN, module=module, count=count))
    return path
