"""Uploading closures to a real binary cache (runner/deploy/cache.py); no hosts here.

The fleet half (hosts fetching from the cache, falling back to a direct push) is in
tests/test_deploy_cache_fleet.py.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from runner.deploy.cache import CacheSettings, CacheUploader, cache_settings, upload_closure
from runner.errors import UsageError
from tests.binary_cache import BinaryCache

CLOSURE = """
let
  dep = derivation {{ name = "cache-dep-{tag}"; system = builtins.currentSystem;
    builder = "/bin/sh"; args = [ "-c" "echo {tag} dependency > $out" ]; }};
in derivation {{ name = "cache-top-{tag}"; system = builtins.currentSystem;
  builder = "/bin/sh"; args = [ "-c" "echo ${{dep}} > $out" ]; }}
"""


def build(tmp_path: Path, tag: str) -> str:
    expr = tmp_path / f"{tag}.nix"
    expr.write_text(CLOSURE.format(tag=tag))
    done = subprocess.run(
        ["nix-build", str(expr), "--no-out-link"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


def test_settings_errors_name_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--cache-key needs --cache URL"):
        cache_settings(None, key_file="k")
    with pytest.raises(UsageError, match="--cache: "):
        cache_settings("file:///a b")
    with pytest.raises(UsageError, match=r"--cache-key: .* is not a readable file"):
        cache_settings("file:///x", key_file=str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="--cache-public-key: "):
        cache_settings("file:///x", public_key="not a key")
    assert cache_settings(None) is None


def test_settings_pass_the_key_by_file_and_the_cache_for_one_command(tmp_path):
    key = tmp_path / "k.sec"
    key.write_text("secret")
    s = cache_settings("s3://bucket?region=x", "https://cache.example", str(key), "c-1:AAAA")
    assert s is not None
    assert s.upload_url == f"s3://bucket?region=x&secret-key={key}"
    assert "secret" not in s.upload_url.replace("secret-key", "")
    assert s.substituter_options() == (
        *("--option", "extra-substituters", "https://cache.example"),
        *("--option", "extra-trusted-public-keys", "c-1:AAAA"),
    )
    assert CacheSettings("file:///c").substituter_options()[-1] == "file:///c"


def test_upload_copies_a_closure_once_signed(tmp_path):
    cache = BinaryCache.create(tmp_path / "cache")
    root = build(tmp_path, "once")
    settings = CacheSettings(cache.file_url, key_file=str(cache.secret_key))
    first = asyncio.run(upload_closure(root, settings))
    assert first.ok and first.paths == 2, first
    assert first.bytes > 0
    infos = cache.narinfos()
    assert len(infos) == 2
    name = cache.public_key.split(":")[0]
    for info in infos:
        assert f"Sig: {name}:" in (cache.directory / info).read_text()
    again = asyncio.run(upload_closure(root, settings))
    assert again.ok and again.paths == 0 and again.bytes == 0


def test_the_uploader_uploads_shared_paths_once_per_run(tmp_path):
    cache = BinaryCache.create(tmp_path / "cache")
    a, b = build(tmp_path, "shared-a"), build(tmp_path, "shared-b")

    async def main() -> CacheUploader:
        uploader = CacheUploader(CacheSettings(cache.file_url))
        await asyncio.gather(uploader.upload(a), uploader.upload(a), uploader.upload(b))
        return uploader

    uploader = asyncio.run(main())
    assert sorted(uploader.uploads) == sorted([a, b])
    assert uploader.paths_uploaded == 4
    assert uploader.bytes_uploaded == sum(u.bytes for u in uploader.uploads.values()) > 0


def test_an_unreachable_cache_is_an_upload_error_not_a_crash(tmp_path):
    root = build(tmp_path, "down")
    cache = BinaryCache.create(tmp_path / "cache").start()
    url = cache.http_url
    cache.stop()
    result = asyncio.run(upload_closure(root, CacheSettings(url, timeout=60)))
    assert not result.ok
    assert result.error is not None and url in result.error


BUILD_HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, ... }: { networking.hostName = name; };
  one = { environment.etc.x.text = "@UNIQUE@ one"; };
  two = { environment.etc.x.text = "@UNIQUE@ two"; };
}
"""


def test_build_with_a_cache_uploads_the_built_systems(tmp_path):
    import json
    import uuid

    from tests.conftest import write_hive
    from tests.helpers import waggle

    cache = BinaryCache.create(tmp_path / "cache")
    write_hive(tmp_path, BUILD_HIVE.replace("@UNIQUE@", uuid.uuid4().hex))
    done = waggle(
        *("build", "--cache", cache.file_url, "--cache-key", str(cache.secret_key)),
        *("--report-json", "r.json"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    for node in report["nodes"]:
        build = next(s for s in node["stages"] if s["stage"] == "build")
        assert build["facts"]["cache"] == "used", build
        hash_part = node["out_path"].removeprefix("/nix/store/").split("-")[0]
        assert f"{hash_part}.narinfo" in cache.narinfos()
    assert report["run"]["cache_bytes_uploaded"] > 0
    # The cache down: the build fails, naming it (the closure was asked to be there).
    down = BinaryCache.create(tmp_path / "down").start()
    url = down.http_url
    down.stop()
    write_hive(tmp_path, BUILD_HIVE.replace("@UNIQUE@", uuid.uuid4().hex))
    failed = waggle("build", "--cache", url, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert f"uploading to {url} failed" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr


def test_ci_builds_of_a_branch_that_does_not_deploy_are_never_uploaded(tmp_path):
    # waggle.yaml names a signed cache: only a deploy (a push to a deploy branch) uploads;
    # a push to another branch builds, and its systems are not signed with the fleet's key.
    import uuid

    from tests.conftest import write_hive
    from tests.test_gitops_apply import git, github_env, rev, run_ci

    cache = BinaryCache.create(tmp_path / "cache")
    repo = tmp_path / "repo"
    repo.mkdir()
    write_hive(repo, BUILD_HIVE.replace("@UNIQUE@", uuid.uuid4().hex))
    (repo / "waggle.yaml").write_text(
        f"cache:\n  url: {cache.file_url}\n  key: {cache.secret_key}\n"
    )
    git(repo, "init", "-q", "-b", "topic")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    event = {"before": "0" * 40, "after": rev(repo), "repository": {"default_branch": "main"}}
    done = run_ci(repo, github_env(tmp_path, "push", event, rev(repo), "topic"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "build" in done.stderr.splitlines()[0], done.stderr
    assert cache.narinfos() == []


def test_after_a_failed_upload_the_run_does_not_try_the_cache_again(tmp_path):
    # Every later node would wait for the same dead cache: they push directly at once.
    cache = BinaryCache.create(tmp_path / "cache").start()
    url = cache.http_url
    cache.stop()
    a, b = build(tmp_path, "breaker-a"), build(tmp_path, "breaker-b")

    async def main() -> tuple[CacheUploader, float]:
        uploader = CacheUploader(CacheSettings(url, timeout=60))
        first = await uploader.upload(a)
        assert not first.ok
        began = asyncio.get_running_loop().time()
        second = await uploader.upload(b)
        assert not second.ok and second.error == first.error
        return uploader, asyncio.get_running_loop().time() - began

    uploader, took = asyncio.run(main())
    assert list(uploader.uploads) == [a]  # b was not tried
    assert took < 0.5
