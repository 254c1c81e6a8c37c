"""A trained model back out of its checkpoint, for ``longctx eval`` and ``longctx export``.

``open_checkpoint(RUN_OR_CHECKPOINT)`` accepts a checkpoint directory (``manifest.json``) or a
run directory (its ``checkpoints/latest``), verifies every file against the manifest's sha256,
and reads the recipe the checkpoint was trained with (its own ``recipe.yaml``) and its
tokenizer. ``load_trained_model`` loads the checkpoint's fp32 weights (assembled tensor by
tensor from the per-rank shards, ``checkpoint.sharded_state.iter_model_tensors``) into a
``Transformer`` built from that recipe (``build_model``, which also builds the models of
training and of ``hf:PATH`` recipes), so the RoPE settings are the ones trained with (e.g. the
extension's YaRN ``rope_scaling``). Everything runs in one process and only reads the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longctx.checkpoint.store import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    RECIPE_FILE,
    TOKENIZER_FILE,
    latest_checkpoint,
    load_model_weights,
    verify_checkpoint,
)
from longctx.config.recipe import Recipe, parse_recipe, read_recipe_file
from longctx.data import Tokenizer, load_tokenizer
from longctx.errors import LongctxError
from longctx.model import Transformer, empty_model, load_hf, save_hf

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SavedCheckpoint:
    """A verified checkpoint: its directory, manifest, recipe and tokenizer."""

    directory: Path
    manifest: dict[str, Any]
    recipe: Recipe
    tokenizer: Tokenizer

    @property
    def run_dir(self) -> Path:
        """The run the checkpoint belongs to (``RUN/checkpoints/step_N`` -> ``RUN``)."""
        return self.directory.parent.parent

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def find_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """The checkpoint directory named by a checkpoint path or a run directory (its latest)."""
    path = Path(run_or_checkpoint).expanduser()
    if not path.exists():
        raise LongctxError(
            f"{path} does not exist; pass a run directory (runs/NAME) or a checkpoint directory "
            f"(runs/NAME/{CHECKPOINTS_DIR}/step_000500)"
        )
    if (path / MANIFEST_FILE).is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise LongctxError(
            f"{path} is neither a checkpoint (no {MANIFEST_FILE}) nor a run directory with a "
            f"checkpoint ({CHECKPOINTS_DIR}/latest is missing); train it first or pass a "
            "checkpoint directory"
        )
    return latest


def open_checkpoint(run_or_checkpoint: str | Path) -> SavedCheckpoint:
    """Find and sha256-verify the checkpoint, and read its recipe and tokenizer."""
    directory = find_checkpoint(run_or_checkpoint)
    manifest = verify_checkpoint(directory)
    raw = read_recipe_file(directory / RECIPE_FILE)
    # The resolved recipe already holds the full model shape; the hf: weights it started from
    # are not needed (and may have moved), so it is read as a model of that shape.
    if isinstance(raw.get("model"), dict):
        raw["model"]["init"] = "scratch"
    recipe = parse_recipe(raw, source=str(directory / RECIPE_FILE))
    tokenizer_path = directory / TOKENIZER_FILE
    if tokenizer_path.is_file():
        tokenizer = load_tokenizer(str(tokenizer_path))
    elif recipe.data.tokenizer.path is not None:
        tokenizer = load_tokenizer(recipe.data.tokenizer.path)
    else:
        raise LongctxError(
            f"checkpoint {directory} has no {TOKENIZER_FILE} and its recipe names no "
            "data.tokenizer.path; copy the run's tokenizer.model into the checkpoint"
        )
    return SavedCheckpoint(directory, manifest, recipe, tokenizer)


def build_model(
    recipe: Recipe, *, weights: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> Transformer:
    """The decoder of ``recipe``: the one way a recipe becomes a ``Transformer`` (training,
    evaluation, export, the driver's passkey tables, the benchmarks).

    - ``weights`` (a longctx checkpoint directory): built on the meta device (no random init of
      weights about to be replaced), given empty CPU storage in ``dtype``, then filled
      tensor by tensor from the checkpoint's shards (``load_model_weights``). The recipe's
      settings apply around them (e.g. a new stage's YaRN ``rope_scaling``).
    - else ``model.init: hf:PATH``: that Hugging Face checkpoint's weights (``load_hf``), under
      the recipe's resolved ``ModelConfig`` (the checkpoint's shape plus the recipe's RoPE).
    - else (``init: scratch``) a randomly initialised model: seed torch first for a
      reproducible one.
    """
    if weights is not None:
        model = empty_model(recipe.model, recipe.positional, recipe.attention, dtype)
        load_model_weights(model, weights)
        return model
    if recipe.model.init.startswith("hf:"):
        model, _ = load_hf(
            recipe.model.init.removeprefix("hf:"),
            dtype,
            positional=recipe.positional,
            attention=recipe.attention,
            config=recipe.model,
        )
        return model
    model = Transformer(recipe.model, recipe.positional, recipe.attention)
    return model if dtype == torch.float32 else model.to(dtype)


def load_trained_model(saved: SavedCheckpoint, dtype: torch.dtype = torch.float32) -> Transformer:
    """The decoder with the checkpoint's consolidated weights, in ``dtype``, in eval mode."""
    return build_model(saved.recipe, weights=saved.directory, dtype=dtype).eval()


def _refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a non-empty directory"
        raise LongctxError(
            f"--hf {out} is {what}; refusing to overwrite it: export to a new or empty directory"
        )


def export_hf(run_or_checkpoint: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the checkpoint as a Hugging Face model directory ``out``: ``config.json`` (the
    recipe's architecture, ``rope_scaling`` and ``max_position_embeddings``),
    ``model.safetensors`` and the tokenizer files transformers reads (``tokenizer.model``, or
    ``tokenizer.json`` with its config). ``out`` must be new or empty."""
    if dtype not in EXPORT_DTYPES:
        raise LongctxError(f"--dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    out = Path(out).expanduser()
    _refuse_non_empty(out)
    saved = open_checkpoint(run_or_checkpoint)
    model = load_trained_model(saved, EXPORT_DTYPES[dtype])
    save_hf(model, saved.recipe.model, out)
    saved.tokenizer.export_files(out)  # tokenizer.model, or tokenizer.json + its config
    return out
