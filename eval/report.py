"""Running an evaluation suite and recording it: JSON + PNG files, TensorBoard, the terminal.

``run_eval_suite`` evaluates the chosen tasks (``ppl``, ``passkey``, ``niah``) and
``write_eval_outputs`` stores them in a directory (the run's ``eval/step_NNNNNN/``)::

    ppl.json      PerplexityResult per length          ppl.png      loss by position
    passkey.json  RetrievalResult (grid + examples)    passkey.png  heatmap lengths x depths
    niah.json     the same for multi-key needles       niah.png     heatmap
    counting.json TaskAccuracyResult per length        counting.png accuracy by length
                  (also selective_copy, flip_flop: ``eval/task_accuracy.py``)

``log_eval_tensorboard`` adds scalars and the figures to a TensorBoard ``SummaryWriter``:

    eval_ppl/L{length}/nll_{start}-{end}   mean NLL of a position bucket
    eval_ppl/L{length}/nll                 mean NLL over all positions
    eval_{task}/accuracy                   mean exact-match accuracy over the grid
    eval_{task}/L{length}/accuracy         mean over depths at one length
    eval_{task}/token_accuracy             algorithmic tasks: answer tokens right (also per L)
    eval_{task}/heatmap, eval_ppl/loss_by_position   the figures (images)
    eval_{task}/accuracy_by_length         the algorithmic tasks' figure

``TrainingEvaluator`` is what the training loop calls at its eval steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure

from longctx.data import TokenDocument, Tokenizer, make_eval_example
from longctx.data.config import DataConfig, TaskParams
from longctx.data.long_text import long_text_documents
from longctx.data.sample import TargetTooShort
from longctx.errors import LongctxError
from longctx.eval.evaluate import (
    ALGORITHMIC_TASKS,
    EVAL_TASKS,
    RETRIEVAL_TASKS,
    PerplexityResult,
    RetrievalResult,
    check_grid,
    format_perplexity,
    format_table,
    held_out_windows,
    position_perplexity,
    retrieval_accuracy,
)
from longctx.eval.task_accuracy import (
    accuracy_figure,
    check_task_lengths,
    format_task_table,
    task_accuracy,
    task_scalars,
)
from longctx.model import Transformer

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from longctx.config.recipe import Recipe
    from longctx.parallel.batch import BatchTransform
    from longctx.parallel.mesh import ParallelMesh

EVAL_DIR = "eval"
EvalResults = dict[str, Any]  # "ppl": [PerplexityResult, ...], "passkey"/"niah": RetrievalResult


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate: tasks, context lengths, retrieval depths, examples per grid cell,
    windows per perplexity length, the examples' base seed, task parameters and the text
    perplexity scores (``ppl_text``: "held_out" or "long_text", see ``perplexity_documents``)."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int = 2
    ppl_windows: int = 4
    seed: int = 0
    params: TaskParams | None = None
    ppl_text: Literal["held_out", "long_text"] = "held_out"

    def check(self, tokenizer: Tokenizer, documents: Sequence[TokenDocument] | None) -> None:
        """Fail early (one line) on anything the evaluation would trip over later: an unknown
        task, an empty or bad grid, a length too short for a task's fixed text, perplexity
        without held-out text."""
        unknown = [task for task in self.tasks if task not in EVAL_TASKS]
        if unknown or not self.tasks:
            raise LongctxError(f"eval tasks {list(self.tasks)}: choose from {list(EVAL_TASKS)}")
        if not self.lengths or min(self.lengths) < 2:
            raise LongctxError(f"eval lengths {list(self.lengths)} must be >= 2 tokens, non-empty")
        for task in self.tasks:
            if task == "ppl":
                if not documents:
                    raise LongctxError(
                        "eval task 'ppl' needs held-out text: put 'text' in data.tasks with "
                        "data.eval_fraction > 0, or drop 'ppl' from the eval tasks"
                    )
                held_out_windows(documents, max(self.lengths), windows=1)
                continue
            if task in ALGORITHMIC_TASKS:
                check_task_lengths(
                    task, tokenizer, self.lengths, self.samples, seed=self.seed, params=self.params
                )
                continue
            check_grid(task, self.lengths, self.depths, self.samples)
            # Every example of the grid is drawn once: its filler length varies with the seed.
            for length, depth, k in product(self.lengths, self.depths, range(self.samples)):
                try:
                    make_eval_example(
                        task, tokenizer, length, seed=self.seed + k, depth=depth, params=self.params
                    )
                except TargetTooShort as short:
                    raise LongctxError(
                        f"eval length {length} is too short for task {task!r}: its example needs "
                        f"at least {short.needed} tokens; use eval lengths >= {short.needed}"
                    ) from None


def plan_from_recipe(recipe: Recipe) -> EvalPlan:
    """The in-training evaluation a recipe asks for (``trainer.eval_*`` fields)."""
    cfg = recipe.trainer
    return EvalPlan(
        tasks=tuple(cfg.eval_tasks),
        lengths=tuple(cfg.eval_lengths or [recipe.data.seq_len]),
        depths=tuple(cfg.eval_depths),
        samples=cfg.eval_samples,
        ppl_windows=cfg.eval_ppl_windows,
        seed=recipe.data.seed,
        params=recipe.data.task_params,
        ppl_text=cfg.eval_ppl_text,
    )


def perplexity_documents(
    plan: EvalPlan,
    data: DataConfig,
    tokenizer: Tokenizer,
    held_out: Sequence[TokenDocument] | None,
) -> list[TokenDocument] | None:
    """The documents ``ppl`` scores under ``plan.ppl_text`` (``trainer.eval_ppl_text``): the
    corpus' ``held_out`` split, or the long-text stream of the text ``data.sources`` in
    ``data.seed`` order holding exactly ``ppl_windows`` windows of the longest plan length (the
    windows of every shorter length are prefixes of the same stream, as ``long_text_documents`` cuts
    them). None when the plan has no ``ppl``."""
    if "ppl" not in plan.tasks:
        return None
    if plan.ppl_text == "held_out":
        return None if held_out is None else list(held_out)
    return long_text_documents(
        tokenizer, max(plan.lengths), plan.ppl_windows, sources=data.text_paths(), seed=data.seed
    )


def run_eval_suite(
    model: Transformer,
    tokenizer: Tokenizer,
    plan: EvalPlan,
    documents: Sequence[TokenDocument] | None,
    *,
    mesh: ParallelMesh | None = None,
    transform: BatchTransform | None = None,
) -> EvalResults:
    """Evaluate every task of ``plan`` with ``model`` in eval mode (restored afterwards).

    ``mesh``: the sequence-parallel mesh a ``parallelize``d ``model`` runs on; every rank of the
    world must then call this with the same plan, and all get the same results. ``transform``:
    the attention core's batch transform every scored sequence goes through (the trainer's
    ``batch_transform_for(recipe)``; None: the identity)."""
    was_training = model.training
    model.eval()
    results: EvalResults = {}
    try:
        for task in plan.tasks:
            if task == "ppl":
                results["ppl"] = [
                    position_perplexity(
                        model,
                        documents or [],
                        length,
                        windows=plan.ppl_windows,
                        mesh=mesh,
                        transform=transform,
                    )
                    for length in plan.lengths
                ]
            elif task in ALGORITHMIC_TASKS:
                results[task] = task_accuracy(
                    model,
                    tokenizer,
                    task,
                    plan.lengths,
                    samples=plan.samples,
                    seed=plan.seed,
                    params=plan.params,
                    mesh=mesh,
                    transform=transform,
                )
            else:
                results[task] = retrieval_accuracy(
                    model,
                    tokenizer,
                    task,
                    plan.lengths,
                    plan.depths,
                    samples=plan.samples,
                    seed=plan.seed,
                    params=plan.params,
                    mesh=mesh,
                    transform=transform,
                )
    finally:
        model.train(was_training)
    return results


def heatmap_figure(result: RetrievalResult) -> Figure:
    """Accuracy heatmap: lengths on the y axis, depths on the x axis, values annotated."""
    grid = np.asarray(result.accuracy)  # [lengths, depths]
    figure = Figure(figsize=(1.6 + 0.8 * len(result.depths), 1.4 + 0.5 * grid.shape[0]))
    axes = figure.subplots()
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(result.depths)), [f"{d:.2f}" for d in result.depths])
    axes.set_yticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    axes.set_xlabel("depth of the fact")
    axes.set_ylabel("context length (tokens)")
    axes.set_title(f"{result.task} accuracy ({result.samples} per cell)")
    for (i, j), value in np.ndenumerate(grid):
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure


def loss_figure(results: Sequence[PerplexityResult]) -> Figure:
    """Mean NLL by position (one curve per length) with the bucket means as steps."""
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for result in results:
        positions = 1 + result.curve_step * np.arange(len(result.curve)) + result.curve_step / 2
        line = axes.plot(positions, result.curve, alpha=0.5, label=f"L={result.length}")[0]
        for bucket in result.buckets:
            axes.hlines(bucket["nll"], bucket["start"], bucket["end"], colors=line.get_color())
    axes.set_xscale("symlog", linthresh=max(1, results[0].buckets[0]["end"]))
    axes.set_xlabel("position in the window (tokens)")
    axes.set_ylabel("mean NLL (nats)")
    axes.set_title("held-out loss by position")
    axes.legend()
    figure.tight_layout()
    return figure


def _figures(results: EvalResults) -> dict[str, Figure]:
    figures = {}
    if "ppl" in results:
        figures["ppl"] = loss_figure(results["ppl"])
    for task in RETRIEVAL_TASKS:
        if task in results:
            figures[task] = heatmap_figure(results[task])
    for task in ALGORITHMIC_TASKS:
        if task in results:
            figures[task] = accuracy_figure(results[task])
    return figures


def results_json(results: EvalResults, task: str) -> dict:
    if task == "ppl":
        return {"task": "ppl", "results": [result.to_dict() for result in results["ppl"]]}
    return results[task].to_dict()


def write_eval_outputs(results: EvalResults, directory: Path, meta: dict[str, Any]) -> list[Path]:
    """``TASK.json`` (with ``meta``: step, checkpoint, ...) and ``TASK.png`` per task in
    ``directory`` (created); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for task, figure in _figures(results).items():
        json_path = directory / f"{task}.json"
        json_path.write_text(json.dumps({**meta, **results_json(results, task)}, indent=1) + "\n")
        png_path = directory / f"{task}.png"
        figure.savefig(png_path, dpi=100)
        written += [json_path, png_path]
    return written


def eval_scalars(results: EvalResults) -> dict[str, float]:
    """The TensorBoard scalars of ``results`` by tag (see the module docstring)."""
    scalars = {}
    for result in results.get("ppl", []):
        prefix = f"eval_ppl/L{result.length}"
        scalars[f"{prefix}/nll"] = result.mean_nll
        for bucket in result.buckets:
            scalars[f"{prefix}/nll_{bucket['start']}-{bucket['end']}"] = bucket["nll"]
    for task in RETRIEVAL_TASKS:
        if task in results:
            result = results[task]
            scalars[f"eval_{task}/accuracy"] = result.mean_accuracy
            for length, row in zip(result.lengths, result.accuracy):
                scalars[f"eval_{task}/L{length}/accuracy"] = float(np.mean(row))
    for task in ALGORITHMIC_TASKS:
        if task in results:
            scalars.update(task_scalars(results[task]))
    return scalars


def log_eval_tensorboard(results: EvalResults, writer: SummaryWriter, step: int) -> None:
    """Scalars and figures of ``results`` at ``step``."""
    for tag, value in eval_scalars(results).items():
        writer.add_scalar(tag, value, step)
    for task, figure in _figures(results).items():
        if task == "ppl":
            tag = "eval_ppl/loss_by_position"
        elif task in ALGORITHMIC_TASKS:
            tag = f"eval_{task}/accuracy_by_length"
        else:
            tag = f"eval_{task}/heatmap"
        writer.add_figure(tag, figure, step, close=True)
    writer.flush()


def format_results(results: EvalResults) -> str:
    """Every task's table, for the terminal."""
    parts = [format_perplexity(result) for result in results.get("ppl", [])]
    parts += [format_table(results[task]) for task in RETRIEVAL_TASKS if task in results]
    parts += [format_task_table(results[task]) for task in ALGORITHMIC_TASKS if task in results]
    return "\n\n".join(parts)


def eval_directory(run_dir: Path, step: int) -> Path:
    """``RUN/eval/step_NNNNNN``: where the evaluation of step ``step`` goes."""
    return Path(run_dir) / EVAL_DIR / f"step_{step:06d}"


class TrainingEvaluator:
    """The in-training evaluation: the recipe's plan on the decoder being trained.

    Every rank calls it with the same step (ZeRO-3 gathers parameters with collectives inside
    each layer's forward, so all ranks must run the forwards); the computation is identical on
    every rank, and only rank 0 writes files and TensorBoard. Returns the scalars. Under
    sequence parallelism (``mesh``) each sequence is sharded over the SP group like a training
    batch and the parallelized model scores it at its full length; the data-parallel groups
    all evaluate every sequence (the same results everywhere, no reduction needed). Every
    sequence goes through ``transform`` (the attention core's batch transform) first, as the
    training batches do.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        plan: EvalPlan,
        documents: Sequence[TokenDocument] | None,
        run_dir: Path,
        *,
        is_writer: bool,
        mesh: ParallelMesh | None = None,
        transform: BatchTransform | None = None,
    ):
        plan.check(tokenizer, documents)
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan
        self.documents = documents
        self.run_dir = run_dir
        self.is_writer = is_writer
        self.mesh = mesh
        self.transform = transform

    def __call__(self, step: int, writer: SummaryWriter | None) -> dict[str, float]:
        with torch.no_grad():
            results = run_eval_suite(
                self.model,
                self.tokenizer,
                self.plan,
                self.documents,
                mesh=self.mesh,
                transform=self.transform,
            )
        if self.is_writer:
            write_eval_outputs(results, eval_directory(self.run_dir, step), {"step": step})
            if writer is not None:
                log_eval_tensorboard(results, writer, step)
        return eval_scalars(results)
