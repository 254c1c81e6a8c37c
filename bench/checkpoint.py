"""Per-rank memory of Hugging Face init, training steps, checkpoint save and restore, through the
real ``longctx train`` path (Ray workers, DeepSpeed ZeRO-3 and ZeRO-2), against issue 18's
targets.

Run: ``python -m longctx.bench.checkpoint`` (ZeRO-3 at 2 workers; ``make bench`` runs this),
``--workers 2 4`` to add 4 workers (which oversubscribe a 2-core machine: about 6 minutes for
both, so ``make bench`` leaves it out and the report shows what the last run measured),
``--zero 2`` (ZeRO-2, about as long again; ``make bench`` skips it) or ``--zero 3 2`` for both. Prints a table and writes one JSON per ZeRO stage:
``bench/results/checkpoint.json`` (ZeRO-3) and ``checkpoint_zero2.json``.

Model: the issue's (hidden 1024, 8 layers, 16 heads, MLP 2816, vocab 32000: 168M parameters),
random weights saved as a Hugging Face checkpoint in 100 MB safetensors shards with an index;
the recipe starts from it (``model.init: hf:DIR``), fp32, 256-token sequences. Per ZeRO stage
and worker count, two runs of ``python -m longctx.launch train``: the first trains ``--steps``
steps and saves at the end; the second (``--resume latest``, one step more) restores, trains a
step and saves again. ZeRO-2 runs ``--steps`` - 1 steps (at least one): its step peak is
reached in the first step, and the runs are the bench's slowest.

Sampling: every ``1 / --hz`` seconds (default 20 Hz) the resident set size (psutil) of every
process under the ``longctx train`` process (Ray's raylet and workers are its descendants) is
recorded with a timestamp. The trainer appends each rank's ``init``, ``save`` and ``restore``
spans with its pid to ``RUN/phases.jsonl`` (``trainer.metrics.timed_phase``), which names the
rank of a pid and the phases:

- HF init: the peak during the rank's ``init`` span minus its RSS at the start of the span
  (what building the model and loading its weights added); target under ZeRO-3 <= this rank's
  partition (4 bytes x params / W) + the largest tensor + 256 MiB, under ZeRO-2 <= one fp32 copy
  of the model (4 bytes x params) + the largest tensor + 256 MiB;
- step peak: the peak between the end of ``init`` and the start of the first ``save`` (engine
  start, optimizer state, the training steps);
- save / restore peak: the peak during each span; target <= step peak + full fp32 state / W
  (12 bytes x params: weights and both AdamW moments) + 256 MiB;
- save / restore wall time: the span's length on each rank.

A worker count whose runs fail (e.g. out of memory on a shared machine) is recorded with the
``error:`` line of ``longctx train`` and shown as such in the report.

RSS counts the whole process (torch, Ray, DeepSpeed), so the init row is a difference and the
save/restore rows compare peaks of the same process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from longctx.bench.measure import write_report
from longctx.launch.plan import FULL_STATE_BYTES, largest_parameter_numel
from longctx.model import ModelConfig, Transformer, save_hf
from longctx.trainer.metrics import PHASES_FILE

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint.json"
MiB = 2**20
SLACK = 256 * MiB
SHARD_BYTES = 100 * 10**6
ISSUE_MODEL = {
    "arch": "llama",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 1024,
}


def write_hf_checkpoint(directory: Path, model: dict[str, Any]) -> ModelConfig:
    """A randomly initialised model of shape ``model`` saved as a sharded HF checkpoint."""
    config = ModelConfig(**model)
    torch.manual_seed(0)
    save_hf(Transformer(config), config, directory, max_shard_bytes=SHARD_BYTES)
    return config


def recipe_dict(hf_dir: Path, run_dir: Path, steps: int, zero_stage: int) -> dict[str, Any]:
    return {
        "name": "bench-checkpoint",
        "model": {"init": f"hf:{hf_dir}"},
        "data": {
            "sources": ["builtin"],
            "tasks": {"text": 1.0},
            "seq_len": 256,
            "tokenizer": {"vocab_size": 512},
        },
        "trainer": {
            "run_dir": str(run_dir),
            "steps": steps,
            "micro_batch_size": 1,
            "grad_accum": 1,
            "warmup_steps": 1,
            "zero_stage": zero_stage,
            "dtype": "fp32",
            "log_every": 1,
            "eval_every": 0,
            "ckpt_every": steps,
            "keep_last": 2,
        },
    }


class RssSampler:
    """Samples the RSS of every descendant of ``root`` at ``hz`` in a thread: ``samples`` is a
    list of ``(time, {pid: rss bytes})``. The process list is refreshed every half second."""

    def __init__(self, root: int, hz: float):
        self.root, self.period = psutil.Process(root), 1.0 / hz
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        procs: list[psutil.Process] = []
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now - refreshed > 0.5:
                try:
                    procs = self.root.children(recursive=True)
                except psutil.NoSuchProcess:
                    return
                refreshed = now
            rss = {}
            for proc in procs:
                try:
                    rss[proc.pid] = proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.samples.append((now, rss))
            self._stop.wait(self.period)


def run_train(recipe: Path, workers: int, hz: float, resume: bool) -> list:
    """``longctx train`` in a subprocess while sampling; returns the samples."""
    command = [sys.executable, "-m", "longctx.launch", "train", str(recipe)]
    command += ["--workers", str(workers)] + (["--resume", "latest"] if resume else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RssSampler(process.pid, hz) as sampler:
        output, _ = process.communicate()
    if process.returncode != 0:  # the error: line (e.g. Ray's out-of-memory kill), shortened
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        raise RuntimeError(
            errors[-1][:300] if errors else f"longctx train exited {process.returncode}"
        )
    return sampler.samples


def _series(samples: list, pid: int) -> list[tuple[float, int]]:
    return [(t, rss[pid]) for t, rss in samples if pid in rss]


def _peak(series: list[tuple[float, int]], start: float, end: float) -> int:
    inside = [rss for t, rss in series if start <= t <= end]
    return max(inside) if inside else 0


def _at(series: list[tuple[float, int]], when: float) -> int:
    before = [rss for t, rss in series if t <= when]
    return before[-1] if before else series[0][1]


def analyse(phases: list[dict], samples: list, first: bool) -> dict[int, dict]:
    """Per rank: the phase peaks of one run (``first``: the init run, else the resume run)."""
    ranks: dict[int, dict] = {}
    for rank in sorted({p["rank"] for p in phases}):
        mine = [p for p in phases if p["rank"] == rank]
        pid = mine[0]["pid"]
        series = _series(samples, pid)
        out: dict[str, Any] = {"pid": pid}
        saves = [p for p in mine if p["phase"] == "save"]
        if first:
            init = next(p for p in mine if p["phase"] == "init")
            out["init_added_bytes"] = _peak(series, init["start"], init["end"]) - _at(
                series, init["start"]
            )
            out["init_seconds"] = init["end"] - init["start"]
            out["step_peak_bytes"] = _peak(series, init["end"], saves[0]["start"])
        else:
            restore = next(p for p in mine if p["phase"] == "restore")
            out["restore_peak_bytes"] = _peak(series, restore["start"], restore["end"])
            out["restore_seconds"] = restore["end"] - restore["start"]
        out["save_peak_bytes"] = max(_peak(series, p["start"], p["end"]) for p in saves)
        out["save_seconds"] = max(p["end"] - p["start"] for p in saves)
        ranks[rank] = out
    return ranks


def read_phases(run_dir: Path, since: float) -> list[dict]:
    lines = (run_dir / PHASES_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["start"] >= since]


def bench_workers(
    zero: int, workers: int, hf_dir: Path, config: ModelConfig, args, scratch: Path
) -> dict:
    """Both runs at ZeRO stage ``zero`` on ``workers`` workers; the per-rank numbers and
    targets."""
    run_dir = scratch / f"run_z{zero}_{workers}w"
    recipe = scratch / f"recipe_z{zero}_{workers}w.yaml"
    steps = args.steps if zero == 3 else max(1, args.steps - 1)
    recipe.write_text(yaml.safe_dump(recipe_dict(hf_dir, run_dir, steps, zero)))
    started = time.time()
    first = run_train(recipe, workers, args.hz, resume=False)
    init_run = analyse(read_phases(run_dir, started), first, first=True)
    recipe.write_text(yaml.safe_dump(recipe_dict(hf_dir, run_dir, steps + 1, zero)))
    resumed_at = time.time()
    second = run_train(recipe, workers, args.hz, resume=True)
    resume_run = analyse(read_phases(run_dir, resumed_at), second, first=False)
    params = config.num_parameters()
    largest = largest_parameter_numel(config) * 4
    ranks = []
    for rank, init in init_run.items():
        resumed = resume_run[rank]
        step = init["step_peak_bytes"]
        state_share = params * FULL_STATE_BYTES // workers
        ranks.append(
            {
                "rank": rank,
                "step_peak_bytes": step,
                "save_peak_bytes": init["save_peak_bytes"],
                "save_seconds": init["save_seconds"],
                "restore_peak_bytes": resumed["restore_peak_bytes"],
                "restore_seconds": resumed["restore_seconds"],
                "init_added_bytes": init["init_added_bytes"],
                "init_seconds": init["init_seconds"],
                "save_target_bytes": step + state_share + SLACK,
                "init_target_bytes": params * 4 // (workers if zero == 3 else 1) + largest + SLACK,
            }
        )
    return {"zero_stage": zero, "workers": workers, "steps": steps, "ranks": ranks}


def print_table(results: list[dict]) -> None:
    header = "ZeRO W rank   step    save (target)   restore   init+ (target)   save s  restore s"
    print(header)
    for case in results:
        if "error" in case:
            print(f"{case['zero_stage']:>4} {case['workers']} failed: {case['error']}")
        for r in case.get("ranks", []):
            print(
                f"{case['zero_stage']:>4} {case['workers']} {r['rank']:>4} "
                f"{r['step_peak_bytes'] / MiB:7.0f} "
                f"{r['save_peak_bytes'] / MiB:7.0f} ({r['save_target_bytes'] / MiB:5.0f}) "
                f"{r['restore_peak_bytes'] / MiB:8.0f} {r['init_added_bytes'] / MiB:8.0f} "
                f"({r['init_target_bytes'] / MiB:5.0f}) {r['save_seconds']:8.1f} "
                f"{r['restore_seconds']:9.1f}   MiB"
            )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, nargs="+", choices=[2, 3], default=[3])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--hz", type=float, default=20.0)
    parser.add_argument("--small", action="store_true", help="a tiny model (smoke run)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="ZeRO-3's JSON; ZeRO-2's sits beside it"
    )
    args = parser.parse_args(argv)
    model = ISSUE_MODEL | (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 600}
        if args.small
        else {}
    )
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        scratch = Path(tmp)
        config = write_hf_checkpoint(scratch / "hf", model)
        results = {zero: [] for zero in args.zero}
        for zero in args.zero:
            for workers in args.workers:
                try:
                    results[zero].append(
                        bench_workers(zero, workers, scratch / "hf", config, args, scratch)
                    )
                except RuntimeError as error:  # e.g. out of memory on a shared machine: say so
                    print(f"ZeRO-{zero}, W={workers}: {error}", file=sys.stderr)
                    results[zero].append(
                        {"zero_stage": zero, "workers": workers, "error": str(error)}
                    )
    reports = {}
    for zero, stage_results in results.items():
        reports[zero] = {
            "model": model,
            "parameters": config.num_parameters(),
            "full_fp32_state_bytes": config.num_parameters() * FULL_STATE_BYTES,
            "steps": args.steps,
            "sample_hz": args.hz,
            "results": stage_results,
        }
        print_table(stage_results)
        write_report(stage_path(args.out, zero), reports[zero])
    return reports


def stage_path(zero3_path: Path, zero: int) -> Path:
    """Where ZeRO stage ``zero``'s results go: ``zero3_path`` itself for ZeRO-3, else the file
    beside it with a ``_zero2`` suffix (``make bench`` refreshes ZeRO-3's alone)."""
    return zero3_path if zero == 3 else zero3_path.with_stem(f"{zero3_path.stem}_zero{zero}")


if __name__ == "__main__":
    main()
