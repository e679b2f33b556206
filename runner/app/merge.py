"""`waggle report merge`: read shard runs' JSON reports, write one run's reports."""

from __future__ import annotations

import json
from pathlib import Path

from runner.app.requests import MergeRequest
from runner.app.run import write_reports
from runner.errors import UsageError
from runner.report.jsonreport import ReportFormatError, summary_from_json
from runner.report.merge import merge_runs
from runner.results import RunSummary


def read_report(path: Path) -> RunSummary:
    """A `--report-json` file as a RunSummary; UsageError naming the file otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the report: {e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{path}: not JSON: {e}") from None
    try:
        return summary_from_json(data)
    except ReportFormatError as e:
        raise UsageError(f"{path}: not a waggle run report (--report-json): {e}") from None


def merge_reports(request: MergeRequest) -> RunSummary:
    """Merge the shard reports and write the merged run's reports (and step summary)."""
    summary = merge_runs([(str(p), read_report(p)) for p in request.files])
    write_reports(request.reports, summary)
    return summary
