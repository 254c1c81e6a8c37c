"""Exact-resume checkpoints: the training state as per-rank safetensors shards plus a manifest,
published atomically.

Layout (DESIGN section 8)::

    RUN/checkpoints/step_000500/   state_index.json and state_rRRRRR_pPPPPP.safetensors (each
                                   rank's fragments of the fp32 weights and AdamW moments,
                                   ``checkpoint.sharded_state``), rng_rank_NNNNN.pt (each rank's
                                   python/numpy/torch RNG, tensors and plain values only),
                                   recipe.yaml, tokenizer.model, manifest.json
    RUN/checkpoints/latest         one line, the name of the newest complete checkpoint

A checkpoint is written under a hidden temporary name (``.tmp-step_000500``); each rank writes
its own shards and checks its fragments are finite (a checkpoint of NaN or inf weights is never
published: the run stops instead) and hashes the files it wrote; rank 0 writes
``manifest.json`` (step, tokens seen, data cursor, recipe hash, layout, counters, sha256 of
every other file) into it, and only then is the directory renamed to its final name and
``latest`` replaced by an atomic rename. A crash at any point leaves either the previous
checkpoint as ``latest`` or the new one complete; a directory without a manifest is never
loaded, and ``--resume latest`` reports the incomplete ones it skips. The last ``keep_last``
checkpoints are kept.

Nothing in a checkpoint is unpickled on load: tensors come from safetensors, the index and
manifest are JSON, and the RNG files go through ``torch.load(weights_only=True)``. The
manifest's file names must stay inside the checkpoint directory, and the shard layout is
checked against the index before anything is loaded (``check_shards``). Restoring reshards, so
a checkpoint resumes under another world size, sequence-parallel layout or ZeRO stage (elastic
resume): the data position is carried over in global rows (``translate_data_cursor``).

Every rank calls ``save_checkpoint`` and ``load_checkpoint`` (each writes and reads its own
share); the run directory must be on storage every rank sees (one machine, or a shared file
system on a cluster). ``verify_checkpoint``, ``load_model_weights`` and
``load_model_state_dict`` work in any single process (the CLI driver, evaluation, export).
Both phases log their wall time on rank 0 (``checkpoint save step_N: done in S s``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from longctx.checkpoint.full_state import (
    engine_counters,
    restore_counters,
    rng_state_from_plain,
    rng_state_to_plain,
    translate_data_cursor,
)
from longctx.checkpoint.sharded_state import (
    INDEX_FILE,
    check_names_and_shapes,
    check_shards,
    fill_partitions,
    iter_model_tensors,
    new_checkpoint_id,
    read_index,
    restore_shards,
    state_entries,
    write_shards,
)
from longctx.errors import LongctxError
from longctx.parallel.zero_init import PartitionedLoad

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from longctx.config.recipe import Recipe

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
RECIPE_FILE = "recipe.yaml"
TOKENIZER_FILE = "tokenizer.model"
# 1: DeepSpeed's sharded files (pickles); 2: one full-state model.safetensors and
# optimizer.safetensors (rank 0 gathered everything); 3: per-rank safetensors shards + JSON index
MANIFEST_FORMAT = 3
_FORMAT_NAMES = {
    1: "DeepSpeed's pickled shards",
    2: "full-state model.safetensors + optimizer.safetensors",
}
_TAG_PATTERN = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_HASH_BLOCK = 1 << 20
# The manifest entry naming an adapter checkpoint's frozen base (``checkpoint/adapter_base.py``)
# and the prefix of a base that is a checkpoint of the same run.
BASE_KEY = "adapter_base"
BASE_CHECKPOINT_SOURCE = "checkpoint:"
log = logging.getLogger("longctx.checkpoint")
_MANIFEST_KEYS = (
    "rng_states",
    "step",
    "tokens_seen",
    "data_cursor",
    "world_size",
    "zero_stage",
    "recipe_hash",
    "counters",
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
    ``recipe.trainer.keep_last`` are removed afterwards. Raises ``LongctxError`` on every rank,
    leaving ``latest`` and the previous checkpoints as they were, when a weight or optimizer
    moment is NaN or inf.
    """
    rank, world = _rank_world()
    root = Path(run_dir) / CHECKPOINTS_DIR
    tag = checkpoint_tag(step)
    staging = root / f"{_TMP_PREFIX}{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
        staging.mkdir()
    _barrier()
    started = time.perf_counter()
    if rank == 0:
        log.info("checkpoint save %s: start", tag)
    mine, bad = write_shards(engine, staging, new_checkpoint_id())
    _refuse_non_finite(bad, staging, step)
    torch.save(rng_state_to_plain(capture_rng_state()), staging / rng_file(rank))
    mine.append(rng_file(rank))
    if rank == 0:
        (staging / RECIPE_FILE).write_text(recipe.resolved_yaml())
        mine.append(RECIPE_FILE)
        if tokenizer_bytes is not None:
            (staging / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
            mine.append(TOKENIZER_FILE)
    digests = _gather_digests(staging, mine)
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
            "counters": engine_counters(engine),
            "files": digests,
        }
        base = getattr(engine.module.model, BASE_KEY, None)  # set by the worker for adapters
        if base is not None:
            manifest[BASE_KEY] = base
        write_atomic(staging / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
        _publish(staging, final)
        write_atomic(root / LATEST_FILE, tag + "\n")
        prune_checkpoints(root, recipe.trainer.keep_last)
    _barrier()
    if rank == 0:
        log.info("checkpoint save %s: done in %.2f s", tag, time.perf_counter() - started)
    return final


def _gather_digests(directory: Path, mine: list[str]) -> dict[str, str]:
    """sha256 of every file written: each rank hashes the files it wrote (``mine``), and the
    digests are gathered on every rank, sorted by name."""
    digests = {name: sha256_file(directory / name) for name in mine}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, digests)
        digests = {name: digest for part in gathered for name, digest in part.items()}
    return dict(sorted(digests.items()))


def _refuse_non_finite(bad: str | None, staging: Path, step: int) -> None:
    """Stop every rank, before anything is renamed into place, when a rank's fragment of a
    weight or moment is not finite (``bad`` names it, the same on every rank); the staging
    directory is removed and ``latest`` keeps naming the last good checkpoint."""
    if bad is None:
        return
    _barrier()
    if _rank_world()[0] == 0:
        shutil.rmtree(staging, ignore_errors=True)
    raise LongctxError(
        f"step {step}: {bad} holds NaN or inf, so checkpoint {checkpoint_tag(step)} "
        "was not written (the last good one stays latest); lower trainer.lr or "
        "trainer.grad_clip and resume with --resume latest"
    )


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


def incomplete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` that a crash left unfinished: staging directories
    (``.tmp-step_N``, a save interrupted before its rename) and ``step_N`` directories without a
    manifest. They are never loaded; the next save or prune removes them."""
    if not root.is_dir():
        return []
    return sorted(
        path
        for path in root.iterdir()
        if path.is_dir()
        and (
            path.name.startswith(_TMP_PREFIX)
            or (_TAG_PATTERN.match(path.name) and not (path / MANIFEST_FILE).is_file())
        )
    )


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest``
    names, nor the base checkpoint a kept adapter checkpoint names) and any leftover staging
    directories; returns what was deleted."""
    protected = {root / _read_latest(root)} if (root / LATEST_FILE).is_file() else set()
    complete = [path for _, path in list_checkpoints(root)]
    for kept in complete[-keep_last:]:  # adapters' base checkpoints (a stage's final weights)
        source = str(read_manifest(kept).get(BASE_KEY, {}).get("source", ""))
        if source.startswith(BASE_CHECKPOINT_SOURCE):
            protected.add(root / source.removeprefix(BASE_CHECKPOINT_SOURCE))
    doomed = [path for path in complete[:-keep_last] if path not in protected]
    doomed += [
        path for path in root.iterdir() if path.is_dir() and path.name.startswith(_TMP_PREFIX)
    ]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _read_latest(root: Path) -> str:
    return (root / LATEST_FILE).read_text().strip()


def read_manifest(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's manifest as JSON, unverified: the one reader of ``manifest.json``
    (``verify_checkpoint`` checks it and the files it names; the stage planner only reads which
    step wrote the checkpoint)."""
    return json.loads((Path(checkpoint) / MANIFEST_FILE).read_text())


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
        manifest = read_manifest(directory)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LongctxError(
            f"checkpoint manifest {manifest_path} is not JSON ({type(error).__name__}); the "
            "checkpoint is damaged, resume from another one"
        ) from None
    if isinstance(manifest, dict) and manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format")
        name = _FORMAT_NAMES.get(found, "unknown") if isinstance(found, int) else "unknown"
        raise LongctxError(
            f"checkpoint {directory} is in checkpoint format {found!r} ({name}); this longctx "
            f"reads format {MANIFEST_FORMAT} (per-rank safetensors shards); resume or export it "
            "with the longctx version that wrote it, or start a new run"
        )
    absent = [
        key for key in _MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest
    ]
    if absent or not isinstance(manifest["files"], dict):
        raise LongctxError(
            f"checkpoint manifest {manifest_path} lacks {absent or ['files']}; the checkpoint "
            "is damaged or from another program, resume from another one"
        )
    files: dict[str, str] = manifest["files"]
    for name in [*files, *manifest["rng_states"]]:
        _check_inside(directory, name, manifest_path)
    unhashed = [n for n in [INDEX_FILE, *manifest["rng_states"]] if n not in files]
    if unhashed:
        raise LongctxError(
            f"checkpoint manifest {manifest_path} has no sha256 for {unhashed[0]}; the "
            "checkpoint is damaged or from another program, resume from another one"
        )
    missing = sorted(name for name in files if not (directory / name).is_file())
    if missing:
        raise LongctxError(
            f"checkpoint {directory} lacks {len(missing)} file(s) its manifest lists, e.g. "
            f"{missing[0]}; the checkpoint is damaged, resume from another one"
        )
    check_shards(directory, manifest)
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


def _check_inside(directory: Path, name: Any, manifest_path: Path) -> None:
    """Refuse a manifest entry that is not a relative path inside ``directory`` (absolute,
    ``..``, or a symlink out of it): hashing or loading it would read files elsewhere."""
    relative = Path(name) if isinstance(name, str) else None
    inside = (
        relative is not None
        and name != ""
        and not relative.is_absolute()
        and ".." not in relative.parts
        and (directory / relative).resolve().is_relative_to(directory.resolve())
    )
    if not inside:
        raise LongctxError(
            f"checkpoint manifest {manifest_path} lists {name!r}, a path outside the checkpoint "
            "directory; the manifest is damaged or was tampered with, resume from another "
            "checkpoint"
        )


def sequence_parallel_layout(recipe: Recipe) -> dict[str, int]:
    """``{ulysses, ring}`` of the recipe: with the world size, the layout a checkpoint was
    written under (each rank's optimizer shard, RNG state and data position belong to it)."""
    return {"ulysses": recipe.parallel.ulysses, "ring": recipe.parallel.ring}


def check_recipe_compatible(manifest: dict[str, Any], recipe: Recipe, directory: Path) -> None:
    """Refuse a checkpoint whose weights do not fit the recipe's model (different hash, naming
    the first field that differs). World size, sequence-parallel layout, ZeRO stage and dtype
    may differ: the saved state is full fp32 and fits any of them."""
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
    """Restore model, optimizer, LR schedule and step counters, and this rank's RNG state, from
    a verified checkpoint; returns the manifest (step, tokens_seen, and the data cursor
    translated to this run's data-parallel layout).

    Called on every rank, under any world size, sequence-parallel layout and ZeRO stage: the
    full state is copied into this engine's partitions. A rank beyond the writer's world size
    takes rank 0's RNG state (training draws no random numbers; the generators only matter
    for exact continuation of the same layout).
    """
    directory = Path(path)
    manifest = verify_checkpoint(directory, recipe)
    rank, world = _rank_world()
    rng_state = read_rng_file(directory, manifest, rank)
    started = time.perf_counter()
    if rank == 0:
        log.info("checkpoint restore %s: start", directory.name)
    counters = manifest["counters"]
    restore_shards(engine, directory, read_index(directory), counters["optimizer_step"], directory)
    restore_counters(engine, counters)
    restore_rng_state(rng_state)
    _barrier()
    if rank == 0:
        log.info(
            "checkpoint restore %s: done in %.2f s", directory.name, time.perf_counter() - started
        )
    dp_size = recipe.parallel.resolve(world).dp
    cursor = translate_data_cursor(
        manifest["data_cursor"], dp_size, recipe.trainer.micro_batch_size
    )
    return {**manifest, "data_cursor": cursor}


def read_rng_file(directory: Path, manifest: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank ``rank``'s RNG state from a verified checkpoint (rank 0's for a rank the writer did
    not have), read with ``torch.load(weights_only=True)``: a file that would need arbitrary
    code to unpickle is refused, never run."""
    names = manifest["rng_states"]
    path = directory / names[rank if rank < len(names) else 0]
    try:
        plain = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - every refusal to unpickle means the same here
        raise LongctxError(
            f"checkpoint file {path} is not a plain tensor file ({type(error).__name__}); it was "
            "not written by longctx and is not loaded, resume from another checkpoint"
        ) from None
    return rng_state_from_plain(plain)


def load_model_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The decoder's weights from a verified checkpoint, in ``Transformer.state_dict()`` names
    (fp32, assembled from the shards: nothing is unpickled). Runs in a single process
    (evaluation, tests); ``load_model_weights`` fills a model without this second copy."""
    directory = Path(path)
    verify_checkpoint(directory)
    return dict(iter_model_tensors(directory))


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a verified checkpoint's weights into ``model`` (a ``Transformer`` of its shape, any
    dtype) one tensor at a time: at most one full fp32 tensor is held beside the model. Refuses
    a checkpoint whose tensor names or shapes differ from the model's (one line)."""
    directory = Path(path)
    verify_checkpoint(directory)
    check_names_and_shapes(state_entries(model), read_index(directory), directory, "load it")
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in iter_model_tensors(directory):
            state[name].copy_(tensor)


def load_partitioned_weights(model: torch.nn.Module, path: str | Path) -> PartitionedLoad:
    """Fill a ZeRO-3 ``model`` built under ``zero.Init`` with a verified checkpoint's weights,
    each rank reading only its partitions (``sharded_state.fill_partitions``; collective in
    that every rank calls it, but no communication). Returns what this rank read."""
    directory = Path(path)
    verify_checkpoint(directory)
    return fill_partitions(model, directory, read_index(directory))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest`` names, or None when there is none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    return root / _read_latest(root) if (root / LATEST_FILE).is_file() else None
