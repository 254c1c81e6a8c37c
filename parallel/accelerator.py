"""This rank's accelerator and the one way longctx imports DeepSpeed.

DeepSpeed picks its accelerator once, at its first import, and the import costs seconds, which
code that only reads a recipe should not pay; so every module that needs DeepSpeed calls
``import_deepspeed()`` at the point of use.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def import_deepspeed():
    """Import DeepSpeed after choosing its accelerator and the rank's local index.

    DeepSpeed picks its accelerator once, at first use, and its CPU accelerator is not chosen
    automatically: ``DS_ACCELERATOR`` defaults to ``cuda`` when torch sees a GPU, else ``cpu``.
    ``LOCAL_RANK`` (which device this rank drives) is required by DeepSpeed; launchers such as
    Ray Train set it; when it is missing it is derived from the global rank.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if "LOCAL_RANK" not in os.environ:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or max(torch.cuda.device_count(), 1)
        os.environ["LOCAL_RANK"] = str(rank % per_node if torch.cuda.is_available() else rank)
    import deepspeed

    return deepspeed


def select_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` made current on a GPU machine (NCCL collectives,
    including the checkpoint checks that run before the engine exists, use the current
    device), else the CPU."""
    import_deepspeed()  # fills in LOCAL_RANK when the launcher did not
    if torch.cuda.is_available():
        index = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
