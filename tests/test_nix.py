"""The Nix command layer: argv shapes and error text handling."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest

from runner import nix
from runner.errors import NixError
from runner.hive.hive import nix_json, nix_string
from runner.nix import NixFlags


def test_flags():
    flags = NixFlags(show_trace=True, impure=False, options=(("cores", "2"),), machines_file="/m")
    assert flags.eval_args(flake=False) == [
        "--option",
        "builders",
        "@/m",
        "--option",
        "cores",
        "2",
        "--show-trace",
    ]
    flake = flags.eval_args(flake=True)
    assert flake[-4:] == ["nix-command flakes", "--option", "pure-eval", "true"]
    assert "--show-trace" not in flags.store_args() and "@/m" in flags.store_args()
    assert "pure-eval" not in NixFlags(impure=True).eval_args(flake=True)


@pytest.mark.parametrize(
    "text", ["plain", 'with "quotes"', "back\\slash", "${interp}", "$${x}", "new\nline\ttab", "ünï"]
)
def test_nix_string_round_trips_through_real_nix(text):
    value = asyncio.run(nix.eval_json(nix_string(text), NixFlags())).value
    assert value == text


def test_nix_json_round_trips():
    data = ["a", "b.c", 'q"${x}', {"k": [1, 2]}]
    assert asyncio.run(nix.eval_json(nix_json(data), NixFlags())).value == data


def test_eval_error_carries_nix_message():
    with pytest.raises(NixError) as e:
        asyncio.run(nix.eval_json('throw "the reason"', NixFlags()))
    assert "the reason" in e.value.message


def test_eval_timeout():
    expr = "let f = n: if n == 0 then 0 else f (n - 1) + f (n - 1); in f 60"
    with pytest.raises(NixError, match=r"timed out after 0\.5 s"):
        asyncio.run(nix.eval_json(expr, NixFlags(), timeout=0.5))


def test_sri_conversion():
    got = nix.base32_sha256_to_sri("sha256:02gw98jy1mbyxk7k3lx23avkhsj2hspiddk55ymmk5bxm1a6xsay")
    assert got == "sha256-XuluVKh9lVmrL2W2Fq+GQmo4txqi0zHP7H7V4CVK/Ak="


def test_error_text_drops_progress_marks():
    stderr = "trace: waggle-node-done a\nerror: attribute 'x' missing\n  at foo.nix:1:2"
    assert nix.first_error_line(stderr) == "attribute 'x' missing"
    assert "waggle-node-done" not in nix.error_text(stderr)


def test_version_and_info_ask_the_real_nix_once_each_way():
    # One version query: `nix.info` (nix-info) and the plan's base cache key use the same.
    version = asyncio.run(nix.version())
    assert version[0].isdigit() and "." in version, version
    assert asyncio.run(nix.info()).version == version


def test_valid_paths():
    done = asyncio.run(
        nix.eval_json('builtins.toFile "waggle-valid" "x"', NixFlags(), read_write=True)
    )
    path = done.value
    assert asyncio.run(nix.valid([path]))
    assert not asyncio.run(nix.valid([path, "/nix/store/" + "0" * 32 + "-missing"]))


def test_builders_replace_the_machines_file():
    flags = NixFlags(machines_file="/m", builders="ssh://b x86_64-linux")
    assert flags.store_args() == ["--option", "builders", "ssh://b x86_64-linux"]
    assert NixFlags(machines_file="/m", builders="").store_args() == ["--option", "builders", ""]
    assert NixFlags(machines_file="/m").store_args() == ["--option", "builders", "@/m"]


MISSING = "/nix/store/" + "0" * 32 + "-waggle-missing"


def store_file(name: str, text: str = "x") -> str:
    """A real path in the local store (`builtins.toFile`)."""
    expr = f"builtins.toFile {nix_string(name)} {nix_string(text)}"
    path: str = asyncio.run(nix.eval_json(expr, NixFlags(), read_write=True)).value
    return path


def test_invalid_names_the_paths_the_local_store_lacks():
    path = store_file("waggle-invalid")
    assert asyncio.run(nix.invalid([path, MISSING])) == {MISSING}
    assert asyncio.run(nix.invalid([path])) == frozenset()


def test_invalid_raises_when_nix_cannot_say():
    with pytest.raises(NixError, match="checking the validity"):
        asyncio.run(nix.invalid(["/not/a/store/path"]))


def test_path_info_of_a_closure_with_its_references_and_sizes():
    leaf = store_file("waggle-leaf", "leaf")
    expr = 'builtins.toFile "waggle-top" "uses ${builtins.toFile "waggle-leaf" "leaf"}"'
    top: str = asyncio.run(nix.eval_json(expr, NixFlags(), read_write=True)).value
    infos = asyncio.run(nix.path_info([top], recursive=True))
    assert set(infos) == {top, leaf}
    assert infos[top].references == (leaf,) and infos[leaf].references == ()
    for path, info in infos.items():
        assert info.path == path and info.nar_size is not None and info.nar_size > 0
        assert info.ca is None or info.ca.startswith(("text:", "fixed:"))  # toFile: text
    alone = asyncio.run(nix.path_info([top]))
    assert set(alone) == {top} and alone[top] == infos[top]


def test_path_info_fails_for_what_is_not_a_store_path():
    with pytest.raises(NixError, match="querying path info"):
        asyncio.run(nix.path_info(["/not/a/store/path"]))


def test_path_infos_of_both_json_shapes():
    record = {"narSize": 8, "references": ["/nix/store/b"], "ultimate": True, "signatures": []}
    gone = {"path": "/nix/store/gone", "valid": False}  # Nix 2.8: a path the store lacks
    old = nix.path_infos_of([{"path": "/nix/store/a", **record}, gone, "junk"])
    new = nix.path_infos_of({"/nix/store/a": record, "/nix/store/gone": None})
    assert old == new == {"/nix/store/a": nix.PathInfo("/nix/store/a", 8, ("/nix/store/b",), True)}
    signed = nix.path_infos_of({"/nix/store/s": {"signatures": ["k:x"], "ca": "fixed:r:sha256:1"}})
    assert signed["/nix/store/s"] == nix.PathInfo(
        "/nix/store/s", None, (), False, ("k:x",), "fixed:r:sha256:1"
    )


def test_export_streams_what_nix_store_import_takes():
    path = store_file("waggle-export", "exported")

    async def export() -> tuple[bytes, tuple[int, str]]:
        async with nix.export([path]) as exporter:
            data = await exporter.stdout.read()
            return data, await exporter.wait(timeout=30)

    data, (status, _) = asyncio.run(export())
    assert status == 0 and b"exported" in data
    imported = subprocess.run(
        ["nix-store", "--import"], input=data, capture_output=True, check=True, timeout=60
    )
    assert imported.stdout.decode().split() == [path]


def test_export_of_a_path_the_store_lacks_fails():
    async def export() -> tuple[bytes, tuple[int, str]]:
        async with nix.export([MISSING]) as exporter:
            return await exporter.stdout.read(), await exporter.wait(timeout=30)

    _data, (status, stderr) = asyncio.run(export())
    assert status != 0 and "waggle-missing" in stderr, stderr


def test_an_export_left_unread_is_killed_with_its_block():
    big = 'builtins.concatStringsSep "" (builtins.genList (_: "0123456789") 200000)'
    expr = f'builtins.toFile "waggle-export-unread" ({big})'
    path = asyncio.run(nix.eval_json(expr, NixFlags(), read_write=True)).value

    async def leave() -> int | None:
        async with nix.export([path]) as exporter:
            await exporter.stdout.read(1)
        return exporter.proc.returncode

    assert asyncio.run(leave()) == -signal.SIGKILL  # killed (blocked on a full pipe), reaped


def test_copy_to_a_binary_cache_says_what_it_copied_and_sent(tmp_path):
    leaf = store_file("waggle-copy-leaf", "leaf")
    expr = 'builtins.toFile "waggle-copy-top" "uses ${builtins.toFile "waggle-copy-leaf" "leaf"}"'
    top: str = asyncio.run(nix.eval_json(expr, NixFlags(), read_write=True)).value
    url = f"file://{tmp_path / 'cache'}"
    first = asyncio.run(nix.copy_to(url, [top], timeout=60))
    assert sorted(first.paths) == sorted([top, leaf]) and first.completed.ok
    assert set(first.sent) == {top, leaf} and all(n > 0 for n in first.sent.values())
    assert "-v" in first.completed.argv and first.completed.argv[-2:] == (url, top)
    again = asyncio.run(nix.copy_to(url, [top], timeout=60))  # the cache has them: none
    assert again.paths == () and dict(again.sent) == {}


def test_copy_to_a_store_that_measures_nothing_names_the_paths(tmp_path):
    path = store_file("waggle-copy-store", "store")
    copied = asyncio.run(nix.copy_to(f"{tmp_path / 'store'}", [path], timeout=60))
    assert copied.paths == (path,) and dict(copied.sent) == {}


def test_copy_to_a_cache_that_refuses_fails_with_nix_s_reason():
    path = store_file("waggle-copy-refused", "refused")
    options = ("--option", "connect-timeout", "2", "--option", "download-attempts", "1")
    with pytest.raises(NixError, match=r"copying to http://127\.0\.0\.1:9/ failed") as e:
        asyncio.run(nix.copy_to("http://127.0.0.1:9/", [path], options=options, timeout=60))
    assert "connect" in e.value.summary.lower() and "copying to" not in e.value.summary


def test_copy_to_times_out():
    path = store_file("waggle-copy-timeout", "timeout")
    with pytest.raises(NixError, match=r"timed out after 0\.001 s") as e:
        asyncio.run(nix.copy_to("file:///nonexistent-waggle", [path], timeout=0.001))
    assert e.value.summary == "timed out after 0.001 s"


def test_copied_in_reads_both_kinds_of_progress_lines():
    stderr = """copying 3 paths...
copying path '/nix/store/a-x' to 'file:///c'...
copying path '/nix/store/a-x' (1000 bytes, compressed 25.0% in 0 ms) to binary cache
copying path '/nix/store/b-y' to 'file:///c'...
copying path '/nix/store/b-y' (120 bytes, compressed -6.7% in 0 ms) to binary cache
copying path '/nix/store/c-z' to 'ssh://h'...
"""  # c-z: a store that measures nothing (ssh://)
    copied = ["/nix/store/a-x", "/nix/store/b-y", "/nix/store/c-z"]
    assert nix.copied_in(stderr) == (copied, {"/nix/store/a-x": 750, "/nix/store/b-y": 128})
