"""longctx.trainer: the recipe schema, the DeepSpeed engine, the training loop, checkpoints and
metrics.

Names are exported lazily (PEP 562): reading a recipe (``longctx.trainer.config``) must not pay
for importing DeepSpeed, TensorBoard, the model and the data pipeline.

    train_worker(job, report=None) -> summary            every rank of a run
    validate_run(recipe, run_dir, resume) -> Path | None the checks the CLI makes up front
    resolve_checkpoint(run_dir, "latest" | PATH) -> Path
    verify_checkpoint(path, recipe=None) -> manifest
    load_model_state_dict(path) -> Transformer state dict
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Recipe": "longctx.trainer.config",
    "TrainerConfig": "longctx.trainer.config",
    "load_recipe": "longctx.trainer.config",
    "train_worker": "longctx.trainer.worker",
    "build_model": "longctx.trainer.worker",
    "validate_run": "longctx.trainer.run_dir",
    "run_markers": "longctx.trainer.run_dir",
    "resolve_checkpoint": "longctx.trainer.checkpoint",
    "verify_checkpoint": "longctx.trainer.checkpoint",
    "latest_checkpoint": "longctx.trainer.checkpoint",
    "load_model_state_dict": "longctx.trainer.checkpoint",
    "build_engine": "longctx.trainer.engine",
    "lr_factor": "longctx.trainer.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longctx.trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
