"""The watcher's Prometheus textfile (runner.gitops.metrics): format, escaping, atomic writes."""

from __future__ import annotations

import re
import stat

from runner.gitops.metrics import Metrics, escape_label, format_number, write_atomic
from runner.gitops.watch_reports import DeployRecord
from runner.results import NodeResult, RunSummary, Stage, StageResult, Status

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')

Key = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str) -> dict[Key, float]:
    """Prometheus text format: HELP/TYPE comments, then `name{labels} value` lines."""
    assert text.endswith("\n")
    out: dict[Key, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE") and len(parts) == 4, line
            if parts[1] == "TYPE":
                assert parts[3] in ("gauge", "counter"), line
                typed.add(parts[2])
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        assert name in typed, f"{name} has no TYPE line"
        pairs: list[tuple[str, str]] = []
        if labels:
            pos = 0
            while pos < len(labels):
                lm = _LABEL.match(labels, pos)
                assert lm, f"bad labels in {line!r}"
                raw = lm.group(2)
                unescaped = re.sub(
                    r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), raw
                )
                pairs.append((lm.group(1), unescaped))
                pos = lm.end()
        key = (name, tuple(pairs))
        assert key not in out, f"duplicate sample {key}"
        out[key] = float(value)
    return out


def test_label_escaping():
    assert escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_numbers():
    assert format_number(60.0) == "60" and format_number(0.5) == "0.5" and format_number(3) == "3"


def summary(*nodes: NodeResult) -> RunSummary:
    return RunSummary(
        command="watch",
        goal="switch",
        hive="h",
        commit="c",
        started_at=1.0,
        seconds=0.5,
        stages=(Stage.ACTIVATE,),
        nodes=nodes,
    )


def test_last_deploy_and_node_statuses():
    weird = 'odd "n"\n'
    ok = NodeResult("web", (StageResult(Stage.ACTIVATE, Status.OK, 0.2),))
    failed = NodeResult(weird, (StageResult(Stage.ACTIVATE, Status.FAILED, 0.2, "x"),))
    last = DeployRecord("abc", 100.0, 2.5, summary(ok, failed))
    text = Metrics(3, 1, 2, 1, 123.25, last).render()
    assert parse_metrics(text) == {
        ("waggle_watch_deploys_total", ()): 3,
        ("waggle_watch_deploy_failures_total", ()): 1,
        ("waggle_watch_fetch_errors_total", ()): 2,
        ("waggle_watch_refused_total", ()): 1,
        ("waggle_watch_last_fetch_timestamp_seconds", ()): 123.25,
        ("waggle_watch_last_deploy_timestamp_seconds", ()): 102.5,
        ("waggle_watch_last_deploy_duration_seconds", ()): 2.5,
        ("waggle_watch_last_commit_info", (("commit", "abc"),)): 1,
        ("waggle_watch_last_deploy_success", ()): 0,
        ("waggle_watch_node_status", (("node", "web"), ("status", "ok"))): 1,
        ("waggle_watch_node_status", (("node", weird), ("status", "failed"))): 1,
    }
    assert 'waggle_watch_node_status{node="odd \\"n\\"\\n",status="failed"} 1\n' in text
    # A deploy that raised has no nodes: the status metric is declared without samples.
    raised = Metrics(1, 1, 0, 0, None, DeployRecord("abc", 100.0, 2.0, None, "boom")).render()
    assert raised.endswith("# TYPE waggle_watch_node_status gauge\n")
    assert "waggle_watch_last_fetch_timestamp_seconds" not in raised


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "textfile" / "waggle.prom"
    write_atomic(path, "one\n")
    write_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["waggle.prom"]
