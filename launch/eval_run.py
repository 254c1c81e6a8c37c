"""``longctx eval``: evaluate a model, in this process or on N Ray workers over the SP mesh.

What is evaluated (``TARGET``):

- a longctx checkpoint (``manifest.json``; sha256-verified) or a run directory (its latest);
  results go to ``RUN/eval/step_NNNNNN`` unless ``--out`` says otherwise;
- a Hugging Face model directory (``config.json`` + safetensors, e.g. an export or a converted
  model), read as a recipe ``model.init: hf:DIR`` with the directory as tokenizer path;
- a recipe file (``.yaml``) whose ``model.init`` is ``hf:PATH``: its data (held-out text for
  perplexity), position settings and layout.

``--set KEY=VALUE`` overrides the recipe's fields as in ``longctx train``: ``model.rope_scaling``
(``{rope_type: yarn, factor: 4, original_max_position_embeddings: 8192}``), ``rope_theta``,
``data.sources``, ``parallel.ring`` / ``parallel.ulysses``, ... A checkpoint is evaluated with
the layout its ``--set`` gives, not the one it was trained with; an override that changes the
weights' shape is refused. The layout's world (``--workers N``, else ``dp x ulysses x ring``
with ``dp: auto`` = 1) decides where the evaluation runs: one rank runs here, in the driver;
more run as Ray Train workers (``launch.ray_cluster`` + ``launch.ray_train.fit_on_ray``, the
same launch as ``longctx train``), each loading the full weights, the SP groups scoring every
sequence sharded like a training batch (``eval/sequence_scorer.py``). The results equal the
single-process evaluation; every data-parallel group evaluates every sequence (no split), and
only rank 0 writes the JSON and PNG files.

Everything the evaluation could trip over (the target, the overrides, the layout, the plan:
lengths too short for a task, perplexity without held-out text) is checked here before anything
is written or any worker starts: a one-line ``LongctxError`` (exit 2).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from longctx.checkpoint.store import MANIFEST_FILE, RECIPE_FILE, TOKENIZER_FILE
from longctx.config.recipe import (
    Recipe,
    apply_override,
    load_recipe,
    parse_recipe,
    read_recipe_file,
)
from longctx.errors import LongctxError
from longctx.eval.report import (
    EvalPlan,
    EvalResults,
    eval_directory,
    format_results,
    perplexity_documents,
    run_eval_suite,
    write_eval_outputs,
)

if TYPE_CHECKING:
    from longctx.data import TokenDocument, Tokenizer
    from longctx.parallel.mesh import ParallelMesh

RECIPE_SUFFIXES = (".yaml", ".yml")
HF_CONFIG = "config.json"


@dataclass(frozen=True)
class EvalTarget:
    """A resolved ``TARGET``: the recipe the model is built from (overrides applied), its
    tokenizer file or directory, the verified checkpoint holding the weights (None: the weights
    are the recipe's ``model.init: hf:PATH``), the default output directory (None: ``--out`` is
    required) and what every JSON records about the model (``step``, ``checkpoint`` or
    ``model``)."""

    recipe: Recipe
    tokenizer_path: str
    checkpoint: Path | None
    default_out: Path | None
    meta: dict[str, Any]

    @property
    def description(self) -> str:
        """``checkpoint DIR (step N)`` or ``model DIR``, for the terminal."""
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint} (step {self.meta['step']})"
        return f"model {self.meta['model']}"


def _checkpoint_target(path: Path, overrides: list[str]) -> EvalTarget:
    from longctx.checkpoint.saved_model import open_checkpoint

    saved = open_checkpoint(path)  # finds the latest of a run, verifies every file's sha256
    raw = read_recipe_file(saved.directory / RECIPE_FILE)
    raw["model"]["init"] = "scratch"  # the weights are the checkpoint's (see open_checkpoint)
    raw["parallel"] = {}  # evaluated on the layout the command line gives, not the trained one
    for assignment in overrides:
        apply_override(raw, assignment)
    recipe = parse_recipe(raw, source=f"{saved.directory / RECIPE_FILE} with --set")
    if recipe.recipe_hash() != saved.recipe.recipe_hash():
        raise LongctxError(
            f"--set {' '.join(overrides)} changes the shape of the model saved in "
            f"{saved.directory} (model, positional or attention variant fields); override only "
            "RoPE settings (model.rope_scaling, rope_theta), data, or parallel fields"
        )
    own = saved.directory / TOKENIZER_FILE
    tokenizer = str(own) if own.is_file() else str(recipe.data.tokenizer.path)
    meta = {"step": saved.step, "checkpoint": str(saved.directory)}
    return EvalTarget(
        recipe, tokenizer, saved.directory, eval_directory(saved.run_dir, saved.step), meta
    )


def _hf_target(path: Path, overrides: list[str]) -> EvalTarget:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", path.resolve().name).lstrip("._-") or "model"
    raw: dict[str, Any] = {
        "name": name,
        "model": {"init": f"hf:{path}"},
        "data": {"tokenizer": {"path": str(path)}},
    }
    for assignment in overrides:
        apply_override(raw, assignment)
    recipe = parse_recipe(raw, source=f"{path} with --set")
    return EvalTarget(recipe, str(recipe.data.tokenizer.path), None, None, {"model": str(path)})


def _recipe_target(path: Path, overrides: list[str]) -> EvalTarget:
    recipe = load_recipe(path, overrides)
    init = recipe.model.init
    if not init.startswith("hf:"):
        raise LongctxError(
            f"recipe {path} has model.init={init!r}: an untrained model has nothing to "
            "evaluate; set model.init: hf:PATH, or evaluate a run directory or checkpoint"
        )
    tokenizer = recipe.data.tokenizer.path or init.removeprefix("hf:")
    return EvalTarget(recipe, str(tokenizer), None, None, {"model": init.removeprefix("hf:")})


def resolve_target(target: str | Path, overrides: list[str]) -> EvalTarget:
    """``TARGET`` of ``longctx eval`` (see the module docstring) with ``--set`` applied."""
    path = Path(target).expanduser()
    if path.suffix in RECIPE_SUFFIXES and path.is_file():
        return _recipe_target(path, overrides)
    if path.is_dir() and (path / HF_CONFIG).is_file() and not (path / MANIFEST_FILE).is_file():
        return _hf_target(path, overrides)
    return _checkpoint_target(path, overrides)


def eval_plan(args: argparse.Namespace, recipe: Recipe) -> EvalPlan:
    """The plan of the command line, defaults from the recipe's ``trainer.eval_*`` fields."""
    trainer = recipe.trainer
    return EvalPlan(
        tasks=tuple(dict.fromkeys(args.task)),
        lengths=tuple(args.lengths or trainer.eval_lengths or [recipe.data.seq_len]),
        depths=tuple(args.depths or trainer.eval_depths),
        samples=args.samples or trainer.eval_samples,
        ppl_windows=args.windows or trainer.eval_ppl_windows,
        seed=recipe.data.seed,
        params=recipe.data.task_params,
        ppl_text=trainer.eval_ppl_text,
    )


def load_eval_data(
    target: EvalTarget, plan: EvalPlan
) -> tuple[Tokenizer, list[TokenDocument] | None]:
    """The tokenizer and, when the plan has ``ppl``, the documents it scores: the held-out
    split of the recipe's data (the same split as training: ``data.sources``,
    ``eval_fraction``, ``seed``) or, under ``trainer.eval_ppl_text: long_text``, the sources'
    long-text stream (``perplexity_documents``)."""
    from longctx.data import load_corpus, load_tokenizer

    tokenizer = load_tokenizer(target.tokenizer_path)
    data = target.recipe.data
    held_out = None
    if "ppl" in plan.tasks and plan.ppl_text == "held_out":
        held_out = load_corpus(data, tokenizer).eval_documents
    return tokenizer, perplexity_documents(plan, data, tokenizer, held_out)


def evaluate_target(
    target: EvalTarget,
    plan: EvalPlan,
    out: Path,
    data: tuple[Tokenizer, list[TokenDocument] | None],
    *,
    mesh: ParallelMesh | None = None,
    device: torch.device | None = None,
    is_writer: bool = True,
) -> EvalResults:
    """Load the model (``apply_transforms`` with ``mesh``: sequence parallelism when given),
    evaluate ``plan`` with ``data`` (``load_eval_data``) through the recipe's batch path and,
    when ``is_writer``, write the JSON + PNG files to ``out``."""
    from longctx.checkpoint.saved_model import build_model
    from longctx.parallel.apply import TransformPlan, apply_transforms
    from longctx.trainer.plans import batch_transform_for

    tokenizer, documents = data
    # The checkpoint's weights, or the recipe's hf:PATH ones; float32, in eval mode.
    model = build_model(target.recipe, weights=target.checkpoint).eval().to(device or "cpu")
    apply_transforms(model, TransformPlan(mesh=mesh))
    with torch.no_grad():
        results = run_eval_suite(
            model,
            tokenizer,
            plan,
            documents,
            mesh=mesh,
            transform=batch_transform_for(target.recipe),
        )
    if is_writer:
        write_eval_outputs(results, out, target.meta)
    return results


def worker_device() -> torch.device:
    """This worker's device: ``cuda:LOCAL_RANK`` made current on a GPU machine (Ray Train sets
    ``LOCAL_RANK``), else the CPU. DeepSpeed is not needed to evaluate, so it is not imported."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


@dataclass(frozen=True)
class EvalJob:
    """What the driver hands to every ``eval_worker``: the target (its recipe holds the
    resolved layout), the plan, the output directory and ``run_dir`` (Ray Train's storage for
    this evaluation, a temporary directory)."""

    target: EvalTarget
    plan: EvalPlan
    out: str
    run_dir: str


def eval_worker(job: EvalJob, report: Any = None) -> dict[str, Any]:
    """One Ray Train worker of ``longctx eval`` (the ``worker_fn`` of ``fit_on_ray``).

    ``torch.distributed`` is initialised by Ray Train; ``report`` is unused (nothing is
    checkpointed). Returns the tables as text (rank 0's goes back to the driver).
    """
    import torch.distributed as dist

    from longctx.parallel.mesh import build_mesh
    from longctx.trainer.worker import init_distributed

    created_group = init_distributed()
    try:
        target = job.target
        device = worker_device()
        parallel = target.recipe.parallel
        mesh = build_mesh(parallel) if parallel.sp > 1 else None
        plan = job.plan
        results = evaluate_target(
            target,
            plan,
            Path(job.out),
            load_eval_data(target, plan),
            mesh=mesh,
            device=device,
            is_writer=dist.get_rank() == 0,
        )
        dist.barrier()  # rank 0 has written every file
        return {"text": format_results(results)}
    finally:
        if created_group:
            dist.destroy_process_group()


def check_eval_layout(target: EvalTarget, workers: int | None) -> EvalTarget:
    """``target`` with its layout resolved for ``workers`` (None: ``dp: auto`` = 1); a one-line
    error for a layout the model cannot run under (heads, attention variant, positions)."""
    from longctx.parallel.parallelize import check_recipe_supported

    recipe = target.recipe
    layout = recipe.parallel.resolve(workers)
    check_recipe_supported(recipe.model, recipe.attention, recipe.positional, layout)
    resolved = recipe.model_copy(update={"parallel": layout})
    return EvalTarget(
        resolved, target.tokenizer_path, target.checkpoint, target.default_out, target.meta
    )


def _run_on_ray(target: EvalTarget, plan: EvalPlan, out: Path, address: str | None) -> str:
    """Evaluate on ``target.recipe.parallel.world`` Ray Train workers; rank 0's tables."""
    from longctx.launch.ray_cluster import ray_cluster
    from longctx.launch.ray_train import fit_on_ray, new_launch_id

    world = target.recipe.parallel.world
    out.parent.mkdir(parents=True, exist_ok=True)
    # Ray Train's run directory (its summary file): next to the results, removed afterwards.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".longctx-eval-") as ray_storage:
        job = EvalJob(target, plan, str(out.resolve()), ray_storage)
        with ray_cluster(address, world) as resources:
            print(f"longctx: evaluating on {target.recipe.parallel.describe()}")
            print(f"  workers:  {resources.description}")
            run = fit_on_ray(
                job,
                resources,
                launch_id=new_launch_id(),
                max_failures=0,
                workdir=os.getcwd() if address is None else None,
                worker_fn=eval_worker,
            )
    return run.summary["text"]


def run_eval(args: argparse.Namespace) -> int:
    """``longctx eval`` after argument parsing: resolve, check, evaluate, print the tables."""
    target = check_eval_layout(resolve_target(args.run_or_checkpoint, list(args.set)), args.workers)
    out = args.out if args.out is not None else target.default_out
    if out is None:
        raise LongctxError(
            f"{args.run_or_checkpoint} is not a longctx run, so there is no run directory to "
            "write into; pass --out DIR"
        )
    plan = eval_plan(args, target.recipe)
    data = load_eval_data(target, plan)
    plan.check(*data)
    if target.recipe.parallel.world == 1:
        text = format_results(evaluate_target(target, plan, out, data))
    else:
        text = _run_on_ray(target, plan, out, args.address)
    print(f"{target.description}\n")
    print(text)
    print(f"\nresults written to {out}")
    return 0
