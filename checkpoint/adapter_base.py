"""The frozen base weights an adapter checkpoint was trained on: named and hashed, not copied.

An adapter run's checkpoint holds only what trains (the LoRA matrices, LongLoRA's embedding and
norms, their AdamW moments); its manifest's ``adapter_base`` says which base they belong to:

    {"source": "hf:/abs/path" | "checkpoint:step_000800" | "scratch", "sha256": HEX}

- ``hf:PATH``: the Hugging Face directory of ``model.init``; ``sha256`` over the sorted
  ``(file name, sha256)`` of its ``*.safetensors`` files (streamed, never held in memory);
- ``checkpoint:TAG``: a checkpoint of the same run (a stage's final weights, e.g. the full
  fine-tuning stage before a LongLoRA stage); ``sha256`` of its manifest, which itself lists
  the sha256 of every file in it (and, for an adapter checkpoint, its own base);
- ``scratch``: the seeded random initialisation of the recipe's shape; ``sha256`` of the
  recipe hash and ``trainer.seed``.

Resuming, evaluating or exporting the adapters recomputes the reference of the base at hand and
refuses, in one line naming both, a base that differs (``check_adapter_base``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longctx.checkpoint.store import (
    BASE_CHECKPOINT_SOURCE,
    BASE_KEY,
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    sha256_file,
)
from longctx.errors import LongctxError

if TYPE_CHECKING:
    from longctx.config.recipe import Recipe

__all__ = ["BASE_KEY", "base_checkpoint_of", "base_reference", "check_adapter_base"]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def base_reference(recipe: Recipe, base_checkpoint: Path | None) -> dict[str, str]:
    """The reference of the base an adapter run of ``recipe`` trains on: ``base_checkpoint``
    (a checkpoint of the run, e.g. the previous stage's final one) when given, else the
    recipe's ``model.init`` (``hf:PATH`` or ``scratch``)."""
    if base_checkpoint is not None:
        if not (base_checkpoint / MANIFEST_FILE).is_file():
            raise LongctxError(
                f"the adapters' base checkpoint {base_checkpoint} is missing (no "
                f"{MANIFEST_FILE}); restore it from a copy of the run"
            )
        return {
            "source": BASE_CHECKPOINT_SOURCE + base_checkpoint.name,
            "sha256": sha256_file(base_checkpoint / MANIFEST_FILE),
        }
    init = recipe.model.init
    if init.startswith("hf:"):
        directory = Path(init.removeprefix("hf:")).expanduser().resolve()
        files = sorted(directory.glob("*.safetensors"))
        listing = "".join(f"{path.name}:{sha256_file(path)}\n" for path in files)
        return {"source": f"hf:{directory}", "sha256": _sha256_text(listing)}
    seeded = json.dumps({"recipe_hash": recipe.recipe_hash(), "seed": recipe.trainer.seed})
    return {"source": "scratch", "sha256": _sha256_text(seeded)}


def base_checkpoint_of(reference: dict[str, Any], checkpoint: Path) -> Path | None:
    """The checkpoint directory a reference names, resolved beside ``checkpoint`` (same run);
    None for an ``hf:`` or ``scratch`` base."""
    source = str(reference["source"])
    if not source.startswith(BASE_CHECKPOINT_SOURCE):
        return None
    return checkpoint.parent / source.removeprefix(BASE_CHECKPOINT_SOURCE)


def check_adapter_base(
    saved: dict[str, Any] | None, current: dict[str, str], checkpoint: Path
) -> None:
    """Refuse (one line) adapters of ``checkpoint`` whose base reference ``saved`` differs from
    the base at hand (``current``). A checkpoint without a reference (full weights) passes."""
    if saved is None or saved.get("sha256") == current["sha256"]:
        return
    raise LongctxError(
        f"checkpoint {checkpoint} holds adapters trained on base {saved.get('source')} (sha256 "
        f"{str(saved.get('sha256'))[:12]}) but the base now is {current['source']} (sha256 "
        f"{current['sha256'][:12]}); restore that base (model.init, or the run's "
        f"{CHECKPOINTS_DIR}/ directory) or start a new run"
    )
