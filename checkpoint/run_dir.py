"""The run directory: what counts as an existing run, the checks made before anything is
written, and the files that describe the run.

``validate_run`` is called twice with the same arguments: by the CLI driver before any worker
starts (so bad input fails fast, exit code 2), and by every worker before it writes anything.
It refuses, with a one-line ``LongctxError`` and without touching the disk:

- a run directory that already holds a run when no ``--resume`` is given (never overwrite);
- a ``--resume`` target that does not exist, has no manifest, fails its sha256 check, was
  trained with a different model shape (recipe hash), or whose data position has no exact
  equivalent under this run's data-parallel layout;
- a tokenizer whose vocabulary is larger than the model's embedding;
- in the CLI driver (no process group yet; the workers build their data themselves): text
  sources that are missing, empty, binary, not UTF-8, or JSON lines without ``text``, and, when
  the recipe names its tokenizer, data too short to fill one batch of every data-parallel rank
  (the splits are built once here, so the mistake fails before any worker starts).

A ``--resume`` that skips checkpoint directories a crash left unfinished says so on stderr
(one line each); they are never loaded.

Layout written here: ``RUN/config.yaml`` (the resolved recipe) and ``RUN/launch.json`` (which
invocation owns the run, so a worker group that Ray Train restarts before the first checkpoint
recognises the half-started run as its own instead of refusing it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from longctx.checkpoint.full_state import translate_data_cursor
from longctx.checkpoint.store import (
    CHECKPOINTS_DIR,
    incomplete_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
    write_atomic,
)
from longctx.data import PackedLoader, Tokenizer, build_datasets, load_tokenizer
from longctx.data.chat import read_conversations
from longctx.data.sources import read_documents
from longctx.errors import LongctxError

if TYPE_CHECKING:
    from longctx.config.recipe import Recipe

log = logging.getLogger("longctx.run_dir")
CONFIG_FILE = "config.yaml"
LAUNCH_FILE = "launch.json"
TENSORBOARD_DIR = "tensorboard"


def run_markers(run_dir: str | Path) -> list[str]:
    """What in ``run_dir`` shows that a run was started there: ``config.yaml``, a non-empty
    ``checkpoints/`` or ``tensorboard/``. (A tokenizer trained there, or Ray's own folder, is
    not a run.)"""
    root = Path(run_dir)
    markers = []
    if (root / CONFIG_FILE).is_file():
        markers.append(CONFIG_FILE)
    for name in (CHECKPOINTS_DIR, TENSORBOARD_DIR):
        folder = root / name
        if folder.is_dir() and any(folder.iterdir()):
            markers.append(f"{name}/")
    return markers


def launch_owner(run_dir: str | Path) -> str | None:
    """The launch id recorded in ``RUN/launch.json``, or None."""
    path = Path(run_dir) / LAUNCH_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("launch_id")
    except (json.JSONDecodeError, AttributeError):
        return None


def check_vocabulary(tokenizer_vocab: int, recipe: Recipe, tokenizer_path: str) -> None:
    """Refuse a tokenizer that produces ids beyond the model's embedding rows."""
    model_vocab = recipe.model.vocab_size
    if tokenizer_vocab > model_vocab:
        raise LongctxError(
            f"tokenizer {tokenizer_path} has {tokenizer_vocab} tokens but the model's embedding "
            f"has model.vocab_size={model_vocab} rows; set model.vocab_size >= "
            f"{tokenizer_vocab} or use a tokenizer with at most {model_vocab} tokens"
        )


def report_incomplete_checkpoints(run_dir: str | Path, chosen: Path) -> None:
    """Log (stderr, rank 0 or the driver) each checkpoint directory a crash left unfinished,
    which the resume skips: it is never loaded, and the next save or prune deletes it."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    for partial in incomplete_checkpoints(Path(run_dir) / CHECKPOINTS_DIR):
        log.warning(
            "ignoring incomplete checkpoint %s (interrupted while being written, no manifest); "
            "resuming from %s",
            partial,
            chosen,
        )


def validate_run(
    recipe: Recipe,
    run_dir: str | Path,
    resume: str | None,
    *,
    launch_id: str | None = None,
) -> Path | None:
    """Check the run directory, the resume target and the tokenizer before anything is written.

    Returns the checkpoint directory to resume from (None for a fresh start). ``launch_id``
    identifies this invocation: a directory whose ``launch.json`` carries the same id is this
    invocation's own run, restarted by Ray Train before its first checkpoint, and may start
    over. Reads the disk only.
    """
    checkpoint = None
    if resume is None:
        markers = run_markers(run_dir)
        if markers and (launch_id is None or launch_owner(run_dir) != launch_id):
            raise LongctxError(
                f"run directory {run_dir} already holds a run ({', '.join(markers)}); pass "
                "--resume latest to continue it, or set trainer.run_dir (or the recipe name) "
                "to a new directory"
            )
    else:
        checkpoint = resolve_checkpoint(run_dir, resume)
        report_incomplete_checkpoints(run_dir, checkpoint)
        manifest = verify_checkpoint(checkpoint, recipe)
        if isinstance(recipe.parallel.dp, int):  # a resolved layout (the driver's, a worker's)
            translate_data_cursor(
                manifest["data_cursor"], recipe.parallel.dp, recipe.trainer.micro_batch_size
            )
    tokenizer_path = recipe.data.tokenizer.path
    tokenizer = None
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
        check_vocabulary(tokenizer.vocab_size, recipe, tokenizer_path)
    if not dist.is_initialized():
        check_data(recipe, tokenizer)
    return checkpoint


def check_data(recipe: Recipe, tokenizer: Tokenizer | None) -> None:
    """Read the text sources (one-line errors for unusable files) and, with a tokenizer, build
    the splits and their loaders as a data-parallel rank would (one-line error for too little
    data). Without a tokenizer (trained by the run's first worker) only the files are read."""
    data = recipe.data
    if tokenizer is None:
        if data.active_tasks().get("text"):
            if data.text_paths():
                read_documents(data.text_paths())
            read_conversations(data.chat_paths())
        return
    dp = recipe.parallel.dp if isinstance(recipe.parallel.dp, int) else 1
    splits = build_datasets(data, tokenizer)
    PackedLoader(splits.train, recipe.trainer.micro_batch_size, 0, dp)
    if splits.eval is not None and recipe.trainer.eval_every > 0:
        PackedLoader(splits.eval, recipe.trainer.micro_batch_size, 0, dp)


def write_run_files(recipe: Recipe, run_dir: str | Path, launch_id: str | None) -> None:
    """Write ``config.yaml`` (the resolved recipe now in force) and ``launch.json``; rank 0
    calls it after ``validate_run`` passed. On resume both are replaced: each checkpoint keeps
    the recipe it was trained with in its own ``recipe.yaml``."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / CONFIG_FILE, recipe.resolved_yaml())
    write_atomic(root / LAUNCH_FILE, json.dumps({"launch_id": launch_id}) + "\n")
