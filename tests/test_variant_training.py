"""Each sparse attention variant (power, nsa, mosa, landmark) trains through ``longctx train`` on 2
workers in ring mode, lowers the loss and resumes exactly (issue 7).

Per variant, two invocations of the real CLI against one shared local Ray cluster:

1. the uninterrupted run: 6 fp32 steps of a tiny random model (2 layers, hidden 64, 256-token
   rows of generated filler text; landmark rows grow to 264 tokens with the landmarks the
   trainer inserts) on ``--workers 2 --set parallel.ring=2`` (one sequence-parallel group: each
   worker holds half of every sequence; power runs the real ring, nsa / mosa / landmark gather
   the keys), checkpointing at steps 3 and 6;
2. the resumed run: a new run directory holding only the step-3 checkpoint of run 1 (as if
   run 1 had stopped there) continued by ``--resume latest`` to step 6.

References: run 1's own first logged loss (the loss must fall by more than ``LOSS_DROP`` at
lr 1e-2, about a third of what the variants drop on this data), and run 1's steps 4-6 and its
final checkpoint for run 2: same-layout resume is bit-exact, so the logged losses must agree
within rel 1e-6 (TensorBoard stores float32) and the final weights and AdamW moments must be
equal (``torch.equal``).

Cost: 8 launches. Ray's own start-up is paid once (``ray start --head`` in a module fixture,
each launch joins it with ``--address``), and the 4 variants run at the same time, each its
uninterrupted run then its resume, so that their workers' start-up and Ray Train's polling
waits overlap. The cluster declares 2 CPUs per variant (8), oversubscribing a 2-core machine
the way the embedded cluster does for more workers than cores; every worker runs one thread.
Each launch still costs about 28 CPU-seconds (the CLI driver, 2 workers importing DeepSpeed,
Ray Train's controller and helper actors), so the module needs about 250 CPU-seconds, over two
minutes even on an idle 2-core machine: it is marked ``heavy`` (``make test-heavy``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from test_multinode_ray import stop_node
from trainer_helpers import TOKENIZER_VOCAB, make_data

from longctx.checkpoint.run_dir import TENSORBOARD_DIR
from longctx.checkpoint.sharded_state import iter_model_tensors
from longctx.checkpoint.store import CHECKPOINTS_DIR, LATEST_FILE, checkpoint_tag
from longctx.launch.train import loss_curve
from longctx.parallel.ports import free_port

pytestmark = [pytest.mark.heavy, pytest.mark.slow]  # 8 Ray launches of 2 workers (4 at a time)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VARIANTS = ("power", "nsa", "mosa", "landmark")
STEPS = 6
RESUME_STEP = STEPS // 2
LOSS_DROP = 0.5  # the last logged loss must lie this far below the first (nats per token)
RTOL = 1e-6
START_TIMEOUT_S = 600  # a loaded 2-core machine may need minutes to start the head
LAUNCH_TIMEOUT_S = 900


def ray_env() -> dict[str, str]:
    """Environment of the head node and of each ``longctx train``: no usage statistics, the
    compiled DeepSpeed op cache, no Ray memory monitor (other programs' memory on a shared
    machine would make it kill workers), a patient raylet start, and no Ray Train preemption
    watcher (one actor fewer to start per launch; the embedded cluster turns it off too)."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_raylet_start_wait_time_s": "300",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
        "COLUMNS": "200",
    }


@contextlib.contextmanager
def ray_head(cpus: int, log: Path) -> Iterator[str]:
    """A ``ray start --head --block`` node on 127.0.0.1 declaring ``cpus`` CPUs, in a session of
    its own; yields its GCS address. On exit the node is sent SIGTERM (Ray then stops its
    processes) and whatever is left in its session is killed (``ray stop`` would also stop
    Ray clusters that other programs run on this machine)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray's socket paths must stay under 107 bytes: a short directory, not pytest's tmp_path.
    ray_temp = tempfile.mkdtemp(prefix="lcray-", dir="/tmp")
    ports = {
        "port": port,
        "dashboard-port": free_port(),
        "ray-client-server-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
    }
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",  # Ray Train's controller queries the state API it serves
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        f"--temp-dir={ray_temp}",
        *(f"--{name}={value}" for name, value in ports.items()),
    ]
    with log.open("w") as out:
        node = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while subprocess.run(
            [str(BIN / "ray"), "status", f"--address={address}"], capture_output=True, env=ray_env()
        ).returncode:
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(2)
        yield address
    finally:
        stop_node(node, grace_s=10)
        shutil.rmtree(ray_temp, ignore_errors=True)


def variant_recipe(variant: str, corpus: Path, tokenizer: Path) -> dict:
    """The tiny recipe for ``variant``: 256-token rows, 6 steps at lr 1e-2 (warmup 1, cosine to
    1e-3), checkpoints every 3 steps, no evaluation. Variant settings follow the studies
    (recipes/studies/) scaled to 256 tokens: power blocks of 32 (8 blocks), NSA l=16, d=8,
    l'=32, n=3, w=32, MoSA 2 dense + 2 routed heads at rho=4, a landmark after every 32 tokens.
    ``model.vocab_size`` is 8 above the tokenizer's so that the landmark token (the last id) is
    no text piece; the other variants share the same model shape."""
    return {
        "name": f"variant-{variant}",
        "model": {
            "vocab_size": TOKENIZER_VOCAB + 8,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        },
        "attention": {
            "variant": variant,
            "chunk_size": 32,
            "power": {"block_size": 32, "window_blocks": 1, "sink_blocks": 1},
            "nsa": {
                "compress_block": 16,
                "compress_stride": 8,
                "select_block": 32,
                "select_top_n": 3,
                "window": 32,
            },
            "mosa": {"dense_heads": 2, "sparsity": 4},
            "landmark": {"block_size": 32},
        },
        "data": {
            "sources": [str(corpus)],
            "tasks": {"text": 1.0},
            "seq_len": 256,
            "tokenizer": {"path": str(tokenizer)},
            "eval_fraction": 0.1,
        },
        "trainer": {
            "seed": 3,
            "steps": STEPS,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "lr": 1e-2,
            "min_lr": 1e-3,
            "warmup_steps": 1,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "zero_stage": 0,
            "dtype": "fp32",
            "log_every": 1,
            "eval_every": 0,
            "ckpt_every": RESUME_STEP,
            "keep_last": 2,
        },
    }


@dataclass
class VariantRuns:
    """One variant's two invocations: run directories and finished processes (``resumed`` is
    None when the uninterrupted run failed)."""

    full_dir: Path
    resumed_dir: Path
    full: subprocess.CompletedProcess
    resumed: subprocess.CompletedProcess | None


def longctx_train(recipe: Path, run_dir: Path, address: str, *extra: str):
    """``longctx train RECIPE --workers 2 --set parallel.ring=2`` joined to ``address``."""
    command = [
        str(BIN / "longctx"),
        "train",
        str(recipe),
        "--workers",
        "2",
        "--address",
        address,
        "--set",
        "parallel.ring=2",
        "--set",
        f"trainer.run_dir={run_dir}",
        *extra,
    ]
    return subprocess.run(
        command,
        cwd=recipe.parent,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        env=ray_env(),
    )


def copy_resume_point(full_dir: Path, resumed_dir: Path) -> None:
    """A run directory holding only ``full_dir``'s step-``RESUME_STEP`` checkpoint, marked
    latest: what the uninterrupted run would have left had it stopped after that step."""
    tag = checkpoint_tag(RESUME_STEP)
    checkpoints = resumed_dir / CHECKPOINTS_DIR
    shutil.copytree(full_dir / CHECKPOINTS_DIR / tag, checkpoints / tag)
    (checkpoints / LATEST_FILE).write_text(tag + "\n")


def train_and_resume(
    variant: str, root: Path, data: tuple[Path, Path], address: str
) -> VariantRuns:
    """Run 1 (uninterrupted) then, from a copy of its step-3 checkpoint, run 2 (resumed);
    ``data``: the corpus and tokenizer."""
    recipe = root / variant / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump(variant_recipe(variant, *data)))
    full_dir, resumed_dir = root / variant / "full", root / variant / "resumed"
    full = longctx_train(recipe, full_dir, address)
    resumed = None
    if full.returncode == 0:
        copy_resume_point(full_dir, resumed_dir)
        resumed = longctx_train(recipe, resumed_dir, address, "--resume", "latest")
    return VariantRuns(full_dir, resumed_dir, full, resumed)


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory) -> dict[str, VariantRuns]:
    root = tmp_path_factory.mktemp("variant_training")
    data = make_data(root / "data")
    with (
        ray_head(2 * len(VARIANTS), root / "head.log") as address,
        ThreadPoolExecutor(len(VARIANTS)) as pool,
    ):
        futures = {v: pool.submit(train_and_resume, v, root, data, address) for v in VARIANTS}
        return {variant: future.result() for variant, future in futures.items()}


def finished(run: subprocess.CompletedProcess | None) -> subprocess.CompletedProcess:
    """``run``, asserted to have finished with exit code 0 (its output as the message)."""
    assert run is not None, "the uninterrupted run failed (see its test)"
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def full_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: the model weights and the AdamW moments, each assembled
    from its per-rank fragments."""
    return {
        f"{key}/{name}": tensor
        for key in ("param", "exp_avg", "exp_avg_sq")
        for name, tensor in iter_model_tensors(checkpoint, key=key)
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_in_ring_mode_and_lowers_the_loss(variant_runs, variant):
    runs = variant_runs[variant]
    output = finished(runs.full).stdout
    assert "dp 1 x ulysses 1 x ring 2 = 2 ranks" in output
    resolved = yaml.safe_load((runs.full_dir / "config.yaml").read_text())
    assert resolved["attention"]["variant"] == variant
    curve = loss_curve(runs.full_dir / TENSORBOARD_DIR)
    assert [step for step, _ in curve] == list(range(1, STEPS + 1))
    (_, first), (_, last) = curve[0], curve[-1]
    assert last < first - LOSS_DROP, curve


@pytest.mark.parametrize("variant", VARIANTS)
def test_resumed_variant_logs_the_uninterrupted_losses(variant_runs, variant):
    runs = variant_runs[variant]
    output = finished(runs.resumed).stdout
    resume_point = runs.resumed_dir / CHECKPOINTS_DIR / checkpoint_tag(RESUME_STEP)
    assert f"resumed from {resume_point} at step {RESUME_STEP}" in output
    resumed = loss_curve(runs.resumed_dir / TENSORBOARD_DIR)
    uninterrupted = loss_curve(runs.full_dir / TENSORBOARD_DIR)[RESUME_STEP:]
    assert [step for step, _ in resumed] == list(range(RESUME_STEP + 1, STEPS + 1))
    assert [step for step, _ in uninterrupted] == [step for step, _ in resumed]
    for (step, loss), (_, expected) in zip(resumed, uninterrupted):
        assert loss == pytest.approx(expected, rel=RTOL), step


@pytest.mark.parametrize("variant", VARIANTS)
def test_resumed_variant_ends_with_the_uninterrupted_weights(variant_runs, variant):
    runs = variant_runs[variant]
    finished(runs.resumed)
    tag = checkpoint_tag(STEPS)
    resumed = full_state(runs.resumed_dir / CHECKPOINTS_DIR / tag)
    expected = full_state(runs.full_dir / CHECKPOINTS_DIR / tag)
    assert resumed.keys() == expected.keys()
    unequal = [name for name, tensor in expected.items() if not torch.equal(resumed[name], tensor)]
    assert not unequal, unequal
