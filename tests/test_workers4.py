"""``longctx train --workers 4`` on a machine with fewer cores (issue 5): the embedded Ray cluster
oversubscribes the CPUs explicitly, one thread per worker, and says so.

- ``embedded_cpu_plan``: the CPUs Ray is told about and each worker's share, written out by hand
  for an even split, an oversubscribed machine and a request beyond the per-core limit;
- end to end (slow): ``recipes/tiny.yaml`` as ring 2 x dp 2 on 4 workers logs the same fp32 loss
  at each of 4 steps as the same data-parallel layout without sequence parallelism (dp 2 on 2
  workers, the reference), within rtol 1e-5: both see the same two data-parallel shards, and
  SPECS 1.6 makes the ring-sharded loss equal the full-sequence one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.errors import LongctxError
from longctx.launch.ray_cluster import MAX_WORKERS_PER_CPU, embedded_cpu_plan, local_cpu_count

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
LONGCTX = Path(sys.executable).parent / "longctx"
STEPS = 4


def test_workers_within_the_cores_split_them_evenly():
    assert embedded_cpu_plan(workers=2, cpus=8) == (8, 4)
    assert embedded_cpu_plan(workers=3, cpus=8) == (8, 2)  # 8 // 3; the rest stays idle


def test_more_workers_than_cores_get_one_logical_cpu_each():
    # 4 workers on 2 cores: Ray is told 4 CPUs, each worker takes 1 (so one thread).
    assert embedded_cpu_plan(workers=4, cpus=2) == (4, 1)
    assert embedded_cpu_plan(workers=8, cpus=2) == (8, 1)


def test_more_than_the_per_core_limit_is_a_one_line_error():
    assert MAX_WORKERS_PER_CPU == 4
    with pytest.raises(LongctxError) as error:
        embedded_cpu_plan(workers=9, cpus=2)
    assert str(error.value) == (
        "--workers 9 would put 4.5 workers on each of this machine's 2 CPUs (at most 4 per CPU "
        "are run); pass --workers 8 or fewer, or join a larger cluster with --address"
    )


def _train(tmp_path: Path, name: str, workers: int, ring: int) -> subprocess.CompletedProcess:
    run_dir = tmp_path / name
    overrides = {
        "parallel.ring": ring,
        "trainer.run_dir": run_dir,
        "trainer.steps": STEPS,
        "trainer.log_every": 1,
        "trainer.warmup_steps": 1,
        "trainer.eval_every": 0,
        "trainer.ckpt_every": STEPS,
        "data.tasks": "{text: 1.0}",  # no passkey check at the end: only the loss matters
    }
    command = [str(LONGCTX), "train", str(TINY), "--workers", str(workers)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
        # Other programs' memory on a shared machine must not make Ray kill these workers.
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_raylet_start_wait_time_s": "300",  # a loaded 2-core machine starts Ray slowly
        "COLUMNS": "200",
    }
    return subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env
    )


@pytest.mark.heavy
@pytest.mark.slow
def test_ring2_dp2_on_four_workers_has_the_dp2_loss_curve(tmp_path: Path):
    from longctx.launch.train import loss_curve

    four = _train(tmp_path, "ring2-dp2", workers=4, ring=2)
    assert four.returncode == 0, four.stdout + four.stderr
    assert "dp 2 x ulysses 1 x ring 2 = 4 ranks" in four.stdout
    if local_cpu_count() < 4:
        assert "oversubscribed" in four.stdout
        assert "oversubscribing this machine: 4 workers share" in four.stderr
    two = _train(tmp_path, "dp2", workers=2, ring=1)
    assert two.returncode == 0, two.stdout + two.stderr
    curves = {name: loss_curve(tmp_path / name / "tensorboard") for name in ("ring2-dp2", "dp2")}
    assert [step for step, _ in curves["ring2-dp2"]] == list(range(1, STEPS + 1))
    assert [step for step, _ in curves["dp2"]] == list(range(1, STEPS + 1))
    for (_, ring_loss), (_, dp_loss) in zip(curves["ring2-dp2"], curves["dp2"]):
        assert ring_loss == pytest.approx(dp_loss, rel=1e-5, abs=1e-6)
