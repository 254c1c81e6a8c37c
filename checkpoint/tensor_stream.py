"""The decoder's weights of a checkpoint, one tensor at a time.

``iter_model_tensors(CHECKPOINT_DIR)`` yields ``(name, tensor)`` in ``Transformer.state_dict()``
names, as full (unsharded) fp32 tensors, reading each from disk only when it is asked for, so a
consumer that handles one tensor and drops it (``longctx export --hf``) never holds the whole
model. It is the one place that knows where a checkpoint keeps its weights: today a single
``model.safetensors`` (``full_state.MODEL_FILE``), read with ``safe_open`` (nothing is
unpickled). A sharded checkpoint format re-implements this function and every reader follows.

The caller verifies the checkpoint first (``saved_model.open_checkpoint`` checks every file's
sha256 against the manifest).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from longctx.checkpoint.full_state import MODEL_FILE


def iter_model_tensors(checkpoint_dir: str | Path) -> Iterator[tuple[str, Tensor]]:
    """``(state_dict name, fp32 tensor)`` of every tensor of the checkpoint's decoder, read one
    at a time from ``CHECKPOINT_DIR/model.safetensors``."""
    with safe_open(Path(checkpoint_dir) / MODEL_FILE, framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            yield name, handle.get_tensor(name)
