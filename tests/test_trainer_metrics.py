"""Metrics of a real 2-rank run: TensorBoard scalars read back with tensorboard's own
``EventAccumulator``, the reports every rank makes, and the terminal output.

References: the values each rank reported (TensorBoard stores float32), the warmup + cosine
closed form for the learning rate, and the loop's own summary.
"""

from __future__ import annotations

import io
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_helpers import finished_run

from longctx.trainer.metrics import ProgressDisplay, format_metrics

EXPECTED_TAGS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/step_time_s",
    "train/peak_memory_gib",
    "train/bad_steps",
    "eval/loss",
}
REPORT_KEYS = {
    "train/loss": "loss",
    "train/lr": "lr",
    "train/grad_norm": "grad_norm",
    "train/tokens_per_s": "tokens_per_s",
    "train/step_time_s": "step_time_s",
    "train/peak_memory_gib": "peak_memory_gib",
    "eval/loss": "eval_loss",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return finished_run(tmp_path_factory)


@pytest.fixture(scope="module")
def scalars(run) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run["run_dir"] / "tensorboard"))
    events.Reload()
    return {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }


def rank0_reports(run) -> dict[int, dict]:
    return {metrics["step"]: metrics for metrics, _ in run["results"][0][0]["reports"]}


def test_tensorboard_holds_every_training_scalar_at_every_logged_step(scalars):
    assert set(scalars) >= EXPECTED_TAGS
    for tag in EXPECTED_TAGS - {"eval/loss"}:
        assert sorted(scalars[tag]) == [1, 2, 3, 4, 5, 6], tag  # log_every 1
    assert sorted(scalars["eval/loss"]) == [3, 6]  # eval_every 3


def test_tensorboard_values_are_the_reported_values(scalars, run):
    reports = rank0_reports(run)
    for tag, key in REPORT_KEYS.items():
        for step, value in scalars[tag].items():
            assert value == pytest.approx(reports[step][key], rel=1e-6), (tag, step)
    assert all(value > 0 for value in scalars["train/tokens_per_s"].values())
    assert all(value > 0 for value in scalars["train/peak_memory_gib"].values())
    assert all(value == 0 for value in scalars["train/bad_steps"].values())


def test_logged_learning_rate_follows_warmup_then_cosine(scalars, run):
    cfg = run["recipe"].trainer
    for step, value in scalars["train/lr"].items():
        index = step - 1  # the rate the step used
        if index < cfg.warmup_steps:
            expected = cfg.lr * (index + 1) / cfg.warmup_steps
        else:
            progress = (index - cfg.warmup_steps) / (cfg.steps - 1 - cfg.warmup_steps)
            expected = cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress)) / 2
        assert value == pytest.approx(expected, rel=1e-6), step


def test_training_loss_falls(scalars):
    losses = scalars["train/loss"]
    assert losses[6] < losses[1] - 0.3


def test_every_rank_reports_the_same_metrics_and_each_checkpoint(run):
    reports = [rank[0]["reports"] for rank in run["results"]]
    for rank_reports in reports:
        assert [m["step"] for m, _ in rank_reports] == [1, 2, 3, 4, 5, 6]
        checkpoints = {m["step"]: c for m, c in rank_reports if c is not None}
        assert checkpoints == {
            step: str(run["run_dir"] / "checkpoints" / f"step_{step:06d}") for step in (2, 4, 6)
        }
    for (m0, _), (m1, _) in zip(*reports):
        assert m0["loss"] == m1["loss"] and m0.get("eval_loss") == m1.get("eval_loss")


def test_summary_names_the_final_step_losses_and_checkpoint(run):
    summary = run["results"][0][0]["summary"]
    last = rank0_reports(run)[6]
    assert summary["step"] == 6 and summary["bad_steps"] == 0
    assert summary["loss"] == last["loss"] and summary["eval_loss"] == last["eval_loss"]
    assert summary["checkpoint"] == str(run["run_dir"] / "checkpoints" / "step_000006")


def test_progress_prints_one_line_per_logged_step_off_a_terminal():
    stream = io.StringIO()  # not a TTY: plain lines, as under Ray or in CI
    display = ProgressDisplay(10, 0, enabled=True, stream=stream)
    values = {
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 1234.0,
        "step_time_s": 0.25,
        "peak_memory_gib": 1.5,
    }
    display.update(1, None)  # not a logged step: nothing printed
    display.update(2, values)
    display.message("checkpoint runs/x/checkpoints/step_000002")
    display.close()
    assert stream.getvalue().splitlines() == [
        "step 2/10 loss 2.5000 lr 1.00e-03 grad_norm 0.500 tok/s 1,234 step 250 ms mem 1.50 GiB",
        "checkpoint runs/x/checkpoints/step_000002",
    ]


def test_other_ranks_print_nothing():
    stream = io.StringIO()
    display = ProgressDisplay(10, 0, enabled=False, stream=stream)
    display.update(2, {"loss": 1.0})
    display.message("hello")
    assert stream.getvalue() == ""


def test_format_metrics_mentions_eval_loss_and_bad_steps():
    line = format_metrics(5, 9, {"loss": 1.0, "eval_loss": 2.0, "bad_steps": 2.0})
    assert line == "step 5/9 loss 1.0000 eval_loss 2.0000 bad_steps 2"


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_with_the_metrics_on_a_terminal():
    stream = TerminalStream()
    display = ProgressDisplay(10, 4, enabled=True, stream=stream)  # resumed at step 4
    display.update(7, {"loss": 2.5})
    display.close()
    screen = stream.getvalue()
    assert "7/10" in screen and "step 7/10 loss 2.5000" in screen
