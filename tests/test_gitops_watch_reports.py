"""The watcher's per-commit reports (runner.gitops.watch_reports)."""

from __future__ import annotations

import logging
import re

from runner.gitops.watch_reports import DeployRecord, report, report_dir_for, write_reports

SHA = "1a2b3c4d5e6f" + "0" * 28


def test_report_directories_sort_by_time_and_never_clash(tmp_path):
    first = report_dir_for(tmp_path / "reports", SHA, 1735732800.1234)
    again = report_dir_for(tmp_path / "reports", SHA, 1735732800.1234)
    assert first.name == "20250101T120000.123Z-1a2b3c4d5e6f"
    assert again.name == first.name + "-2"
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{12}", first.name)


def test_a_deploy_that_raised_leaves_its_error(tmp_path):
    record = DeployRecord(SHA, 0.0, 1.0, None, "RuntimeError: boom")
    write_reports(tmp_path, record)
    assert [p.name for p in tmp_path.iterdir()] == ["error.txt"]
    assert (tmp_path / "error.txt").read_text() == "RuntimeError: boom\n"


def test_reports_that_cannot_be_written_are_logged(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    record = DeployRecord(SHA, 0.0, 1.0, None, "boom")
    assert report(record, None, logging.getLogger("waggle")) is record
    with caplog.at_level(logging.ERROR, logger="waggle"):
        kept = report(record, blocked, logging.getLogger("waggle"))
    assert kept == record and kept.report_dir is None
    assert "cannot write the reports of 1a2b3c4d5e6f" in caplog.text
    written = report(record, tmp_path / "reports", logging.getLogger("waggle"))
    assert written.report_dir is not None and (written.report_dir / "error.txt").exists()
