"""`waggle watch --metrics-file`: a Prometheus textfile for node_exporter's textfile collector.

The file holds the watcher's counters (deploys, failed deploys, fetch errors, refused heads),
when the last fetch ended and, once a deploy has finished, the last deploy: when, how long,
its commit, whether it succeeded and each node's status. It is rewritten atomically (a
temporary file in the same directory and a rename), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runner.gitops.watch_reports import DeployRecord
from runner.report import NODE_STATUSES, node_status

Sample = tuple[str, float]  # (labels, value); labels "" or `{name="value",...}`


def escape_label(value: str) -> str:
    """A label value escaped as the text exposition format asks (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_number(value: float) -> str:
    """A sample value (or a number in a log line): `60` for 60.0, `0.5` for 0.5."""
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def _metric(name: str, kind: str, help_text: str, samples: list[Sample]) -> list[str]:
    return [
        f"# HELP {name} {help_text}",
        f"# TYPE {name} {kind}",
        *(f"{name}{labels} {format_number(value)}" for labels, value in samples),
    ]


def _node_samples(last: DeployRecord) -> list[Sample]:
    nodes = last.summary.nodes if last.summary is not None else ()
    samples = []
    for node in nodes:
        status = node_status(node)
        assert status in NODE_STATUSES
        samples.append((f'{{node="{escape_label(node.name)}",status="{status}"}}', 1.0))
    return samples


def _last_deploy(last: DeployRecord) -> list[str]:
    gauges: tuple[tuple[str, str, list[Sample]], ...] = (
        (
            "waggle_watch_last_deploy_timestamp_seconds",
            "When the last deploy ended (epoch seconds).",
            [("", last.started_at + last.seconds)],
        ),
        (
            "waggle_watch_last_deploy_duration_seconds",
            "How long the last deploy took.",
            [("", last.seconds)],
        ),
        (
            "waggle_watch_last_commit_info",
            "The commit deployed last.",
            [(f'{{commit="{escape_label(last.commit)}"}}', 1)],
        ),
        (
            "waggle_watch_last_deploy_success",
            "1 if every node of the last deploy succeeded, else 0.",
            [("", 1 if last.ok else 0)],
        ),
        (
            "waggle_watch_node_status",
            "The status of each node in the last deploy (ok, failed, unchanged, skipped).",
            _node_samples(last),
        ),
    )
    return [
        line for name, text, samples in gauges for line in _metric(name, "gauge", text, samples)
    ]


@dataclass
class Metrics:
    deploys_total: int = 0
    deploy_failures_total: int = 0
    fetch_errors_total: int = 0
    refused_total: int = 0
    last_fetch_timestamp: float | None = None
    last: DeployRecord | None = None

    def render(self) -> str:
        counters = (
            ("waggle_watch_deploys_total", "Deploys finished by this watcher.", self.deploys_total),
            (
                "waggle_watch_deploy_failures_total",
                "Deploys that failed (a node failed or the deploy raised).",
                self.deploy_failures_total,
            ),
            (
                "waggle_watch_fetch_errors_total",
                "Fetches that failed or timed out.",
                self.fetch_errors_total,
            ),
            (
                "waggle_watch_refused_total",
                "New heads refused as not descending from the deployed commit.",
                self.refused_total,
            ),
        )
        out = [
            line
            for name, text, value in counters
            for line in _metric(name, "counter", text, [("", value)])
        ]
        if self.last_fetch_timestamp is not None:
            out += _metric(
                "waggle_watch_last_fetch_timestamp_seconds",
                "gauge",
                "When the last successful fetch ended (epoch seconds).",
                [("", self.last_fetch_timestamp)],
            )
        if self.last is not None:
            out += _last_deploy(self.last)
        return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename, so
    a reader (node_exporter) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
