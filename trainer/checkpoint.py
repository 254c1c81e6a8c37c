"""Exact-resume checkpoints: DeepSpeed's tag directory plus a manifest, published atomically.

Layout (DESIGN section 8)::

    RUN/checkpoints/step_000500/   DeepSpeed's files for every rank (model, optimizer, LR
                                   schedule, step counters), rng_rank_NNNNN.pt (each rank's
                                   python/numpy/torch RNG), recipe.yaml, tokenizer.model,
                                   manifest.json
    RUN/checkpoints/latest         one line, the name of the newest complete checkpoint

A checkpoint is written under a hidden temporary name (``.tmp-step_000500``), every file is
hashed, ``manifest.json`` (step, tokens seen, data cursor, recipe hash, world size, sha256 of
every other file) is written into it, and only then is the directory renamed to its final name
and ``latest`` replaced by an atomic rename. A crash at any point leaves either the previous
checkpoint as ``latest`` or the new one complete; a directory without a manifest is never
loaded. The last ``keep_last`` checkpoints are kept.

Every rank calls ``save_checkpoint`` and ``load_checkpoint`` (DeepSpeed saves and loads each
rank's shards); the run directory must be on storage every rank sees (one machine, or a shared
file system on a cluster). ``verify_checkpoint`` and ``load_model_state_dict`` work in any
single process (the CLI driver, evaluation, export).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from longctx.errors import LongctxError
from longctx.trainer.engine import import_deepspeed

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from longctx.trainer.config import Recipe

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
RECIPE_FILE = "recipe.yaml"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FORMAT = 1
# Prefix of the decoder's parameter names inside the engine (CausalLMLoss holds it as .model).
ENGINE_MODULE_PREFIX = "model."
_TAG_PATTERN = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_HASH_BLOCK = 1 << 20
_MANIFEST_KEYS = (
    "rng_states",
    "step",
    "tokens_seen",
    "data_cursor",
    "world_size",
    "zero_stage",
    "recipe_hash",
    "files",
)


def checkpoint_tag(step: int) -> str:
    """Directory name of the checkpoint taken after optimizer step ``step``: ``step_000500``."""
    return f"step_{step:06d}"


def rng_file(rank: int) -> str:
    """Name of rank ``rank``'s RNG state file inside a checkpoint."""
    return f"rng_rank_{rank:05d}.pt"


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states ``capture_rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    """sha256 of ``names`` (relative to ``directory``), the files split over the ranks.

    Each rank hashes every world-th file and the results are gathered on every rank, so hashing
    a large checkpoint takes about 1/world of the time one process would need.
    """
    rank, world = _rank_world()
    mine = {name: sha256_file(directory / name) for name in names[rank::world]}
    if world == 1:
        return mine
    gathered: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {name: digest for part in gathered for name, digest in part.items()}


def _checkpoint_files(directory: Path) -> list[str]:
    """Every file under ``directory`` except the manifest, as sorted relative POSIX paths."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.name != MANIFEST_FILE
    )


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename: readers see the
    old content or the new one, never a partial file."""
    temporary = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def shape_summary(recipe: Recipe) -> dict[str, Any]:
    """The recipe fields behind ``recipe_hash`` that users recognise, for error messages."""
    model = recipe.model
    return {
        "model.vocab_size": model.vocab_size,
        "model.hidden_size": model.hidden_size,
        "model.intermediate_size": model.intermediate_size,
        "model.num_hidden_layers": model.num_hidden_layers,
        "model.num_attention_heads": model.num_attention_heads,
        "model.num_key_value_heads": model.kv_heads,
        "model.head_dim": model.dim_per_head,
        "model.tie_word_embeddings": model.tie_word_embeddings,
        "model.attention_bias": model.attention_bias,
        "positional.kind": recipe.positional.kind,
        "attention.variant": recipe.attention.variant,
    }


def save_checkpoint(
    engine: DeepSpeedEngine,
    run_dir: str | Path,
    *,
    step: int,
    tokens_seen: int,
    data_cursor: dict[str, Any],
    recipe: Recipe,
    tokenizer_bytes: bytes | None,
) -> Path:
    """Write the checkpoint of optimizer step ``step`` and publish it as ``latest``.

    Called on every rank. ``data_cursor`` is the training loader's ``state_dict()`` (the same on
    every rank). Returns the final checkpoint directory; older checkpoints beyond
    ``recipe.trainer.keep_last`` are removed afterwards.
    """
    rank, world = _rank_world()
    root = Path(run_dir) / CHECKPOINTS_DIR
    tag = checkpoint_tag(step)
    staging = root / f"{_TMP_PREFIX}{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
    _barrier()
    client_state = {"step": step, "tokens_seen": tokens_seen, "data_cursor": data_cursor}
    engine.save_checkpoint(
        str(root), tag=staging.name, client_state=client_state, save_latest=False
    )
    torch.save(capture_rng_state(), staging / rng_file(rank))
    if rank == 0:
        (staging / RECIPE_FILE).write_text(recipe.resolved_yaml())
        if tokenizer_bytes is not None:
            (staging / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
    _barrier()
    digests = _hash_files(staging, _checkpoint_files(staging))
    final = root / tag
    if rank == 0:
        manifest = {
            "format": MANIFEST_FORMAT,
            "step": step,
            "tokens_seen": tokens_seen,
            "data_cursor": data_cursor,
            "world_size": world,
            "sequence_parallel": sequence_parallel_layout(recipe),
            "rng_states": [rng_file(r) for r in range(world)],
            "zero_stage": recipe.trainer.zero_stage,
            "dtype": recipe.trainer.dtype,
            "recipe_hash": recipe.recipe_hash(),
            "shape": shape_summary(recipe),
            "files": digests,
        }
        write_atomic(staging / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
        _publish(staging, final)
        write_atomic(root / LATEST_FILE, tag + "\n")
        prune_checkpoints(root, recipe.trainer.keep_last)
    _barrier()
    return final


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished staging directory to its final name. A directory already there (the
    same step saved by an attempt that crashed before updating ``latest``) is moved aside
    first and deleted after the new one is in place."""
    displaced = final.with_name(f"{_TMP_PREFIX}old-{final.name}")
    if final.exists():
        shutil.rmtree(displaced, ignore_errors=True)
        os.replace(final, displaced)
    os.replace(staging, final)
    _fsync_directory(final.parent)
    shutil.rmtree(displaced, ignore_errors=True)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (named ``step_N`` and holding a manifest), by step."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _TAG_PATTERN.match(path.name)
            if match and (path / MANIFEST_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest``
    names) and any leftover staging directories; returns what was deleted."""
    protected = root / _read_latest(root) if (root / LATEST_FILE).is_file() else None
    complete = [path for _, path in list_checkpoints(root)]
    doomed = [path for path in complete[:-keep_last] if path != protected]
    doomed += [
        path for path in root.iterdir() if path.is_dir() and path.name.startswith(_TMP_PREFIX)
    ]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _read_latest(root: Path) -> str:
    return (root / LATEST_FILE).read_text().strip()


def resolve_checkpoint(run_dir: str | Path, resume: str) -> Path:
    """The checkpoint directory that ``--resume`` names.

    ``latest`` means ``RUN/checkpoints/latest``; otherwise ``resume`` is a path: a checkpoint
    directory (holding ``manifest.json``), or a run directory (its latest checkpoint).
    """
    if resume == "latest":
        root = Path(run_dir) / CHECKPOINTS_DIR
        if not (root / LATEST_FILE).is_file():
            raise LongctxError(
                f"--resume latest: {root / LATEST_FILE} does not exist, so {run_dir} has no "
                "checkpoint yet; start without --resume or pass --resume PATH of a checkpoint"
            )
        return root / _read_latest(root)
    path = Path(resume).expanduser()
    if not path.exists():
        raise LongctxError(
            f"--resume {resume}: no such file or directory; pass 'latest' or the path of a "
            f"checkpoint directory such as RUN/{CHECKPOINTS_DIR}/{checkpoint_tag(500)}"
        )
    if path.is_dir() and not (path / MANIFEST_FILE).exists():
        root = path / CHECKPOINTS_DIR
        if (root / LATEST_FILE).is_file():
            return root / _read_latest(root)
    return path


def verify_checkpoint(path: str | Path, recipe: Recipe | None = None) -> dict[str, Any]:
    """Read and check a checkpoint's manifest; returns it.

    Refuses (one-line ``LongctxError``) a path that is not a directory, a directory without
    ``manifest.json`` (an incomplete or foreign checkpoint), an unreadable manifest, a listed
    file that is missing or whose sha256 differs, and, when ``recipe`` is given, a checkpoint
    whose model shape (``recipe_hash``) differs from the recipe's. With ``torch.distributed``
    initialised every rank must call it (the hashing is split over the ranks).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise LongctxError(
            f"checkpoint {directory} is not a directory; pass a checkpoint directory such as "
            f"RUN/{CHECKPOINTS_DIR}/{checkpoint_tag(500)}"
        )
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise LongctxError(
            f"checkpoint {directory} has no {MANIFEST_FILE}, so it is incomplete or not a "
            "longctx checkpoint; resume from another one (e.g. --resume latest)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LongctxError(
            f"checkpoint manifest {manifest_path} is not JSON ({type(error).__name__}); the "
            "checkpoint is damaged, resume from another one"
        ) from None
    absent = [
        key for key in _MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest
    ]
    if absent or not isinstance(manifest["files"], dict):
        raise LongctxError(
            f"checkpoint manifest {manifest_path} lacks {absent or ['files']}; the checkpoint "
            "is damaged or from another program, resume from another one"
        )
    files: dict[str, str] = manifest["files"]
    missing = sorted(name for name in files if not (directory / name).is_file())
    if missing:
        raise LongctxError(
            f"checkpoint {directory} lacks {len(missing)} file(s) its manifest lists, e.g. "
            f"{missing[0]}; the checkpoint is damaged, resume from another one"
        )
    actual = _hash_files(directory, sorted(files))
    corrupt = [name for name in sorted(files) if actual[name] != files[name]]
    if corrupt:
        raise LongctxError(
            f"checkpoint {directory}: sha256 of {corrupt[0]} is {actual[corrupt[0]][:16]}..., "
            f"the manifest says {files[corrupt[0]][:16]}... ({len(corrupt)} file(s) differ); the "
            "checkpoint is damaged, resume from another one"
        )
    if recipe is not None:
        check_recipe_compatible(manifest, recipe, directory)
    return manifest


def sequence_parallel_layout(recipe: Recipe) -> dict[str, int]:
    """``{ulysses, ring}`` of the recipe: with the world size, the layout a checkpoint was
    written under (each rank's optimizer shard, RNG state and data position belong to it)."""
    return {"ulysses": recipe.parallel.ulysses, "ring": recipe.parallel.ring}


def check_recipe_compatible(manifest: dict[str, Any], recipe: Recipe, directory: Path) -> None:
    """Refuse a checkpoint whose weights do not fit the recipe's model (different hash, naming
    the first field that differs), or whose DeepSpeed files belong to another ZeRO stage or
    precision (their optimizer shards have different layouts), or to another sequence-parallel
    layout (checkpoints from before the layout was recorded count as ulysses 1 x ring 1)."""
    saved_layout = manifest.get("sequence_parallel", {"ulysses": 1, "ring": 1})
    wanted_layout = sequence_parallel_layout(recipe)
    if saved_layout != wanted_layout:
        raise LongctxError(
            f"checkpoint {directory} was trained with parallel.ulysses x ring = "
            f"{saved_layout['ulysses']} x {saved_layout['ring']} but the recipe has "
            f"{wanted_layout['ulysses']} x {wanted_layout['ring']}; exact resume needs the same "
            f"layout, so resume with parallel.ulysses: {saved_layout['ulysses']} and "
            f"parallel.ring: {saved_layout['ring']}"
        )
    for field in ("zero_stage", "dtype"):
        saved, wanted = manifest.get(field), getattr(recipe.trainer, field)
        if saved is not None and saved != wanted:
            raise LongctxError(
                f"checkpoint {directory} was trained with trainer.{field}={saved!r} but the "
                f"recipe has {wanted!r}; DeepSpeed checkpoints are specific to both, so resume "
                f"with trainer.{field}: {saved}"
            )
    if manifest["recipe_hash"] == recipe.recipe_hash():
        return
    saved = manifest.get("shape", {})
    current = shape_summary(recipe)
    differing = [key for key in current if key in saved and saved[key] != current[key]]
    detail = (
        f"{differing[0]}={current[differing[0]]!r} in the recipe but {saved[differing[0]]!r} in "
        "the checkpoint"
        if differing
        else f"recipe hash {recipe.recipe_hash()} but {manifest['recipe_hash']} in the checkpoint"
    )
    raise LongctxError(
        f"checkpoint {directory} does not fit this recipe's model: {detail}; resume with the "
        "recipe the checkpoint was trained with, or start a new run directory"
    )


def load_checkpoint(engine: DeepSpeedEngine, path: str | Path, recipe: Recipe) -> dict[str, Any]:
    """Restore model, optimizer, LR schedule and step counters (DeepSpeed), and this rank's RNG
    state, from a verified checkpoint; returns the manifest (step, tokens_seen, data_cursor).

    Called on every rank. The world size must equal the one that wrote the checkpoint: each
    rank's optimizer shard, RNG state and data position belong to one rank of one layout.
    """
    directory = Path(path)
    manifest = verify_checkpoint(directory, recipe)
    rank, world = _rank_world()
    if manifest.get("world_size") != world:
        raise LongctxError(
            f"checkpoint {directory} was written by {manifest.get('world_size')} ranks but this "
            f"run has {world}; exact resume needs the same layout, so resume with --workers "
            f"{manifest.get('world_size')}"
        )
    loaded, _ = engine.load_checkpoint(
        str(directory.parent), tag=directory.name, load_module_strict=True
    )
    if loaded is None:
        raise LongctxError(
            f"DeepSpeed could not load checkpoint {directory}; it is damaged or was written "
            "by another DeepSpeed layout, resume from another one"
        )
    restore_rng_state(torch.load(directory / manifest["rng_states"][rank], weights_only=False))
    return manifest


def load_model_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The decoder's weights from a verified checkpoint, in ``Transformer.state_dict()`` names.

    ZeRO stage 0 keeps the whole model in ``mp_rank_00_model_states.pt``; stages 1-3 shard the
    fp32 master weights over the ranks, and DeepSpeed's ``zero_to_fp32`` reassembles them.
    Runs in a single process (evaluation, export, tests).
    """
    directory = Path(path)
    manifest = verify_checkpoint(directory)
    if manifest["zero_stage"] == 0:
        states = torch.load(directory / "mp_rank_00_model_states.pt", weights_only=False)
        module_state = states["module"]
    else:
        import_deepspeed()  # chooses the accelerator before any DeepSpeed module loads
        zero_to_fp32 = importlib.import_module("deepspeed.utils.zero_to_fp32")
        module_state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            str(directory.parent), tag=directory.name
        )
    return _strip_prefix(module_state, ENGINE_MODULE_PREFIX)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state.items()}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest`` names, or None when there is none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    return root / _read_latest(root) if (root / LATEST_FILE).is_file() else None
