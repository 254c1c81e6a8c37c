"""Ray Train side of a run: the per-worker loop, checkpoint reporting, and ``TorchTrainer``.

Ray Train's ``TorchTrainer`` starts one worker per rank and initialises ``torch.distributed``
(gloo between CPU processes, NCCL between GPUs); each worker runs ``train_loop_per_worker``,
which calls ``train_worker(job, report)`` (``longctx.trainer.worker``).

Checkpoints. The workers write them into ``RUN/checkpoints/step_N`` (DESIGN section 8); that tree
is the source of truth for ``--resume``. Each one is also reported to Ray Train as a *pointer
checkpoint*: a tiny directory holding ``longctx_checkpoint.json`` with the absolute path of the
real one, which Ray stores in its own run directory ``RUN/ray/<launch id>/step_N`` (copying the
real checkpoint would double the disk use). When a worker crashes, Ray Train restarts the whole
group (up to ``trainer.max_failures`` times, its ``FailureConfig``) and the new workers read the
latest pointer through ``ray.train.get_checkpoint()`` and resume from that checkpoint. Each
invocation is a fresh Ray run (a new launch id), so a pointer left by an earlier invocation never
overrides the ``--resume`` the user asked for.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from longctx.checkpoint.store import latest_checkpoint
from longctx.launch.ray_cluster import WorkerResources

POINTER_FILE = "longctx_checkpoint.json"
SUMMARY_FILE = "summary.json"

WorkerFn = Callable[..., dict]


def write_pointer(directory: str | Path, checkpoint_dir: str | Path, step: int | None) -> None:
    """Write the pointer file for ``checkpoint_dir`` (taken after ``step``) into ``directory``."""
    pointer = {"path": os.path.abspath(checkpoint_dir), "step": step}
    Path(directory, POINTER_FILE).write_text(json.dumps(pointer) + "\n")


def read_pointer(directory: str | Path) -> str:
    """The checkpoint path that a pointer directory refers to."""
    return json.loads(Path(directory, POINTER_FILE).read_text())["path"]


def restart_checkpoint(reported: str) -> str:
    """Where a restarted worker group resumes: the run's ``checkpoints/latest``.

    Ray Train hands back the last pointer it *collected*, which can lag the checkpoints on disk
    (reports are collected asynchronously) and may name one that ``keep_last`` has already
    deleted; the run's ``latest`` is at least as new and always exists. Once this launch has
    reported a checkpoint, ``latest`` is this launch's own.
    """
    newest = latest_checkpoint(Path(reported).parent.parent)  # RUN/checkpoints/step_N -> RUN
    return str(newest) if newest is not None else reported


class RayTrainReporter:
    """The ``report(metrics, checkpoint_dir)`` callback given to ``train_worker``: reports each
    checkpoint to Ray Train, as a pointer checkpoint with the step's metrics.

    Reports without a checkpoint are not forwarded: Ray Train keeps only the metrics attached to
    checkpoints, and every ``ray.train.report`` blocks until the Train controller collects it
    (about 2 s, its polling interval), which would dominate a fast step. ``ray.train.report`` is a
    barrier; the trainer checkpoints at the same steps on every rank, so every rank still makes
    the same calls.
    """

    def __call__(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir is None:
            return
        with tempfile.TemporaryDirectory(prefix="longctx-pointer-") as pointer_dir:
            write_pointer(pointer_dir, checkpoint_dir, metrics.get("step"))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(pointer_dir),
                # Named after the real checkpoint, so RUN/ray/<launch>/step_N mirrors it.
                checkpoint_dir_name=Path(checkpoint_dir).name,
            )


def _quiet_ray_report_log() -> None:
    """Ray Train logs "Reporting training result ..." at INFO for every report of every rank,
    through a logger named after its source file, which Ray Train's own log level misses; raise
    that one logger to WARNING."""
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin is not None:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def worker_log(log_dir: str | Path, rank: int) -> Path:
    """``LOG_DIR/rank_N.log``: where worker ``rank`` writes its stdout and stderr."""
    return Path(log_dir) / f"rank_{rank}.log"


@contextmanager
def output_to(path: Path, header: str) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so the output of C
    extensions and of compilers DeepSpeed starts lands there too) to the end of ``path`` for
    the block, after a ``header`` line; an exception leaving the block is written there with
    its traceback. Restores both afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        print(header, flush=True)
        try:
            yield
        except BaseException:
            traceback.print_exc()
            raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)


def train_loop_per_worker(config: dict) -> None:
    """What each Ray Train worker runs (``torch.distributed`` is already initialised by Ray).

    ``config``: ``job`` (a ``TrainJob``, or another job with a ``run_dir``), ``worker_fn``
    (``train_worker`` or a function with its signature), ``env`` (variables to set before
    DeepSpeed is imported), ``workdir`` (the driver's working directory on an embedded cluster,
    so that relative recipe paths mean the same on the workers; None on a joined cluster),
    ``summary_path`` (where rank 0 writes the summary ``worker_fn`` returns) and ``log_dir``
    (None: output goes where Ray sends it; else each rank's goes to ``worker_log``).
    """
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    if config["log_dir"] is None:
        _run_worker(config, rank)
        return
    header = f"--- {context.get_experiment_name()} rank {rank} pid {os.getpid()} ---"
    with output_to(worker_log(config["log_dir"], rank), header):
        _run_worker(config, rank)


def _run_worker(config: dict, rank: int) -> None:
    import ray.train

    os.environ.update(config["env"])
    if config["workdir"] is not None:
        os.chdir(config["workdir"])
    _quiet_ray_report_log()
    job = config["job"]
    restored = ray.train.get_checkpoint()
    if restored is not None:
        # Ray Train restarted the group after a failure: continue from this launch's newest
        # checkpoint rather than from what the command line asked for.
        with restored.as_directory() as pointer_dir:
            job = job.resuming(restart_checkpoint(read_pointer(pointer_dir)))
    summary = config["worker_fn"](job, RayTrainReporter())
    if rank == 0:
        # Ray's Result carries only metrics attached to checkpoints; the summary goes to a file.
        Path(config["summary_path"]).write_text(json.dumps(summary, default=str) + "\n")


def new_launch_id() -> str:
    """Name of one invocation's Ray run: ``launch-YYYYmmdd-HHMMSS-<pid>``."""
    return f"launch-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"


@dataclass(frozen=True)
class RayRun:
    """What a finished run leaves: rank 0's summary and Ray Train's run directory."""

    summary: dict[str, Any]
    ray_dir: Path


def fit_on_ray(
    job: Any,
    resources: WorkerResources,
    *,
    launch_id: str,
    max_failures: int,
    workdir: str | None,
    worker_fn: WorkerFn | None = None,
    log_dir: Path | None = None,
) -> RayRun:
    """Run ``worker_fn(job, report)`` (default: ``train_worker`` with a ``TrainJob``) on
    ``resources.num_workers`` Ray Train workers, as Ray run ``RUN/ray/<launch_id>`` (``RUN``:
    ``job.run_dir``). With ``log_dir`` each worker's output goes to ``LOG_DIR/rank_N.log``.

    Raises ``ray.train.TrainingFailedError`` when the workers fail more than ``max_failures``
    times (each failure restarts the group from the last reported checkpoint).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if worker_fn is None:
        from longctx.trainer.worker import train_worker as worker_fn
    storage = (Path(job.run_dir) / "ray").resolve()  # Ray Train wants an absolute path
    ray_dir = storage / launch_id
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job,
            "worker_fn": worker_fn,
            "env": resources.worker_env,
            "workdir": workdir,
            "summary_path": str(ray_dir / SUMMARY_FILE),
            "log_dir": None if log_dir is None else str(log_dir.resolve()),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
            placement_strategy=resources.placement_strategy,
        ),
        torch_config=TorchConfig(backend=resources.backend),
        run_config=ray.train.RunConfig(
            name=launch_id,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()
    return RayRun(summary=json.loads((ray_dir / SUMMARY_FILE).read_text()), ray_dir=ray_dir)
