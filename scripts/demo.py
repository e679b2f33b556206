"""Waggle's demo: deploy the example hive to a local fleet of eight hosts.

1. Starts eight test hosts on this machine (OpenSSH sshd in their own mount
   namespaces, each with its own Nix store; see tests/fleet.py).
2. `waggle apply` deploys examples/hive.nix to all of them in parallel.
3. Changes one node's configuration and deploys again: only that host is
   activated, the others are reported unchanged.
4. Prints where the reports are and stops the fleet.

Run it through `bash scripts/demo.sh` (which sets everything up first). Needs root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fleet import Fleet, free_first_octet

EXAMPLE = ROOT / "examples" / "hive.nix"
NODES = ["bastion", "cache-1", "db-1", "db-2", "monitor", "web-1", "web-2", "web-3"]
CHANGED = """\
# The example hive with one change: web-2 gets a new message of the day.
let base = import {example}; in
base // {{
  web-2 = [ base.web-2 ({{ lib, ... }}: {{
    environment.etc."motd".text = lib.mkForce "web-2 was changed by the demo.\\n";
  }}) ];
}}
"""


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def waggle(*args: str, cwd: Path) -> int:
    argv = [sys.executable, "-m", "runner", *args]
    return subprocess.run(argv, cwd=cwd, check=False).returncode


def main() -> int:
    if os.geteuid() != 0:
        print(
            "demo: the local test fleet needs root (mount namespaces, port 22); run as root",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("NIX_CONFIG", "substituters =")
    work = Path(tempfile.mkdtemp(prefix="waggle-demo-"))
    reports = work / "reports"
    reports.mkdir()
    say(f"starting a fleet of {len(NODES)} hosts on 127.0.0.x")
    with Fleet.start(
        work / "fleet",
        len(NODES),
        names=NODES,
        first_octet=free_first_octet(len(NODES)),
        etc="overlay",
    ) as fleet:
        for host in fleet:
            print(f"  {host.name:8} {host.address}")
        common = ["--ssh-config", str(fleet.ssh_config)]

        say("deploying examples/hive.nix to every host")
        first = waggle(
            "-f",
            str(EXAMPLE),
            "apply",
            "switch",
            *common,
            "--junit",
            str(reports / "first.xml"),
            "--report-md",
            str(reports / "first.md"),
            cwd=work,
        )

        say("changing web-2's configuration and deploying again: only web-2 is activated")
        changed = work / "hive.nix"
        changed.write_text(CHANGED.format(example=EXAMPLE))
        second = waggle(
            "-f",
            str(changed),
            "apply",
            "switch",
            *common,
            "--junit",
            str(reports / "second.xml"),
            "--report-md",
            str(reports / "second.md"),
            cwd=work,
        )
        motd = fleet["web-2"].path("/etc/motd").read_text().strip()
        say(f"web-2 now says: {motd!r}")
    say(f"reports (JUnit and markdown) are in {reports}; the fleet is stopped")
    return 0 if first == second == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
