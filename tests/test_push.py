"""Pushing closures to hosts that misbehave, and what the push stage reports.

Real nix, real sshd hosts with their own stores (tests/fleet.py):
- a host whose store is read-only (a read-only tmpfs over its /nix/store) and a host whose
  `nix-store --import` hangs (SIGSTOP) fail their node within a bound, the local
  `nix-store --export` is killed, and the other nodes of the same run deploy (issue 8, item 6);
- a host whose nix.conf lists a substituter that never answers (or a closed port) costs a
  bounded time, and a host is only asked to substitute paths a cache can have (item 10);
- the JSON report carries every field the README documents, push facts included (item 14).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
from typing_extensions import override

from runner.deploy.push import PushError, closure_of, push_closure
from runner.hosts.ssh import SshHost, SshSettings, SshTarget
from tests.conftest import ROOT, needs_fleet, write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import documented_report_fields, stopped_imports, waggle

pytestmark = needs_fleet()

HOSTS = ("ro", "stuck", "fine1", "fine2", "offline", "cached", "plain", "builder")

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, pkgs, ... }: {
    networking.hostName = name;
    environment.systemPackages = [ pkgs.hello ];
    environment.etc.release.text = "@RELEASE@";
  };
@NODES@
}
"""

# Three files of random data, 6 MiB each: far more than the pipe, the SSH window and sshd's
# buffers hold, so an exporter nobody reads from is stuck until it is killed.
BLOB_SIZE = 6 * 1024 * 1024
BLOBS = """{ pkgs, ... }: {
    deployment.targetHost = "@HOST@";
    environment.systemPackages = map (i: pkgs.runCommand "blob-${toString i}-@UNIQUE@" { } ''
      head -c @SIZE@ /dev/urandom > $out
    '') [ 1 2 3 ];
  }"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    with Fleet.start(
        d, len(HOSTS), names=HOSTS, first_octet=free_first_octet(len(HOSTS), 200), etc="overlay"
    ) as f:
        yield f


@pytest.fixture
def hive(tmp_path: Path) -> Path:
    return tmp_path


# -- helpers ---------------------------------------------------------------------------------


def write(hive_dir: Path, nodes: Mapping[str, str], release: str = "push") -> None:
    body = "\n".join(f"  {json.dumps(name)} = {module};" for name, module in nodes.items())
    write_hive(hive_dir, HIVE.replace("@RELEASE@", release).replace("@NODES@", body))


def blobs_on(host: str) -> str:
    return (
        BLOBS.replace("@HOST@", host)
        .replace("@UNIQUE@", uuid.uuid4().hex[:12])
        .replace("@SIZE@", str(BLOB_SIZE))
    )


def apply(
    hive_dir: Path, fleet: Fleet, *args: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], float]:
    """`waggle apply ARGS --report-json`: the process, the report and the wall-clock seconds."""
    report = hive_dir / "report.json"
    began = time.monotonic()
    done = waggle(
        "apply",
        *args,
        "--ssh-config",
        str(fleet.ssh_config),
        "--report-json",
        str(report),
        cwd=hive_dir,
        timeout=timeout,
    )
    took = time.monotonic() - began
    assert "Traceback" not in done.stderr, done.stderr
    return done, json.loads(report.read_text()), took


def outcome(done: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    rows = [line.split("\t") for line in done.stdout.splitlines() if "\t" in line]
    return {r[0]: (r[1], r[2]) for r in rows}


def node(report: Mapping[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(n for n in report["nodes"] if n["name"] == name)
    return found


def stage(report: Mapping[str, Any], name: str, which: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in node(report, name)["stages"] if s["stage"] == which)
    return found


def toplevel_of(hive_dir: Path, name: str) -> str:
    expr = f"{{ nodes, ... }}: nodes.{json.dumps(name)}.config.system.build.toplevel.outPath"
    done = waggle("eval", "-E", expr, cwd=hive_dir)
    assert done.returncode == 0, done.stderr
    path: str = json.loads(done.stdout)
    return path


def closure(path: str) -> list[str]:
    done = subprocess.run(
        ["nix-store", "-qR", path], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.split()


def path_infos(paths: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "path-info", "--json", *paths],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    infos: list[dict[str, Any]] = json.loads(done.stdout)
    return infos


def on_host(fleet: Fleet, name: str, script: str) -> str:
    done = fleet.run(name, script, timeout=30)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


@contextlib.contextmanager
def read_only_store(fleet: Fleet, name: str) -> Iterator[None]:
    """The host's /nix/store becomes a read-only filesystem (the database stays writable).

    A tmpfs with the store's owner and mode and an empty .links, then remounted read-only:
    Nix opens the store and answers queries, but every path it tries to add fails with
    EROFS (a bind mount would not do: Nix, as root, remounts a read-only bind mount writable).
    """
    on_host(
        fleet,
        name,
        "set -e\n"
        "nix-store --dump-db >/dev/null\n"  # the store exists, with Nix's owner and mode
        "gid=$(stat -c %g /nix/store) mode=$(stat -c %a /nix/store)\n"
        'mount -t tmpfs -o "size=1m,mode=$mode,gid=$gid" waggle-ro-store /nix/store\n'
        "mkdir -m 0755 /nix/store/.links\n"
        "mount -o remount,ro /nix/store\n",
    )
    try:
        yield
    finally:
        on_host(fleet, name, "umount /nix/store")


def exporters() -> list[psutil.Process]:
    """This process's `nix-store --export` descendants that are still alive."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "--export" in child.cmdline():
                found.append(child)
    return found


# -- item 6: a failed push ends the node, not the run ----------------------------------------


def test_push_into_a_read_only_store_fails_the_node_at_once(fleet, hive):
    write(hive, {"to-ro": blobs_on("ro"), "to-fine": '{ deployment.targetHost = "fine1"; }'})
    with read_only_store(fleet, "ro"):
        # One permit: had the failed push kept it, the other node would never start.
        done, report, took = apply(hive, fleet, "push", "--parallel", "1", timeout=90)
    assert done.returncode == 1, (done.stdout, done.stderr)
    results = outcome(done)
    assert results["to-fine"][0] == "ok", done.stdout
    assert results["to-ro"][0] == "failed", done.stdout
    push = stage(report, "to-ro", "push")
    assert push["status"] == "failed"
    message = push["message"]
    assert "\n" not in message
    assert "nix-store --import on to-ro" in message and "Read-only file system" in message
    # The import fails once the first path has arrived; the node ends right after that.
    assert push["seconds"] < 10, push
    assert took < 60, took
    assert fleet["fine1"].path(toplevel_of(hive, "to-fine")).is_dir()


def test_push_past_the_push_timeout_fails_the_node_within_the_bound(fleet, hive):
    write(hive, {"to-stuck": blobs_on("stuck"), "to-fine": '{ deployment.targetHost = "fine2"; }'})
    with stopped_imports(fleet["stuck"]) as stopped:
        done, report, took = apply(
            hive, fleet, "push", "--parallel", "1", "--push-timeout", "4", timeout=90
        )
    assert stopped, "the import on the stuck host never started"
    assert done.returncode == 1, (done.stdout, done.stderr)
    results = outcome(done)
    assert results["to-fine"][0] == "ok", done.stdout
    assert results["to-stuck"][0] == "failed", done.stdout
    push = stage(report, "to-stuck", "push")
    assert push["message"] == "push to to-stuck timed out after 4 s", push
    # Failed at the push timeout, plus the few tenths of a second that stopping takes.
    assert 3.5 <= push["seconds"] < 6.5, push
    assert took < 60, took
    assert fleet["fine2"].path(toplevel_of(hive, "to-fine")).is_dir()


def test_failed_import_kills_the_local_exporter(fleet, hive):
    write(hive, {"to-ro": blobs_on("ro")})
    toplevel = toplevel_of(hive, "to-ro")
    built = waggle("build", "--on", "to-ro", cwd=hive)
    assert built.returncode == 0, built.stderr

    async def push() -> tuple[str, float, list[psutil.Process]]:
        host = SshHost(
            SshTarget(node="to-ro", host="ro"), SshSettings(config_files=(str(fleet.ssh_config),))
        )
        began = time.monotonic()
        try:
            await push_closure(host, toplevel, substitute=False, timeout=60)
        except PushError as e:
            return e.message, time.monotonic() - began, exporters()
        finally:
            await host.close()
        raise AssertionError("the push into a read-only store succeeded")

    with read_only_store(fleet, "ro"):
        message, took, left = asyncio.run(asyncio.wait_for(push(), 60))
    assert "Read-only file system" in message, message
    assert took < 10, took
    assert left == [], [p.cmdline() for p in left]


# -- the closure, its size and what was built here: one local process -----------------------


def test_closure_of_is_the_closure_dependencies_first_with_its_size(tmp_path):
    expr = (
        f"with import {ROOT}/tests/fixtures/nixpkgs {{ }}; runCommand"
        f' "top-{uuid.uuid4().hex[:8]}" {{ }} "mkdir $out; ln -s ${{hello}} $out/h"'
    )
    built = subprocess.run(
        ["nix-build", "--no-out-link", "-E", expr],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    info = asyncio.run(closure_of(built))
    expected = closure(built)
    assert sorted(info.paths) == sorted(expected) and info.paths[-1] == built
    infos = {i["path"]: i for i in path_infos(expected)}
    for n, path in enumerate(info.paths):  # every path after the paths it refers to
        assert set(infos[path]["references"]) - {path} <= set(info.paths[:n]), path
    assert info.nar_bytes == sum(i["narSize"] for i in infos.values())
    assert info.built_here is not None and built in info.built_here


# -- item 10: the host's own substituters cost a bounded time ---------------------------------


@contextlib.contextmanager
def blackhole() -> Iterator[tuple[str, list[socket.socket]]]:
    """An HTTP 'cache' on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", held
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


@contextlib.contextmanager
def closed_port() -> Iterator[tuple[str, list[socket.socket]]]:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}", []


class EmptyCache(http.server.ThreadingHTTPServer):
    """A binary cache on 127.0.0.1 that has nothing; it records the narinfos asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        super().__init__(("127.0.0.1", 0), _EmptyCacheHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _EmptyCacheHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        if self.path == "/nix-cache-info":
            data = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
            self.send_response(200)
        else:
            if self.path.endswith(".narinfo"):
                assert isinstance(self.server, EmptyCache)
                self.server.asked.append(self.path.strip("/").removesuffix(".narinfo"))
            data = b"not here\n"
            self.send_response(404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    @override
    def log_message(self, format: str, *args: Any) -> None:
        return


@contextlib.contextmanager
def substituter(fleet: Fleet, name: str, url: str) -> Iterator[None]:
    """Host `name`'s nix.conf lists `url` as its only substituter (the last line wins)."""
    conf = fleet[name].path("/etc/nix/nix.conf")
    before = conf.read_text()
    conf.write_text(before + f"substituters = {url}\n")
    try:
        yield
    finally:
        conf.write_text(before)


def source_node(hive_dir: Path, host: str) -> str:
    """A node whose closure holds a source file (added to the store, not built here)."""
    note = f"note-{uuid.uuid4().hex}"
    (hive_dir / "note.txt").write_text(note + "\n")
    return f'{{ deployment.targetHost = "{host}"; environment.etc.note.source = ./note.txt; }}'


@pytest.mark.parametrize(
    ("cache", "bound"), [(blackhole, 8.0), (closed_port, 2.0)], ids=["blackhole", "closed-port"]
)
def test_unreachable_substituter_costs_a_bounded_time(fleet, hive, cache, bound):
    write(hive, {"offline-node": source_node(hive, "offline")})
    with cache() as (url, connections), substituter(fleet, "offline", url):
        done, report, _ = apply(
            hive, fleet, "push", "--on", "offline-node", "--push-timeout", "40", timeout=90
        )
    assert done.returncode == 0, (done.stdout, done.stderr)
    push = stage(report, "offline-node", "push")
    facts = push["facts"]
    if cache is blackhole:
        assert connections, "the host never tried its substituter"
    assert push["seconds"] < bound + 1.5, push
    assert facts["substitute_seconds"] < bound, push
    assert facts["paths_substituted"] == 0
    assert fleet["offline"].path(toplevel_of(hive, "offline-node")).is_dir()


def test_host_is_asked_only_for_paths_a_cache_can_have(fleet, hive):
    write(hive, {"cached-node": source_node(hive, "cached")})
    toplevel = toplevel_of(hive, "cached-node")
    cache = EmptyCache()
    thread = threading.Thread(target=cache.serve_forever, daemon=True)
    thread.start()
    try:
        with substituter(fleet, "cached", cache.url):
            done, report, _ = apply(hive, fleet, "push", "--on", "cached-node", timeout=90)
    finally:
        cache.shutdown()
        cache.server_close()
        thread.join(5)
    assert done.returncode == 0, (done.stdout, done.stderr)
    infos = {i["path"]: i for i in path_infos(closure(toplevel))}
    note = next(p for p in infos if p.endswith("-note.txt"))
    hash_of = {Path(p).name.split("-", 1)[0]: p for p in infos}
    asked = {hash_of.get(h, h) for h in cache.asked}
    # The source file could be in a cache: the host asked for it. What was built here (and is
    # not signed or content-addressed) cannot be: the host was never asked for any of it.
    assert note in asked, (note, sorted(asked))
    built_here = {p for p, i in infos.items() if i.get("ultimate") and not i.get("ca")}
    assert toplevel in built_here
    assert not asked & built_here, sorted(asked & built_here)
    facts = stage(report, "cached-node", "push")["facts"]
    assert isinstance(facts["substitute_seconds"], float | int)
    assert facts["paths_substituted"] == 0


# -- item 14: the JSON report carries what the README documents --------------------------------

PUSH_FACTS = (
    "paths_total",
    "paths_sent",
    "bytes_sent",
    "closure_bytes",
    "substitute_seconds",
    "paths_substituted",
)


def lookup(data: Any, field: str) -> list[Any]:
    """Every value at `field` ("a.b", "a[].b"); fails if one step is missing."""
    values = [data]
    for part in field.split("."):
        each = part.endswith("[]")
        key = part.removesuffix("[]")
        found: list[Any] = []
        for value in values:
            assert isinstance(value, dict) and key in value, (field, key, value)
            found += value[key] if each else [value[key]]
        values = found
    return values


def test_json_report_carries_every_documented_field(fleet, hive):
    write(
        hive,
        {
            "plain-node": '{ deployment.targetHost = "plain"; }',
            "remote-built": '{ deployment.targetHost = "builder"; deployment.buildOnTarget = true;'
            f' environment.etc.unique.text = "{uuid.uuid4()}"; }}',
        },
    )
    done, report, _ = apply(hive, fleet, "switch", timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr)
    for field in documented_report_fields():
        values = lookup(report, field)
        assert field.count("[]") or len(values) == 1, field
    assert set(report["run"]["counts"]) == {
        "nodes",
        "ok",
        "failed",
        "unchanged",
        "skipped",
        "not_selected",
    }
    for n in report["nodes"]:
        assert n["stages"], n

    # The push stage: every documented fact, each agreeing with the store.
    push = stage(report, "plain-node", "push")
    facts = push["facts"]
    assert set(PUSH_FACTS) <= set(facts), facts
    toplevel = node(report, "plain-node")["out_path"]
    paths = closure(toplevel)
    sizes = {i["path"]: i["narSize"] for i in path_infos(paths)}
    assert facts["paths_total"] == len(paths)
    assert facts["closure_bytes"] == sum(sizes.values())
    # A fresh host: everything was sent; the export stream is the NARs plus a few hundred
    # bytes of header per path.
    assert facts["paths_sent"] == facts["paths_total"]
    assert facts["bytes_sent"] >= facts["closure_bytes"]
    assert facts["bytes_sent"] <= facts["closure_bytes"] + 4096 * facts["paths_sent"]
    assert facts["paths_substituted"] == 0
    assert facts["substitute_seconds"] >= 0
    assert f"{facts['paths_sent']} of {facts['paths_total']} paths" in push["message"]

    # Built on its target: the build stage carries the facts of the .drv closure's push.
    build = stage(report, "remote-built", "build")
    assert build["status"] == "ok" and "built on target" in build["message"], build
    drv = node(report, "remote-built")["drv_path"]
    bfacts = build["facts"]
    assert set(PUSH_FACTS) - {"closure_bytes"} <= set(bfacts), bfacts
    assert bfacts["paths_total"] == len(closure(drv))
    assert 1 <= bfacts["paths_sent"] <= bfacts["paths_total"]
    assert bfacts["bytes_sent"] > 0
