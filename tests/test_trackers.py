"""Run tracking (issue 20): ``trainer.trackers`` fans scalars and figures out to TensorBoard and
wandb (offline in tests) through one ``Trackers`` object, and a recipe asking for wandb without
the package is refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from longctx.trainer.metrics import MetricsWriter  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def test_wandb_gets_the_same_scalars_and_images_as_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(tmp_path / "tensorboard", trackers=["tensorboard", "wandb"])
    writer.write(1, {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.7})
    writer.write(2, {"loss": 2.1, "eval_loss": 2.4})
    figure = plt.figure()
    plt.plot([0, 1], [1, 0])
    writer.writer.add_figure("eval_passkey/heatmap", figure, 2)
    writer.writer.flush()
    writer.write(3, {"loss": 2.0})  # step 2's row goes to wandb once step 3 arrives
    summary = dict(writer.writer.wandb.summary)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalar_tags = set(events.Tags()["scalars"])
    assert scalar_tags == {"train/loss", "train/lr", "train/grad_norm", "eval/loss"}
    assert {k for k in summary if not k.startswith("_") and k in scalar_tags} == scalar_tags
    assert summary["train/loss"] == 2.1 and summary["eval/loss"] == 2.4
    assert set(events.Tags()["images"]) == {"eval_passkey/heatmap"}
    assert summary["eval_passkey/heatmap"]["_type"] == "image-file"
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_selected_but_not_installed_exits_2_in_one_line():
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "from longctx.launch.cli import main\n"
        f"sys.exit(main(['train', {str(TINY)!r}, '--dry-run', '--set', "
        "'trainer.trackers=[tensorboard, wandb]']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert "wandb package is not installed" in err and "\n" not in err
