"""What `waggle watch` keeps of each deploy: its record and its report files.

Per deployed commit the watcher writes `junit.xml`, `report.md` and `report.json` (the run's
usual reports, `runner.report`) into `reports_dir/<UTC timestamp>-<short sha>/`, and
`error.txt` when the deploy raised instead of returning a summary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from runner.report.jsonreport import write_json
from runner.report.junit import write_junit
from runner.report.markdown import write_markdown
from runner.results import RunSummary

SHORT = 12  # characters of a SHA in log lines and report directory names


@dataclass(frozen=True)
class DeployRecord:
    """One deploy: the commit, when, how long, and the summary (None if the deploy raised)."""

    commit: str
    started_at: float
    seconds: float
    summary: RunSummary | None
    error: str = ""
    report_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.summary is not None and self.summary.ok


def report_dir_for(reports_dir: Path, commit: str, started_at: float) -> Path:
    """A new directory `<UTC time, ms>-<short sha>` (with "-2", "-3" if it already exists),
    e.g. `20250101T120000.123Z-1a2b3c4d5e6f`; names sort in deploy order."""
    when = datetime.fromtimestamp(started_at, tz=UTC)
    stamp = when.strftime("%Y%m%dT%H%M%S") + f".{when.microsecond // 1000:03d}Z"  # sorts by time
    base = f"{stamp}-{commit[:SHORT]}"
    reports_dir.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = reports_dir / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def write_reports(directory: Path, record: DeployRecord) -> None:
    if record.summary is not None:
        write_junit(record.summary, directory / "junit.xml")
        write_markdown(record.summary, directory / "report.md")
        write_json(record.summary, directory / "report.json")
    if record.error:
        (directory / "error.txt").write_text(record.error + "\n", encoding="utf-8")


def report(record: DeployRecord, reports_dir: Path | None, log: logging.Logger) -> DeployRecord:
    """Write the deploy's reports into a new directory of `reports_dir` (if set); the record
    with that directory. A write that fails is logged; the watcher goes on."""
    if reports_dir is None:
        return record
    try:
        directory = report_dir_for(reports_dir, record.commit, record.started_at)
        write_reports(directory, record)
    except OSError as e:
        log.error("watch: cannot write the reports of %s: %s", record.commit[:SHORT], e)
        return record
    return replace(record, report_dir=directory)
