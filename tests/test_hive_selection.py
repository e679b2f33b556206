import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.errors import UsageError
from runner.hive.selection import parse_on

NAMES = ["alpha", "beta", "gamma.tld", "edge-1", "edge-2", "core-1"]
TAGS = {"alpha": ["router", "infra-a"], "beta": ["controller"], "edge-1": ["infra-b"]}


def test_names_and_globs():
    assert parse_on("alpha,beta").select(NAMES, TAGS) == ["alpha", "beta"]
    assert parse_on("edge-*").select(NAMES, TAGS) == ["edge-1", "edge-2"]
    assert parse_on("edge-*,core-*").select(NAMES, TAGS) == ["edge-1", "edge-2", "core-1"]
    assert parse_on("edge-[!1]").select(NAMES, TAGS) == ["edge-2"]
    assert parse_on("gamma.tld").select(NAMES, TAGS) == ["gamma.tld"]
    assert parse_on("?eta").select(NAMES, TAGS) == ["beta"]


def test_whitespace_is_trimmed():
    assert parse_on(" alpha , @controller ").select(NAMES, TAGS) == ["alpha", "beta"]


def test_tags():
    sel = parse_on("@infra-*")
    assert sel.needs_tags
    assert sel.select(NAMES, TAGS) == ["alpha", "edge-1"]
    assert parse_on("@router,@controller").select(NAMES, TAGS) == ["alpha", "beta"]
    assert parse_on("@router,core-*").select(NAMES, TAGS) == ["alpha", "core-1"]
    assert not parse_on("alpha").needs_tags


@pytest.mark.parametrize("text", ["a,,b", "a,", ",a", "@"])
def test_empty_rule_is_an_error(text):
    with pytest.raises(UsageError, match="--on"):
        parse_on(text)


def test_blank_selector_is_an_error():
    with pytest.raises(UsageError, match="empty"):
        parse_on("  ")


def test_no_match_says_so():
    with pytest.raises(UsageError, match="matches no node"):
        parse_on("nothing-*").select(NAMES, TAGS)


@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4))
def test_exact_names_select_themselves(chosen):
    selected = parse_on(",".join(chosen)).select(NAMES, TAGS)
    assert selected == [n for n in NAMES if n in chosen]


def test_matching_is_select_without_the_error():
    # One matcher: `waggle plan` uses `matching` (a side may have no match), the rest `select`.
    assert parse_on("nothing-*").matching(NAMES, TAGS) == []
    for text in ("alpha,beta", "@infra-*", "edge-*,@controller"):
        sel = parse_on(text)
        assert sel.matching(NAMES, TAGS) == sel.select(NAMES, TAGS)
