"""A trained model back out of its checkpoint, for ``longctx eval`` and ``longctx export``.

``open_checkpoint(RUN_OR_CHECKPOINT)`` accepts a checkpoint directory (``manifest.json``) or a
run directory (its ``checkpoints/latest``), verifies every file against the manifest's sha256,
and reads the recipe the checkpoint was trained with (its own ``recipe.yaml``) and its
tokenizer. ``load_trained_model`` loads the checkpoint's fp32 weights (assembled tensor by
tensor from the per-rank shards, ``checkpoint.sharded_state.iter_model_tensors``) into a
``Transformer`` built from that recipe (``build_model``, which also builds the models of
training and of ``hf:PATH`` recipes), so the RoPE settings are the ones trained with (e.g. the
extension's YaRN ``rope_scaling``). Everything runs in one process and only reads the run.
``export_hf`` streams the checkpoint's tensors (``sharded_state.iter_model_tensors``) into
sharded safetensors without building the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longctx.checkpoint.adapter_base import (
    BASE_KEY,
    base_checkpoint_of,
    base_reference,
    check_adapter_base,
)
from longctx.checkpoint.sharded_state import iter_model_tensors
from longctx.checkpoint.staging import staged_directory
from longctx.checkpoint.store import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    RECIPE_FILE,
    TOKENIZER_FILE,
    latest_checkpoint,
    load_model_state_dict,
    load_model_weights,
    load_partitioned_weights,
    read_manifest,
    verify_checkpoint,
)
from longctx.config.recipe import Recipe, parse_recipe, read_recipe_file
from longctx.data import Tokenizer, load_tokenizer
from longctx.errors import LongctxError
from longctx.model import Transformer, empty_model, load_hf
from longctx.model.adapters import attach_adapters, merge_adapters, peft_adapter_files
from longctx.model.hf_io import (
    check_tensor_shape,
    hf_tensor_name,
    write_hf_config,
    write_weight_shards,
)
from longctx.parallel.zero_init import (
    build_partitioned,
    build_partitioned_hf,
    build_partitioned_scratch,
    gathered_for_update,
    partition_new_parameters,
)

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"


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


def saved_recipe(directory: Path) -> Recipe:
    """The recipe a checkpoint was trained with (its ``recipe.yaml``). The resolved recipe
    already holds the full model shape; the hf: weights it started from are not needed (and may
    have moved: an adapter checkpoint's base is named by its manifest), so it is read as a
    model of that shape."""
    raw = read_recipe_file(directory / RECIPE_FILE)
    if isinstance(raw.get("model"), dict):
        raw["model"]["init"] = "scratch"
    return parse_recipe(raw, source=str(directory / RECIPE_FILE))


def open_checkpoint(run_or_checkpoint: str | Path) -> SavedCheckpoint:
    """Find and sha256-verify the checkpoint, and read its recipe and tokenizer."""
    directory = find_checkpoint(run_or_checkpoint)
    manifest = verify_checkpoint(directory)
    recipe = saved_recipe(directory)
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
    recipe: Recipe,
    *,
    weights: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    zero3: dict[str, Any] | None = None,
) -> Transformer:
    """The decoder of ``recipe``: the one way a recipe becomes a ``Transformer`` (training,
    evaluation, export, the driver's passkey tables, the benchmarks).

    - ``weights`` (a longctx checkpoint directory): built on the meta device (no random init of
      weights about to be replaced), given empty CPU storage in ``dtype``, then filled
      tensor by tensor from the checkpoint's shards (``load_model_weights``); with ``zero3``
      built under ``deepspeed.zero.Init`` and each rank reads only its partitions from the
      shards (``load_partitioned_weights``). The recipe's settings apply around them (e.g. a
      new stage's YaRN ``rope_scaling``). An adapter checkpoint gives its base (checked
      against its reference) with the adapters merged in (``load_adapted_model``; with
      ``zero3`` partitioned as well, merged one layer at a time).
    - else ``model.init: hf:PATH``: that Hugging Face checkpoint's weights. With ``zero3`` (the
      DeepSpeed config of a ZeRO-3 run; every rank calls this) the model is built under
      ``deepspeed.zero.Init`` and each rank reads only its partition of every tensor
      (``parallel.zero_init.build_partitioned_hf``); otherwise ``load_hf`` builds one copy in
      ``dtype`` and fills it one checkpoint tensor at a time. Either way under the recipe's
      resolved ``ModelConfig`` (the checkpoint's shape plus the recipe's RoPE).
    - else (``init: scratch``) a randomly initialised model: seed torch first for a
      reproducible one. With ``zero3`` it is built partitioned and each rank computes its
      partitions of the same values (``parallel.zero_init.build_partitioned_scratch``), so the
      model does not depend on the number of ranks.
    """
    if weights is not None and BASE_KEY in read_manifest(weights):
        return load_adapted_model(recipe, Path(weights), dtype, zero3=zero3)
    if weights is not None and zero3 is not None:
        model = build_partitioned(recipe.model, recipe.positional, recipe.attention, zero3)
        load_partitioned_weights(model, weights)
        return model
    if weights is not None:
        model = empty_model(recipe.model, recipe.positional, recipe.attention, dtype)
        load_model_weights(model, weights)
        return model
    if recipe.model.init.startswith("hf:"):
        source = recipe.model.init.removeprefix("hf:")
        if zero3 is not None:
            model, _ = build_partitioned_hf(
                source, recipe.model, recipe.positional, recipe.attention, zero3
            )
            return model
        model, _ = load_hf(
            source,
            dtype,
            positional=recipe.positional,
            attention=recipe.attention,
            config=recipe.model,
        )
        return model
    if zero3 is not None:
        return build_partitioned_scratch(recipe.model, recipe.positional, recipe.attention, zero3)
    model = Transformer(recipe.model, recipe.positional, recipe.attention)
    return model if dtype == torch.float32 else model.to(dtype)


def build_base_model(
    recipe: Recipe,
    reference: dict,
    checkpoint: Path,
    dtype: torch.dtype = torch.float32,
    zero3: dict[str, Any] | None = None,
) -> Transformer:
    """The frozen base an adapter ``checkpoint`` names (``reference``: its manifest's
    ``adapter_base``), under ``recipe``'s settings, after checking that it is the same base: an
    ``hf:`` directory, a checkpoint of the run (itself possibly adapters, merged), or the
    recipe's seeded random initialisation; partitioned under ZeRO-3 when ``zero3`` is given
    (``build_model``)."""
    base_dir = base_checkpoint_of(reference, checkpoint)
    source = str(reference["source"])
    at_hand = recipe
    if source.startswith("hf:"):
        at_hand = recipe.model_copy(
            update={"model": recipe.model.model_copy(update={"init": source})}
        )
    check_adapter_base(reference, base_reference(at_hand, base_dir), checkpoint)
    if base_dir is not None or source.startswith("hf:"):
        return build_model(at_hand, weights=base_dir, dtype=dtype, zero3=zero3)
    with torch.random.fork_rng():  # the worker's seeding before it built the model
        torch.manual_seed(recipe.trainer.seed)
        return build_model(at_hand, dtype=dtype, zero3=zero3)


def load_adapted_model(
    recipe: Recipe,
    checkpoint: Path,
    dtype: torch.dtype = torch.float32,
    *,
    merge: bool = True,
    zero3: dict[str, Any] | None = None,
) -> Transformer:
    """The base of an adapter checkpoint with the checkpoint's adapters and trained extras
    loaded (``merge``: folded into the base weights, plain names; else still peft layers).

    With ``zero3`` (a ZeRO-3 run's DeepSpeed config; every rank calls this) the base is built
    partitioned, the new LoRA matrices are partitioned (``partition_new_parameters``), each rank
    reads only its partitions of the trained tensors (``load_partitioned_weights``) and merges
    one adapted layer at a time, gathered (``gathered_for_update``): no rank holds the whole
    model."""
    saved = saved_recipe(checkpoint)
    reference = read_manifest(checkpoint)[BASE_KEY]
    model = build_base_model(recipe, reference, checkpoint, dtype, zero3)
    with torch.random.fork_rng():
        attach_adapters(model, saved.adapters)
    if zero3 is not None:
        partition_new_parameters(model)
        load_partitioned_weights(model, checkpoint)
        return merge_adapters(model, gathered_for_update) if merge else model
    tensors = load_model_state_dict(checkpoint)
    result = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = trained - set(tensors)
    if result.unexpected_keys or missing:
        odd = sorted(result.unexpected_keys) or sorted(missing)
        raise LongctxError(
            f"adapter checkpoint {checkpoint} does not fit its recipe's peft section ({odd[0]} "
            "differs); load it with the recipe it was trained with"
        )
    return merge_adapters(model) if merge else model


def load_trained_model(saved: SavedCheckpoint, dtype: torch.dtype = torch.float32) -> Transformer:
    """The decoder with the checkpoint's consolidated weights, in ``dtype``, in eval mode."""
    return build_model(saved.recipe, weights=saved.directory, dtype=dtype).eval()


def _refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a non-empty directory"
        raise LongctxError(
            f"--hf {out} is {what}; refusing to overwrite it: export to a new or empty directory"
        )


def _export_tensors(
    saved: SavedCheckpoint, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's parameters in Hugging Face names and ``dtype``, one at a time
    (``iter_model_tensors``); buffers and a tied ``lm_head`` copy are left out (``shapes`` holds
    the model's distinct parameters). A missing parameter or a wrong shape is a
    ``LongctxError`` naming it. An adapter checkpoint holds no base weights: its base is
    loaded with the adapters merged in (``load_adapted_model``) and that model's tensors are
    written."""
    seen = set()
    if BASE_KEY in saved.manifest:
        merged = load_adapted_model(saved.recipe, saved.directory)
        source: Iterator[tuple[str, torch.Tensor]] = iter(merged.state_dict().items())
    else:
        source = iter_model_tensors(saved.directory)
    for name, tensor in source:
        if name not in shapes:
            continue
        check_tensor_shape(saved.directory, name, tuple(tensor.shape), shapes[name])
        seen.add(name)
        yield hf_tensor_name(name), tensor.to(dtype)
    missing = sorted(set(shapes) - seen)
    if missing:
        raise LongctxError(
            f"checkpoint {saved.directory} lacks the parameters {missing[:12]} of its recipe's "
            "model; it is damaged or from another model: export an intact checkpoint"
        )


def export_hf(
    run_or_checkpoint: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the checkpoint as a Hugging Face model directory ``out``: ``config.json`` (the
    recipe's architecture, ``rope_scaling`` and ``max_position_embeddings``), the weights in
    safetensors shards of at most ``max_shard_bytes`` with transformers' index
    (``model.safetensors.index.json``; one ``model.safetensors`` when they fit in one shard),
    and the tokenizer files transformers reads (``tokenizer.model``, or ``tokenizer.json`` with
    its config). ``out`` must be new or empty.

    Streams: parameters are read from the checkpoint one at a time (``iter_model_tensors``),
    cast and added to the shard being filled, which is written and dropped when full, so the
    process holds at most one shard plus one tensor, never the model. Everything is written to
    a temporary sibling and renamed to ``out`` at the end (an interrupted export leaves no
    half-written ``out``)."""
    if dtype not in EXPORT_DTYPES:
        raise LongctxError(f"--dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    if max_shard_bytes < 1:
        raise LongctxError(f"--max-shard-size must be positive, got {max_shard_bytes} bytes")
    out = Path(out).expanduser()
    _refuse_non_empty(out)
    saved = open_checkpoint(run_or_checkpoint)
    recipe = saved.recipe
    with torch.device("meta"):  # names and shapes only: no memory, no random init
        skeleton = Transformer(recipe.model, recipe.positional, recipe.attention)
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    with staged_directory(out, "export") as staging:
        tensors = _export_tensors(saved, shapes, EXPORT_DTYPES[dtype])
        write_weight_shards(staging, tensors, max_shard_bytes, single_file=True)
        write_hf_config(
            staging, recipe.model, dtype=EXPORT_DTYPES[dtype], positional=skeleton.positional
        )
        saved.tokenizer.export_files(staging)  # tokenizer.model, or tokenizer.json + its config
    return out


def export_peft(run_or_checkpoint: str | Path, out: str | Path) -> Path:
    """Write an adapter checkpoint's adapters (and LongLoRA's trained embedding and norms) in
    peft's format into ``out`` (new or empty): ``PeftModel.from_pretrained`` loads it onto the
    Hugging Face base model (the ``hf:`` directory the run started from, or a full checkpoint
    of the run exported with ``--hf``)."""
    out = Path(out).expanduser()
    _refuse_non_empty(out)
    saved = open_checkpoint(run_or_checkpoint)
    reference = saved.manifest.get(BASE_KEY)
    if reference is None or saved.recipe.adapters is None:
        raise LongctxError(
            f"checkpoint {saved.directory} holds full weights, not adapters; export it with "
            "--hf OUT"
        )
    base = str(reference["source"])
    with staged_directory(out, "export") as staging:
        peft_adapter_files(
            staging,
            saved.recipe.adapters,
            load_model_state_dict(saved.directory),
            base_model=base.removeprefix("hf:") if base.startswith("hf:") else None,
            tied_embeddings=saved.recipe.model.tie_word_embeddings,
        )
    return out
