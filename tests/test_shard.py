"""`--shard K/N`: the rule that splits the selected nodes into N shares (runner/shard.py)."""

from __future__ import annotations

import json
import math
import os
import random
import string
import subprocess
import sys

import pytest

from runner.errors import UsageError
from runner.shard import ShardSpec, assign, capacity, first_choice, parse_shard, shard_nodes
from tests.conftest import write_hive
from tests.helpers import assert_clean_error, waggle

TEN = [f"node-{i:02d}" for i in range(1, 11)]


def shares(names: list[str], total: int) -> dict[int, list[str]]:
    return {k: shard_nodes(names, ShardSpec(k, total)) for k in range(1, total + 1)}


def test_three_shards_of_ten_nodes_cover_every_node_once():
    parts = shares(TEN, 3)
    together = [n for part in parts.values() for n in part]
    assert sorted(together) == TEN  # every node exactly once
    assert all(part for part in parts.values())
    assert max(len(p) for p in parts.values()) <= capacity(10, 3) == 5
    for part in parts.values():  # each share keeps the selection's order
        assert part == [n for n in TEN if n in part]


def test_adding_a_node_moves_no_other_node():
    before = assign(TEN, 3)
    after = assign([*TEN, "node-11"], 3)
    assert {n: after[n] for n in TEN} == before
    assert max(list(after.values()).count(k) for k in (1, 2, 3)) <= capacity(11, 3)
    # nor does a node added at the front of the selection (order is not part of the rule)
    assert {n: assign(["aaa", *TEN], 3)[n] for n in TEN} == before


def test_the_rule_ignores_order_and_duplicates():
    shuffled = TEN[::-1]
    assert assign(shuffled, 4) == assign(TEN, 4)
    assert assign([*TEN, *TEN], 4) == assign(TEN, 4)


def test_without_a_full_shard_every_node_is_on_its_first_choice():
    """Below capacity the rule is plain rendezvous hashing, which moves nothing on additions."""
    placed = assign(TEN, 3)
    counts = [list(placed.values()).count(k) for k in (1, 2, 3)]
    if max(counts) < capacity(10, 3):
        assert placed == {n: first_choice(n, 3) for n in TEN}


def random_names(rng: random.Random, count: int) -> list[str]:
    letters = string.ascii_lowercase + string.digits + "-"
    return sorted({"".join(rng.choices(letters, k=12)) for _ in range(count)})


@pytest.mark.parametrize("count,total", [(10, 3), (40, 4), (200, 5), (500, 8), (7, 10)])
def test_balance_bound_and_moves_on_additions(count, total):
    """The documented bound: no shard over ceil(1.25 n / N) nodes. Adding one node moves
    other nodes only when a shard was full, and then only a few (one chain)."""
    rng = random.Random(count * 1000 + total)
    moved_runs = 0
    for _trial in range(30):
        names = random_names(rng, count)
        placed = assign(names, total)
        loads = [list(placed.values()).count(k) for k in range(1, total + 1)]
        assert sorted(placed) == names
        assert max(loads) <= capacity(len(names), total)
        extra = "x" + random_names(rng, 1)[0]
        after = assign([*names, extra], total)
        moved = [n for n in names if after[n] != placed[n]]
        grown = capacity(len(names) + 1, total) > capacity(len(names), total)
        if moved:
            moved_runs += 1
            assert max(loads) == capacity(len(names), total) or grown, (names, extra)
            assert len(moved) <= total, moved
    assert moved_runs <= 10  # most additions move nothing at all


def test_rule_is_fixed():
    """The rule is part of the documented interface (shard reports are merged across jobs
    and runs): these values must never change within waggle.shard/1."""
    assert [first_choice(n, 3) for n in TEN[:4]] == EXPECTED_FIRST
    assert math.ceil(1.25 * 10 / 3) == capacity(10, 3)


EXPECTED_FIRST = [1, 2, 3, 1]  # frozen: a change here breaks merging across versions


@pytest.mark.parametrize(
    "text,needle",
    [
        ("0/3", "from 1 to 3"),
        ("4/3", "from 1 to 3"),
        ("x/y", "K/N"),
        ("1/0", "at least 1"),
        ("3", "K/N"),
        ("", "K/N"),
        ("-1/3", "K/N"),
    ],
)
def test_bad_shard_values(text, needle):
    with pytest.raises(UsageError) as caught:
        parse_shard(text)
    message = caught.value.message
    assert message.startswith("--shard ") and needle in message
    assert "\n" not in message


def test_parse_shard():
    assert parse_shard("2/3") == ShardSpec(2, 3)
    assert parse_shard(" 1 / 1 ") == ShardSpec(1, 1)
    assert str(ShardSpec(2, 3)) == "2/3"
    with pytest.raises(UsageError, match=r"^WAGGLE_SHARD "):
        parse_shard("9/3", what="WAGGLE_SHARD")


# -- the flag on the command line: one-line errors, exit 2 ----------------------------------


@pytest.mark.parametrize(
    "command,value",
    [
        (("build",), "0/3"),
        (("build",), "x/y"),
        (("apply", "switch"), "4/3"),
        (("plan", "--base", "HEAD"), "1/0"),
        (("ci",), "0/3"),
    ],
)
def test_bad_shard_flag_is_a_one_line_error(tmp_path, command, value):
    write_hive(tmp_path, "{ meta.nixpkgs = import @NIXPKGS@ { }; alpha = { }; }")
    done = waggle(*command, "--shard", value, cwd=tmp_path)
    assert_clean_error(done, 2, f"--shard '{value}'")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_bad_waggle_shard_variable_is_a_one_line_error(tmp_path):
    write_hive(tmp_path, "{ meta.nixpkgs = import @NIXPKGS@ { }; alpha = { }; }")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "CI_", "GITLAB"))}
    for name, value, needle in (
        ("WAGGLE_SHARD", "3/2", "WAGGLE_SHARD '3/2'"),
        ("CI_NODE_INDEX", "0", "CI_NODE_INDEX/CI_NODE_TOTAL '0/3'"),
    ):
        extra = {name: value, "CI_NODE_TOTAL": "3", "GITLAB_CI": "true"}
        done = subprocess.run(
            [sys.executable, "-m", "runner", "ci"], cwd=tmp_path, env={**env, **extra},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert_clean_error(done, 2, needle)


# -- plan and build: only the shard's nodes ------------------------------------------------

SIX = [f"p{i}" for i in range(1, 7)]


def six_node_repo(tmp_path, text: str) -> None:
    nodes = "".join(f'  {n} = {{ environment.etc.v.text = "{n} {text}"; }};\n' for n in SIX)
    write_hive(tmp_path, "{\n  meta.nixpkgs = import @NIXPKGS@ { };\n" + nodes + "}\n")


def test_plan_shard_builds_and_reports_only_its_nodes(tmp_path):
    from tests.test_cli_plan import git

    six_node_repo(tmp_path, "one")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "one")
    six_node_repo(tmp_path, f"two {tmp_path}")  # every node changes; unique: really built
    git(tmp_path, "commit", "-qam", "two")
    done = waggle("plan", "--base", "HEAD~1", "--shard", "2/3", "--json", "plan.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    mine = shard_nodes(SIX, ShardSpec(2, 3))
    assert [n["name"] for n in plan["nodes"]] == mine
    assert all(n["kind"] == "changed" for n in plan["nodes"])
    assert any(f"shard 2/3 (waggle.shard/1): {len(mine)} of 6 nodes" in t for t in plan["notes"])


def test_an_empty_shard_is_an_empty_run(tmp_path):
    six_node_repo(tmp_path, "empty")
    empty = next(k for k in range(1, 11) if not shard_nodes(SIX, ShardSpec(k, 10)))
    done = waggle("build", "--shard", f"{empty}/10", "--report-json", "r.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["nodes"] == [] and report["not_selected"] == []
    assert report["run"]["shard"]["selected"] == SIX


def test_a_sharded_plan_posts_no_sticky_comment(tmp_path):
    """Each shard's plan would replace the other shards' comment: none is posted."""
    from tests.test_cli_plan import git

    six_node_repo(tmp_path, "one")
    (tmp_path / "waggle.yaml").write_text("comment: true\n")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "one")
    base = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    six_node_repo(tmp_path, "two")
    git(tmp_path, "commit", "-qam", "two")
    event = tmp_path / "event.json"
    event.write_text(json.dumps({
        "pull_request": {"number": 5, "base": {"sha": base, "repo": {"full_name": "a/b"}},
                         "head": {"sha": "f" * 40, "repo": {"full_name": "a/b"}}},
        "repository": {"full_name": "a/b", "default_branch": "main"},
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "CI_", "GITLAB"))}
    env.update({"GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": "pull_request",
                "GITHUB_EVENT_PATH": str(event), "GITHUB_REPOSITORY": "a/b",
                "GITHUB_TOKEN": "t", "GITHUB_API_URL": "http://127.0.0.1:9"})  # fmt: skip
    for shard, expected in (("2/3", "plan comment not posted: shard 2/3"), ("", "comment failed")):
        done = subprocess.run(
            [sys.executable, "-m", "runner", "ci"], cwd=tmp_path,
            env={**env, "WAGGLE_SHARD": shard}, capture_output=True, text=True, timeout=300,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert expected in done.stderr, done.stderr
