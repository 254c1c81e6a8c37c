"""longctx.trainer: the DeepSpeed engine, the training loop, stages, metrics and the per-rank
worker.

Names are exported lazily (PEP 562): importing the package must not pay
for importing DeepSpeed, TensorBoard, the model and the data pipeline.

    train_worker(job, report=None) -> summary            every rank of a run
    TrainJob(recipe, run_dir, resume, ...)                what the driver hands to every rank
    build_engine(model, trainer_config, sp_group) -> DeepSpeed engine
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train_worker": "longctx.trainer.worker",
    "TrainJob": "longctx.trainer.job",
    "build_model": "longctx.checkpoint.saved_model",
    "build_engine": "longctx.trainer.engine",
    "lr_factor": "longctx.trainer.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longctx.trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
