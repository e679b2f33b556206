"""`waggle apply` end to end: real nix, real sshd hosts with their own stores."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import waggle

pytestmark = needs_fleet()

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, pkgs, ... }: {
    networking.hostName = name;
    environment.systemPackages = [ pkgs.hello ];
    environment.etc.release.text = "@RELEASE@";
    deployment.tags = [ "fleet" ];
  };
@NODES@
}
"""
BASE = {
    "host1": "{ }",
    "host2": '{ deployment.tags = [ "web" ]; }',
    "host3": '{ deployment.tags = [ "web" ]; }',
    "host4": "{ }",
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    with Fleet.start(d, 4, first_octet=free_first_octet(4)) as f:
        yield f


@pytest.fixture
def hive(tmp_path):
    return tmp_path


def set_release(hive_dir: Path, release: str, **extra: str) -> None:
    """Write the hive; `extra` adds a module (Nix text) to the named nodes."""
    nodes = "\n".join(
        f"  {name} = [ {module} {extra.get(name, '')} ];" for name, module in BASE.items()
    )
    write_hive(hive_dir, HIVE.replace("@RELEASE@", release).replace("@NODES@", nodes))


def apply(hive_dir: Path, fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return waggle("apply", *args, "--ssh-config", str(fleet.ssh_config), cwd=hive_dir, timeout=600)


def outcome(done: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    rows = [line.split("\t") for line in done.stdout.splitlines() if "\t" in line]
    return {r[0]: (r[1], r[2]) for r in rows}


def built(hive_dir: Path, node: str) -> str:
    done = waggle("build", "--on", node, cwd=hive_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\t")[1].strip()


def test_switch_then_noop_then_change(fleet, hive):
    set_release(hive, "one")
    done = apply(hive, fleet, "switch")
    assert done.returncode == 0, done.stderr
    results = outcome(done)
    assert sorted(results) == ["host1", "host2", "host3", "host4"]
    for name in results:
        toplevel = built(hive, name)
        h = fleet[name]
        assert h.readlink("/run/current-system") == toplevel
        assert (
            os.path.realpath(h.path("/nix/var/nix/profiles/system"))
            .replace(str(h.path("/")), "/")
            .endswith(Path(toplevel).name)
        )
        assert h.path(toplevel).is_dir()
        assert h.resolve("/etc/release").read_text() == "one"
    # Re-deploying the same systems sends nothing and activates nothing.
    again = apply(hive, fleet, "switch")
    assert again.returncode == 0, again.stderr
    assert all(status == "unchanged" for status, _ in outcome(again).values()), again.stdout
    assert "nothing to copy" in again.stderr
    # --force activates anyway.
    forced = apply(hive, fleet, "switch", "--on", "host1", "--force")
    assert forced.returncode == 0 and outcome(forced)["host1"][0] == "ok", forced.stdout


def test_goals_boot_test_dry_activate_push(fleet, hive):
    set_release(hive, "two")
    target = built(hive, "host2")
    before = (
        fleet["host2"].readlink("/run/current-system")
        if fleet["host2"].path("/run/current-system").exists()
        else None
    )
    log = fleet["host2"].path("/run/standin/activations.log")
    # push: the closure is there, nothing activated
    lines_before = log.read_text().count("\n") if log.exists() else 0
    done = apply(hive, fleet, "push", "--on", "host2")
    assert done.returncode == 0, done.stderr
    assert fleet["host2"].path(target).is_dir()
    assert (log.read_text().count("\n") if log.exists() else 0) == lines_before
    # dry-activate changes nothing
    done = apply(hive, fleet, "dry-activate", "--on", "host2")
    assert done.returncode == 0, done.stderr
    now = fleet["host2"].readlink("/run/current-system") if before else None
    assert now == before
    # boot: profile only
    done = apply(hive, fleet, "boot", "--on", "host2")
    assert done.returncode == 0, done.stderr
    profile = fleet["host2"].resolve("/nix/var/nix/profiles/system")
    assert profile.name == Path(target).name
    assert (fleet["host2"].readlink("/run/current-system") if before else None) == before
    # test: running system only (the profile stays where boot put it)
    set_release(hive, "two-test")
    test_target = built(hive, "host2")
    done = apply(hive, fleet, "test", "--on", "host2")
    assert done.returncode == 0, done.stderr
    assert fleet["host2"].readlink("/run/current-system") == test_target
    assert fleet["host2"].resolve("/nix/var/nix/profiles/system").name == Path(target).name


def test_one_host_down_others_deploy(fleet, hive):
    set_release(hive, "three")
    fleet.stop_host("host3")
    reports = hive / "reports"
    try:
        done = apply(
            hive,
            fleet,
            "switch",
            "--connect-timeout",
            "5",
            "--junit",
            str(reports / "run.xml"),
            "--report-md",
            str(reports / "run.md"),
            "--report-json",
            str(reports / "run.json"),
        )
    finally:
        fleet.start_host("host3")
    assert done.returncode == 1, done.stderr
    results = outcome(done)
    assert results["host3"][0] == "failed"
    assert "host3" in results["host3"][1] or "127.0.0" in results["host3"][1]
    for name in ("host1", "host2", "host4"):
        assert results[name][0] == "ok", done.stdout
        assert fleet[name].resolve("/etc/release").read_text() == "three"
    assert "Traceback" not in done.stderr
    # The reports tell the same story: a JUnit parser counts one failure (host3's push).
    from junitparser import JUnitXml

    suite = next(iter(JUnitXml.fromfile(str(reports / "run.xml"))))
    cases = list(suite)
    failed = [c for c in cases if c.result and c.result[0]._tag == "failure"]
    assert [(c.classname, c.name) for c in failed] == [("waggle.push", "host3")]
    assert len({(c.classname, c.name) for c in cases}) == len(cases)
    ok_activations = [c for c in cases if c.classname == "waggle.activate" and not c.result]
    assert sorted(c.name for c in ok_activations) == ["host1", "host2", "host4"]
    md = (reports / "run.md").read_text()
    assert "1 failed" in md.splitlines()[0]
    assert md.index("host3") < md.index("host1")  # failures first
    report = json.loads((reports / "run.json").read_text())
    assert report["schema"] == "waggle.report/1"
    assert {n["name"]: n["status"] for n in report["nodes"]}["host3"] == "failed"


def test_failing_activation_reports_log_tail(fleet, hive):
    set_release(hive, "four", host4="{ standin.activation.fail = true; }")
    done = apply(hive, fleet, "switch", "--on", "host4")
    assert done.returncode == 1
    assert outcome(done)["host4"][0] == "failed"
    assert "activate" in outcome(done)["host4"][1]
    assert "host4 |" in done.stderr  # the activation's own output, per node


def test_connection_cut_during_activation(fleet, hive):
    set_release(hive, "five", host1="{ standin.activation.cutSsh = true; }")
    target = built(hive, "host1")
    done = apply(hive, fleet, "switch", "--on", "host1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert fleet["host1"].readlink("/run/current-system") == target


def test_keys_end_to_end_and_poison(fleet, hive):
    poison = "POISON-" + os.urandom(8).hex()
    keyfile = hive / "secret.txt"
    keyfile.write_text("from-a-file\n")
    set_release(
        hive,
        "six",
        host2=f"""{{
    users.users.svc = {{ isSystemUser = true; group = "svc"; }};
    users.groups.svc = {{ }};
    deployment.keys.poison = {{ text = "{poison}"; user = "svc"; group = "svc"; permissions = "0640"; }};
    deployment.keys.file = {{ keyFile = ./secret.txt; destDir = "/var/lib/secrets"; }};
    deployment.keys.cmd = {{ keyCommand = [ "echo" "from-a-command" ]; uploadAt = "post-activation"; }};
  }}""",
    )
    reports = [hive / "r.json", hive / "r.xml", hive / "r.md"]
    done = apply(
        hive,
        fleet,
        "switch",
        "--on",
        "host2",
        "-v",
        *("--report-json", str(reports[0]), "--junit", str(reports[1])),
        *("--report-md", str(reports[2])),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for report in reports:  # written, and without the secret
        assert "host2" in report.read_text() and poison not in report.read_text()
    h = fleet["host2"]
    key = h.path("/run/keys/poison")
    assert key.read_text() == poison
    st = key.stat()
    assert oct(st.st_mode & 0o777) == "0o640"
    # The owner was created by this activation; the activation snippet chowned the key.
    passwd = h.path("/etc/passwd").read_text()
    uid = next(int(line.split(":")[2]) for line in passwd.splitlines() if line.startswith("svc:"))
    assert st.st_uid == uid
    assert h.path("/var/lib/secrets/file").read_text() == "from-a-file\n"
    assert h.path("/run/keys/cmd").read_text() == "from-a-command\n"
    assert poison not in done.stdout + done.stderr
    toplevel = built(hive, "host2")
    closure = subprocess.run(
        ["nix-store", "-qR", toplevel], capture_output=True, text=True, check=True
    )
    grep = subprocess.run(
        ["grep", "-rl", poison, *closure.stdout.split()],
        capture_output=True,
        text=True,
        check=False,
    )
    assert grep.stdout == ""


def test_upload_keys_and_exec(fleet, hive):
    set_release(hive, "seven", host3='{ deployment.keys.k.text = "kept"; }')
    done = waggle("upload-keys", "--on", "host3", "--ssh-config", str(fleet.ssh_config), cwd=hive)
    assert done.returncode == 0, done.stderr
    assert fleet["host3"].path("/run/keys/k").read_text() == "kept"
    done = waggle(
        "exec", "--on", "@web", "--ssh-config", str(fleet.ssh_config), "--", "hostname", cwd=hive
    )
    assert done.returncode == 0, done.stderr
    assert "=== host2: exit 0 ===\nhost2" in done.stdout
    assert "=== host3: exit 0 ===\nhost3" in done.stdout
    done = waggle(
        "exec",
        "--ssh-config",
        str(fleet.ssh_config),
        "--",
        "sh",
        "-c",
        'test "$(hostname)" != host4',
        cwd=hive,
    )
    assert done.returncode == 1
    assert "=== host4: exit 1 ===" in done.stdout


def test_exec_single_string_runs_through_the_remote_shell(fleet, hive):
    # As with Colmena (and ssh): one argument is a shell command line.
    set_release(hive, "seven")
    ssh = ("--ssh-config", str(fleet.ssh_config))
    done = waggle("exec", "--on", "host2", *ssh, "--", "hostname | tr a-z A-Z", cwd=hive)
    assert done.returncode == 0, done.stderr
    assert "=== host2: exit 0 ===\nHOST2" in done.stdout
    # Several arguments still run exactly as given: the `|` is an argument of echo.
    done = waggle("exec", "--on", "host2", *ssh, "--", "echo", "a", "|", "b", cwd=hive)
    assert done.returncode == 0, done.stderr
    assert "=== host2: exit 0 ===\na | b" in done.stdout


def test_node_without_target_host_is_skipped(fleet, hive):
    set_release(hive, "eight", host4="{ deployment.targetHost = null; }")
    done = apply(hive, fleet, "push", "--on", "host4")
    assert done.returncode == 0, done.stderr
    assert outcome(done)["host4"][0] == "no targetHost"


def test_unknown_profile_refused(fleet, hive):
    # A profile the deploying machine does not know: made up on the host.
    h = fleet["host1"]
    fleet.run(
        "host1",
        "p=$(mktemp -d /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-unknown-XXXX); nix-env -p /nix/var/nix/profiles/system --set $p 2>/dev/null || ln -sfn $p /nix/var/nix/profiles/system",
    )
    set_release(hive, "nine", host1="{ deployment.replaceUnknownProfiles = false; }")
    done = apply(hive, fleet, "switch", "--on", "host1")
    assert done.returncode == 1, done.stdout
    assert "unknown active profile" in outcome(done)["host1"][1]
    done = apply(hive, fleet, "switch", "--on", "host1", "--force-replace-unknown-profiles")
    assert done.returncode == 0, done.stdout + done.stderr
    del h
