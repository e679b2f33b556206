"""GitHub workflow commands (runner.github): one escaping for annotations and the CI log."""

from __future__ import annotations

from runner.github import annotation, escape_data, escape_property
from runner.gitops import ci
from runner.progress.model import NodeView, Phase
from runner.progress.plain import github_block


def test_escaping_as_actions_toolkit_does():
    assert escape_data("100%\r\nnext") == "100%25%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    assert annotation("warning", "t:1", "50%\n") == "::warning title=t%3A1::50%25%0A"


def test_ci_annotations_and_the_plain_log_escape_alike():
    name, message = "web:1,x", "failed: 50% done\nexit 4"
    (from_ci,) = ci.annotations([(name, message)], "github")
    assert from_ci == annotation("error", f"waggle: {name} failed", message)
    node = NodeView(name=name, order=0, first_seen=0.0)
    node.phase = Phase.FAILED
    block = github_block(node, [], color=False, now=0.0)
    assert block[0].startswith("::error title=web%3A1%2Cx::")
