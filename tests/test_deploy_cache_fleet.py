"""Closures through a real binary cache to real hosts (issue 12, item 1).

The cache is a `file://` store filled by `nix copy` with a signing key, served over HTTP
by a static file server on 127.0.0.1 (tests/binary_cache.py); the fleet's hosts fetch from
it with the cache and its public key given for that one command. Asserted: the deployer
sends no NAR directly to the hosts, the hosts' stores hold the paths with the cache's
signature, the systems are active; with the cache stopped mid-run, or a public key the
paths are not signed with, the hosts get the closure pushed directly and the report says so.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.build import BuildSettings
from runner.deploy.cache import CacheSettings
from runner.deploy.pipeline import DeploySettings, deploy
from runner.evaluate import EvalSettings
from runner.events import Event, EventKind
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.hosts.ssh import SshSettings, ssh_host_for
from runner.nix import NixFlags
from runner.results import NodeResult, Stage
from tests.binary_cache import BinaryCache
from tests.conftest import needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import waggle

pytestmark = needs_fleet()

HOSTS = ("a1", "a2", "a3", "b1", "b2", "b3", "k1", "k2")

# Every node's system holds one shared blob (1 MiB, built here: no cache but the run's can
# have it) and a small part of its own.
HIVE = """
let
  pkgs = import @NIXPKGS@ { };
  blob = pkgs.runCommand "cache-blob-@UNIQUE@" { } "head -c 1048576 /dev/urandom > $out";
  node = name: {
    inherit name;
    value = { ... }: {
      networking.hostName = name;
      environment.etc.blob.source = blob;
      environment.etc.own.text = "${name} @UNIQUE@";
    };
  };
in
{ meta.nixpkgs = pkgs; } // builtins.listToAttrs (map node [ @NODES@ ])
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    with Fleet.start(
        d, len(HOSTS), names=HOSTS, first_octet=free_first_octet(len(HOSTS), 120)
    ) as f:
        yield f


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[BinaryCache]:
    with BinaryCache.create(tmp_path / "cache") as c:
        yield c


def write(directory: Path, names: tuple[str, ...]) -> Path:
    nodes = " ".join(json.dumps(n) for n in names)
    text = HIVE.replace("@NODES@", nodes).replace("@UNIQUE@", uuid.uuid4().hex[:12])
    return write_hive(directory, text)


def push_facts(report: dict[str, Any], name: str) -> dict[str, Any]:
    node = next(n for n in report["nodes"] if n["name"] == name)
    stage = next(s for s in node["stages"] if s["stage"] == "push")
    facts: dict[str, Any] = stage["facts"]
    return facts


def signatures_on(fleet: Fleet, name: str, path: str) -> str:
    done = fleet.run(name, f"nix --extra-experimental-features nix-command path-info --sigs {path}")
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def test_hosts_fetch_the_closure_from_the_cache(fleet, cache, tmp_path):
    names = ("a1", "a2", "a3")
    write(tmp_path, names)
    report_file = tmp_path / "report.json"
    done = waggle(
        *("apply", "switch", "-p", "3", "--ssh-config", str(fleet.ssh_config)),
        *("--cache", cache.file_url, "--cache-substituter", cache.http_url),
        *("--cache-key", str(cache.secret_key), "--cache-public-key", cache.public_key),
        *("--report-json", str(report_file)),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    key_name = cache.public_key.split(":")[0]
    uploaded = 0
    for name in names:
        facts = push_facts(report, name)
        assert facts["cache"] == "used", facts
        assert facts["bytes_sent"] == 0 and facts["paths_sent"] == 0, facts
        assert facts["paths_from_cache"] > 0 and facts["bytes_from_cache"] > 0, facts
        uploaded += facts["cache_upload_bytes"]
        node = next(n for n in report["nodes"] if n["name"] == name)
        toplevel = node["out_path"]
        assert fleet[name].readlink("/run/current-system") == toplevel
        assert key_name in signatures_on(fleet, name, toplevel)
    # The shared blob left the deployer once: all uploads together are less than one
    # system's closure per host (each closure holds the 1 MiB blob).
    closure = push_facts(report, "a1")["closure_bytes"]
    assert 0 < uploaded < 1.1 * closure, (uploaded, closure)
    assert report["run"]["cache_bytes_uploaded"] == uploaded
    assert any(r.endswith(".narinfo") for r in cache.requests)


def run_deploy(hive_path: Path, fleet: Fleet, names, cache: CacheSettings, on_event=None):
    ssh = SshSettings(config_files=(str(fleet.ssh_config),))
    hive = Hive(locate(str(hive_path), hive_path.parent), NixFlags())

    async def main() -> dict[str, NodeResult]:
        configs = await hive.deployment(list(names))
        run = await deploy(
            hive,
            configs,
            list(names),
            EvalSettings(),
            BuildSettings(),
            DeploySettings(parallel=1, ssh=ssh, cache=cache, confirm_timeout=10),
            host_factory=lambda c: ssh_host_for(c, ssh),
            events=on_event,
        )
        return {r.name: r for r in run.nodes}

    return asyncio.run(main())


def facts_of(result: NodeResult) -> dict[str, Any]:
    push = next(s for s in result.stages if s.stage is Stage.PUSH)
    return dict(push.facts)


def test_a_cache_stopped_mid_run_leaves_the_rest_to_a_direct_push(fleet, cache, tmp_path):
    names = ("b1", "b2", "b3")
    hive = write(tmp_path, names)
    settings = CacheSettings(
        cache.file_url, cache.http_url, str(cache.secret_key), cache.public_key
    )

    def on_event(event: Event) -> None:  # after the first host's push, the cache goes down
        if event.kind is EventKind.STAGE_END and event.stage is Stage.PUSH:
            cache.stop()

    results = run_deploy(hive, fleet, names, settings, on_event)
    for name in names:
        assert results[name].ok, results[name].failure
        assert fleet[name].readlink("/run/current-system") == results[name].out_path
    first = next(n for n in names if facts_of(results[n])["cache"] == "used")
    assert facts_of(results[first])["bytes_sent"] == 0
    fell_back = [n for n in names if n != first]
    for name in fell_back:
        facts = facts_of(results[name])
        assert str(facts["cache"]).startswith("fallback: the host did not fetch"), facts
        assert facts["bytes_sent"] > 0 and facts["paths_from_cache"] == 0, facts
        push = next(s for s in results[name].stages if s.stage is Stage.PUSH)
        assert "not fetched from the cache" in push.message and "sent directly" in push.message


def test_a_public_key_the_paths_are_not_signed_with_is_refused(fleet, cache, tmp_path):
    names = ("k1", "k2")
    hive = write(tmp_path, names)
    other = BinaryCache.create(tmp_path / "other-key")
    settings = CacheSettings(
        cache.file_url, cache.http_url, str(cache.secret_key), other.public_key
    )
    results = run_deploy(hive, fleet, names, settings)
    for name in names:
        assert results[name].ok, results[name].failure
        facts = facts_of(results[name])
        assert str(facts["cache"]).startswith("fallback"), facts
        assert facts["bytes_sent"] > 0 and facts["paths_from_cache"] == 0, facts
        toplevel = results[name].out_path
        assert toplevel is not None
        assert fleet[name].readlink("/run/current-system") == toplevel
        # Pushed directly: no signature of the cache's key (the host trusted none).
        assert cache.public_key.split(":")[0] not in signatures_on(fleet, name, toplevel)
