"""The driver's terminal under ``longctx train``: rank 0's progress written as events by the
worker's ``ProgressDisplay`` and replayed by the driver (``launch/progress.py``), and the
``TrainJob`` the driver hands to the workers (pickled by Ray)."""

from __future__ import annotations

import io
import pickle
import threading
import time
from pathlib import Path

from longctx.config.recipe import Recipe
from longctx.launch.progress import follow_progress
from longctx.trainer.job import TrainJob
from longctx.trainer.metrics import ProgressDisplay, ProgressReplay

VALUES = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5}


def _worker_display(events: Path, stream: io.StringIO) -> None:
    display = ProgressDisplay(4, 2, enabled=True, stream=stream, events=events)
    display.message("resumed from runs/x/checkpoints/step_000002 at step 2")
    display.update(3, None)
    display.update(4, VALUES)
    display.message("checkpoint runs/x/checkpoints/step_000004")
    display.close()


def test_replayed_events_print_what_rank_0_printed(tmp_path: Path):
    events, printed = tmp_path / "progress.jsonl", io.StringIO()
    _worker_display(events, printed)
    replayed = io.StringIO()
    with follow_progress(events, replayed):  # empties the file first
        _worker_display(events, io.StringIO())
    assert replayed.getvalue() == printed.getvalue()
    assert "step 4/4 loss 2.5000" in replayed.getvalue()


def test_the_driver_shows_lines_while_the_workers_run(tmp_path: Path):
    events, replayed = tmp_path / "progress.jsonl", io.StringIO()
    with follow_progress(events, replayed):
        writer = threading.Thread(target=_worker_display, args=(events, io.StringIO()))
        writer.start()
        writer.join()
        deadline = time.monotonic() + 10
        while "checkpoint" not in replayed.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "checkpoint runs/x/checkpoints/step_000004" in replayed.getvalue()


def test_a_restarted_group_starts_a_new_display():
    replay = ProgressReplay(io.StringIO())
    replay.feed({"start": 0, "total": 4})
    replay.feed({"step": 1, "values": VALUES})
    replay.feed({"start": 0, "total": 4})  # Ray Train restarted the group
    replay.feed({"step": 1, "values": VALUES})
    replay.close()
    out = replay.stream.getvalue()
    assert out.count("step 1/4 loss") == 2


def test_a_train_job_survives_pickling_and_its_json_form():
    recipe = Recipe.model_validate({"name": "job", "trainer": {"run_dir": "/tmp/job"}})
    job = TrainJob(recipe, "/tmp/job", resume="latest", launch_id="launch-1", last_stage=0)
    assert pickle.loads(pickle.dumps(job)) == job
    assert TrainJob.coerce(job.to_dict()) == job
    assert TrainJob.coerce(job) is job
    assert job.resuming("/tmp/job/checkpoints/step_000002").resume.endswith("step_000002")
    assert job.for_stage(1).last_stage == 1
