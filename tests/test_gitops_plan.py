"""`waggle plan` core: real git histories, real nix against the nixpkgs stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from runner.evaluate import EvalSettings
from runner.gitops.changes import open_repo
from runner.gitops.plan import (
    Plan,
    PlanBuildSettings,
    build_and_diff,
    compute_plan,
    diff_packages,
    parse_drv_name,
)
from runner.hive.selection import parse_on
from tests.conftest import STANDIN

SYSTEM = f"{platform.machine()}-linux"
ONE_CHUNK = EvalSettings(node_limit=0)

HIVE = """\
let
  pkgs = import @NIXPKGS@ { system = "@SYSTEM@"; };
  files = builtins.attrNames (builtins.readDir ./hosts);
  node = f: {
    name = builtins.substring 0 (builtins.stringLength f - 4) f;
    value = { imports = [ (./hosts + "/${f}") ]; };
  };
in
{
  meta.nixpkgs = pkgs;
  defaults = { name, ... }: { networking.hostName = name; deployment.tags = [ "all" ]; };
} // builtins.listToAttrs (map node files)
"""

WEB = "{ pkgs, ... }: { environment.systemPackages = [ pkgs.nginx ]; services.web.port = PORT; }\n"


def host(packages: str, imports: str = "", extra: str = "") -> str:
    imp = f"imports = [ {imports} ]; " if imports else ""
    return f"{{ pkgs, ... }}: {{ {imp}environment.systemPackages = [ {packages} ]; {extra}}}\n"


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.org", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def commit(repo: Path, message: str, files: dict[str, str | None]) -> str:
    for rel, text in files.items():
        path = repo / rel
        if text is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fleet repository with one commit per kind of change; returns (dir, name -> sha)."""
    repo = tmp_path_factory.mktemp("fleet") / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    c: dict[str, str] = {}
    web = "../modules/web.nix"
    c["init"] = commit(
        repo,
        "init",
        {
            "hive.nix": HIVE.replace("@NIXPKGS@", str(STANDIN)).replace("@SYSTEM@", SYSTEM),
            "hosts/alpha.nix": host("pkgs.hello", web),
            "hosts/beta.nix": host("pkgs.htop", web),
            "hosts/gamma.nix": host("pkgs.jq"),
            "modules/web.nix": WEB.replace("PORT", "80"),
            "README.md": "# fleet\n",
        },
    )
    c["one"] = commit(
        repo, "alpha gets cowsay", {"hosts/alpha.nix": host("pkgs.hello pkgs.cowsay", web)}
    )
    c["shared"] = commit(repo, "web port", {"modules/web.nix": WEB.replace("PORT", "8080")})
    c["docs"] = commit(repo, "docs", {"README.md": "# fleet\n\nmore\n", "docs/guide.md": "guide\n"})
    httpd = "../modules/httpd.nix"
    c["rename"] = commit(
        repo,
        "rename web module",
        {
            "modules/web.nix": None,
            "modules/httpd.nix": WEB.replace("PORT", "8080"),
            "hosts/alpha.nix": host("pkgs.hello pkgs.cowsay", httpd),
            "hosts/beta.nix": host("pkgs.htop", httpd),
        },
    )
    c["addremove"] = commit(
        repo, "delta replaces gamma", {"hosts/gamma.nix": None, "hosts/delta.nix": host("pkgs.jq")}
    )
    overlay = 'nixpkgs.overlays = [ (final: prev: { hello = prev.hello.overrideAttrs (o: { version = "2.13"; name = "hello-2.13"; }); }) ]; '
    c["bump"] = commit(
        repo,
        "hello 2.13 on alpha",
        {"hosts/alpha.nix": host("pkgs.hello pkgs.cowsay", httpd, overlay)},
    )
    return repo, c


def plan(repo: Path, base: str | None, head: str | None = None, **kw) -> Plan:
    kw.setdefault("eval_settings", ONE_CHUNK)
    return asyncio.run(compute_plan(repo / "hive.nix", base, head, **kw))


def kinds(p: Plan) -> dict[str, str]:
    return {n.name: n.kind for n in p.nodes}


def test_one_node_change_plans_that_node(fleet):
    repo, c = fleet
    p = plan(repo, c["init"], c["one"])
    assert kinds(p) == {"alpha": "changed", "beta": "unchanged", "gamma": "unchanged"}
    assert [x.describe() for x in p.changed_paths] == ["modified hosts/alpha.nix"]
    assert p.evaluations == 2 and p.all_affected_reason is None


def test_shared_module_change_plans_its_users(fleet):
    repo, c = fleet
    p = plan(repo, c["one"], c["shared"])
    assert kinds(p) == {"alpha": "changed", "beta": "changed", "gamma": "unchanged"}
    assert [n.name for n in p.affected] == ["alpha", "beta"]


def test_docs_only_change_evaluates_nothing(fleet):
    repo, c = fleet
    p = plan(repo, c["shared"], c["docs"])
    assert p.evaluations == 0 and p.nodes == ()
    assert p.skipped_reason and "only ignored paths changed" in p.skipped_reason
    assert {x.new_path for x in p.ignored_paths} == {"README.md", "docs/guide.md"}
    # With nothing ignored the same change is evaluated and changes no node.
    p = plan(repo, c["shared"], c["docs"], ignore=())
    assert p.evaluations == 2 and not p.affected


def test_rename_is_detected(fleet):
    repo, c = fleet
    p = plan(repo, c["docs"], c["rename"])
    renames = [x for x in p.changed_paths if x.status == "renamed"]
    assert [(x.old_path, x.new_path) for x in renames] == [("modules/web.nix", "modules/httpd.nix")]
    # The module moved with the same text: no system changes.
    assert kinds(p) == {"alpha": "unchanged", "beta": "unchanged", "gamma": "unchanged"}


def test_added_and_removed_nodes(fleet):
    repo, c = fleet
    p = plan(repo, c["rename"], c["addremove"])
    assert kinds(p) == {
        "alpha": "unchanged",
        "beta": "unchanged",
        "delta": "added",
        "gamma": "removed",
    }
    assert p.node("gamma").base_drv and p.node("gamma").head_drv is None
    assert p.node("delta").head_drv and p.node("delta").base_drv is None


def test_selection_limits_the_plan(fleet):
    repo, c = fleet
    p = plan(repo, c["one"], c["shared"], selector=parse_on("beta,gamma"))
    assert kinds(p) == {"beta": "changed", "gamma": "unchanged"}


def test_version_bump_shows_in_package_diff_and_closure(fleet):
    repo, c = fleet
    p = plan(repo, c["addremove"], c["bump"])
    assert [n.name for n in p.affected] == ["alpha"]
    p = asyncio.run(build_and_diff(p, settings=PlanBuildSettings()))
    alpha = p.node("alpha")
    assert alpha.build is not None and alpha.build.ok
    assert alpha.packages is not None
    assert [x.describe() for x in alpha.packages.changed] == ["hello: 2.12 -> 2.13"]
    assert alpha.closure is not None and alpha.closure.head_size and alpha.closure.head_paths
    assert Path(alpha.head_out or "", "bin", "switch-to-configuration").exists()


def test_zero_base_affects_every_node(fleet):
    repo, c = fleet
    p = plan(repo, "0" * 40, c["one"])
    assert set(kinds(p).values()) == {"changed"} and len(p.nodes) == 3
    assert p.all_affected_reason and "all zeros" in p.all_affected_reason
    assert p.evaluations == 1


def test_base_cache_hit_costs_one_evaluation(fleet, tmp_path):
    repo, c = fleet
    first = plan(repo, c["init"], c["shared"], cache_dir=tmp_path / "cache")
    assert first.evaluations == 2 and not first.base_cached
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    second = plan(repo, c["init"], c["shared"], cache_dir=tmp_path / "cache")
    assert second.evaluations == 1 and second.base_cached
    assert kinds(second) == kinds(first)
    assert [n.base_drv for n in second.nodes] == [n.base_drv for n in first.nodes]


def test_unknown_base_rev_in_full_clone(fleet):
    repo, c = fleet
    p = plan(repo, "f" * 40, c["one"])
    assert p.all_affected_reason and "could not be fetched" in p.all_affected_reason


def test_package_diff_parsing():
    assert parse_drv_name("hello-2.12") == ("hello", "2.12")
    assert parse_drv_name("inotify-tools-4.23.9.0") == ("inotify-tools", "4.23.9.0")
    assert parse_drv_name("etc-hosts") == ("etc-hosts", "")
    h = "0" * 32
    base = [
        f"/nix/store/{h}-hello-2.12.drv",
        f"/nix/store/{h}-jq-1.7.drv",
        f"/nix/store/{h}-etc.drv",
    ]
    head = [
        f"/nix/store/{h}-hello-2.13.drv",
        f"/nix/store/{h}-curl-8.4.0.drv",
        f"/nix/store/{h}-x.sh",
    ]
    d = diff_packages(base, head)
    assert [x.describe() for x in d.entries] == [
        "hello: 2.12 -> 2.13",
        "curl: added 8.4.0",
        "jq: removed 1.7",
    ]


# -- a shallow clone over git:// ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def git_daemon(base: Path):
    port = free_port()
    proc = subprocess.Popen(
        [
            "git",
            "daemon",
            "--export-all",
            f"--base-path={base}",
            f"--port={port}",
            "--listen=127.0.0.1",
            "--reuseaddr",
            str(base),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("git daemon did not start")
            time.sleep(0.05)
        yield f"git://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_shallow_clone_is_deepened_for_the_base(fleet, tmp_path):
    repo, c = fleet
    served = tmp_path / "served"
    served.mkdir()
    git(served, "clone", "-q", "--bare", str(repo), "fleet.git")
    with git_daemon(served) as url:
        clone = tmp_path / "clone"
        git(tmp_path, "clone", "-q", "--depth", "1", f"{url}/fleet.git", str(clone))
        assert open_repo(clone).is_shallow
        assert open_repo(clone).get(c["addremove"]) is None
        p = plan(clone, c["addremove"], None)
    assert p.base == c["addremove"] and p.all_affected_reason is None
    assert any("depth 50" in n for n in p.notes), p.notes
    assert [n.name for n in p.affected] == ["alpha"]


def test_flake_hive_in_a_subdirectory(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    shutil.copytree(STANDIN, repo / "fleet" / "nixpkgs")
    flake = (
        '{ outputs = { self }: let pkgs = import ./nixpkgs { system = "' + SYSTEM + '"; }; in {'
        ' colmena = { meta.nixpkgs = pkgs; one = { environment.etc.motd.text = "MOTD"; };'
        " two = { }; }; }; }\n"
    )
    base = commit(repo, "init", {"fleet/flake.nix": flake.replace("MOTD", "hi")})
    head = commit(repo, "motd", {"fleet/flake.nix": flake.replace("MOTD", "hello")})
    p = asyncio.run(compute_plan(repo / "fleet", base, head, eval_settings=ONE_CHUNK))
    assert p.hive == "fleet"
    assert kinds(p) == {"one": "changed", "two": "unchanged"}
