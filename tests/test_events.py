"""The run's event stream: the Recorder that reports a run stopped midway."""

from __future__ import annotations

from runner.events import Emitter, Event, Recorder
from runner.results import Stage, StageResult, Status


def test_a_stopped_runs_results_keep_what_was_known():
    seen: list[Event] = []
    recorder = Recorder(seen.append)
    emit = Emitter(recorder)
    evaluated = StageResult(Stage.EVAL, Status.OK, 1.0, started_at=100.0)
    emit.end("web", evaluated, ("/nix/store/a-web.drv", "/nix/store/b-web"))
    emit.start("web", Stage.BUILD, "building")
    emit.start("db", Stage.EVAL, "evaluating")
    stages = (Stage.EVAL, Stage.BUILD, Stage.PUSH)
    web, db, mail = recorder.results(["web", "db", "mail"], stages, "interrupted by SIGTERM")
    assert len(seen) == 3  # every event passed on
    assert (web.drv_path, web.out_path) == ("/nix/store/a-web.drv", "/nix/store/b-web")
    assert [(s.stage, s.status) for s in web.stages] == [
        (Stage.EVAL, Status.OK),
        (Stage.BUILD, Status.FAILED),
    ]
    assert web.stages[-1].message == "interrupted by SIGTERM"
    assert (db.drv_path, db.out_path) == (None, None)  # never evaluated
    assert [(s.stage, s.status) for s in db.stages] == [(Stage.EVAL, Status.FAILED)]
    assert [s.stage for s in mail.stages] == [Stage.EVAL]  # never started: its first stage
