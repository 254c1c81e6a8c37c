"""The driver-side pieces of ``longctx train`` that need no running cluster: the capacity check
that turns an impossible ``--workers`` into one line, the pointer checkpoints reported to Ray
Train, the one-line failure message built from Ray Train's real error types, the loss curve read
back from TensorBoard event files, and the command that continues a run.

The Ray end-to-end behaviour (real cluster, DeepSpeed workers, resume, restarts) is in
test_launch_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from longctx.errors import LongctxError
from longctx.launch.ray_cluster import WorkerResources, check_capacity
from longctx.launch.ray_train import POINTER_FILE, read_pointer, write_pointer
from longctx.launch.train import continue_command, failure_line, loss_curve


def test_capacity_allows_one_worker_per_cpu():
    assert check_capacity(2, cpus=2, gpus=0, where="this machine", fix="") is False


def test_capacity_refuses_more_workers_than_cpus_naming_both_numbers():
    with pytest.raises(LongctxError) as caught:
        check_capacity(3, cpus=2, gpus=0, where="this machine", fix=", or add nodes")
    assert str(caught.value) == (
        "--workers 3 needs 3 CPUs but this machine has 2; pass --workers 2 or fewer, or add nodes"
    )


def test_capacity_on_a_gpu_cluster_needs_one_gpu_per_worker():
    assert check_capacity(4, cpus=64, gpus=4, where="the cluster", fix="") is True
    with pytest.raises(LongctxError, match="needs one GPU each but the cluster has 4 GPUs"):
        check_capacity(8, cpus=64, gpus=4, where="the cluster", fix="")


def test_backend_is_gloo_on_cpu_and_nccl_on_gpu():
    cpu = WorkerResources(num_workers=2, cpus_per_worker=1, use_gpu=False, description="")
    gpu = WorkerResources(num_workers=2, cpus_per_worker=1, use_gpu=True, description="")
    assert (cpu.backend, gpu.backend) == ("gloo", "nccl")


def test_pointer_checkpoint_round_trips_an_absolute_path(tmp_path: Path, monkeypatch):
    """A relative checkpoint path is stored absolute: Ray may read the pointer from another
    working directory (a restarted worker)."""
    monkeypatch.chdir(tmp_path)
    pointer_dir = tmp_path / "pointer"
    pointer_dir.mkdir()
    write_pointer(pointer_dir, "run/checkpoints/step_000010", step=10)
    assert read_pointer(pointer_dir) == str(tmp_path / "run" / "checkpoints" / "step_000010")
    assert json.loads((pointer_dir / POINTER_FILE).read_text())["step"] == 10


def test_failure_line_names_the_first_failing_rank_and_its_error():
    from ray.train import WorkerGroupError

    error = WorkerGroupError(
        "2 workers failed",
        {
            1: RuntimeError("Traceback (most recent call last):\n  ...\nValueError: bad batch"),
            0: RuntimeError("Connection closed by peer"),
        },
    )
    assert failure_line(error) == "training failed on rank 0: Connection closed by peer"


def test_failure_line_of_a_controller_error_is_its_last_line():
    from ray.train import ControllerError

    error = ControllerError(RuntimeError("scheduling failed\nno resources for 2 workers"))
    assert failure_line(error) == "training failed: no resources for 2 workers"


def test_loss_curve_reads_back_what_tensorboard_logged(tmp_path: Path):
    """Written with TensorBoard's own SummaryWriter (two sessions, as a resumed run has), read
    back ordered by step; float32 storage bounds the error."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(0)
    losses = {step: float(v) for step, v in zip(range(5, 45, 5), rng.uniform(1, 7, size=8))}
    for steps in (list(losses)[:4], list(losses)[4:]):
        writer = SummaryWriter(str(tmp_path))
        for step in steps:
            writer.add_scalar("train/loss", losses[step], step)
            writer.add_scalar("train/lr", 1e-3, step)
        writer.close()
    curve = loss_curve(tmp_path)
    assert [step for step, _ in curve] == sorted(losses)
    np.testing.assert_allclose(
        [v for _, v in curve], [losses[s] for s in sorted(losses)], rtol=1e-6
    )


def test_loss_curve_of_a_missing_directory_is_empty(tmp_path: Path):
    assert loss_curve(tmp_path / "absent") == []


def test_continue_command_keeps_overrides_and_doubles_the_steps():
    args = argparse.Namespace(
        recipe="recipes/demo.yaml",
        set=["trainer.lr=1e-3", "trainer.steps=300", "name=my run"],
        workers=2,
        address=None,
    )
    assert shlex.split(continue_command(args, steps=300)) == [
        "longctx", "train", "recipes/demo.yaml",
        "--set", "trainer.lr=1e-3", "--set", "name=my run",
        "--workers", "2",
        "--resume", "latest", "--set", "trainer.steps=600",
    ]  # fmt: skip
