"""The run directory: what counts as an existing run, the checks made before anything is
written, and the files that describe the run.

``validate_run`` is called twice with the same arguments: by the CLI driver before any worker
starts (so bad input fails fast, exit code 2), and by every worker before it writes anything.
It refuses, with a one-line ``LongctxError`` and without touching the disk:

- a run directory that already holds a run when no ``--resume`` is given (never overwrite);
- a ``--resume`` target that does not exist, has no manifest, fails its sha256 check, or was
  trained with a different model shape (recipe hash);
- a tokenizer whose vocabulary is larger than the model's embedding.

Layout written here: ``RUN/config.yaml`` (the resolved recipe) and ``RUN/launch.json`` (which
invocation owns the run, so a worker group that Ray Train restarts before the first checkpoint
recognises the half-started run as its own instead of refusing it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from longctx.data import load_tokenizer
from longctx.errors import LongctxError
from longctx.trainer.checkpoint import (
    CHECKPOINTS_DIR,
    resolve_checkpoint,
    verify_checkpoint,
    write_atomic,
)

if TYPE_CHECKING:
    from longctx.trainer.config import Recipe

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
        verify_checkpoint(checkpoint, recipe)
    tokenizer_path = recipe.data.tokenizer.path
    if tokenizer_path is not None:
        check_vocabulary(load_tokenizer(tokenizer_path).vocab_size, recipe, tokenizer_path)
    return checkpoint


def write_run_files(recipe: Recipe, run_dir: str | Path, launch_id: str | None) -> None:
    """Write ``config.yaml`` (the resolved recipe now in force) and ``launch.json``; rank 0
    calls it after ``validate_run`` passed. On resume both are replaced: each checkpoint keeps
    the recipe it was trained with in its own ``recipe.yaml``."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / CONFIG_FILE, recipe.resolved_yaml())
    write_atomic(root / LAUNCH_FILE, json.dumps({"launch_id": launch_id}) + "\n")
