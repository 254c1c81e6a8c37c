"""The layout-free, pickle-free pieces of a checkpoint's training state, and the engine internals
the sharded state (``sharded_state.py``) reads and writes through.

- each rank's RNG state in plain types (``rng_state_to_plain``, loadable with
  ``torch.load(weights_only=True)``);
- the data loader's position translated between data-parallel layouts
  (``translate_data_cursor``);
- the step counters of the engine and its LR schedule (``engine_counters``,
  ``restore_counters``), which go into the manifest;
- the parameters in layout-free ``state_dict`` names (``unique_parameters``), the torch AdamW
  under DeepSpeed's wrapper and the tensors its state is keyed by, and the refresh of the
  model's parameters from restored fp32 masters (``copy_masters_to_model``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from longctx.errors import LongctxError

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

MOMENTS = ("exp_avg", "exp_avg_sq")


def rng_state_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    """``capture_rng_state()`` in types ``torch.load(weights_only=True)`` accepts: numpy's
    ``(name, keys ndarray, pos, has_gauss, cached)`` tuple becomes a dict with a tensor."""
    name, keys, position, has_gauss, cached = state["numpy"]
    plain = dict(state)
    plain["numpy"] = {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return plain


def rng_state_from_plain(plain: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``rng_state_to_plain``."""
    numpy_state = plain["numpy"]
    state = dict(plain)
    state["numpy"] = (
        numpy_state["name"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    )
    return state


def translate_data_cursor(
    cursor: dict[str, Any], dp_size: int, micro_batch_size: int
) -> dict[str, Any]:
    """The loader position ``cursor`` (saved at its ``dp_size`` x ``micro_batch_size``) for a
    run with ``dp_size`` data-parallel groups of ``micro_batch_size`` rows.

    ``PackedLoader`` deals each epoch's permuted rows round-robin to the data-parallel ranks, so
    the ``b``-th micro-batches of all ranks together are the permuted rows
    ``b x dp x B ... (b + 1) x dp x B - 1``: the position in global rows, ``next_batch x dp x
    B``, means the same data under any layout whose batches of ``dp x B`` rows end on it, and
    the rows that follow come in the same order. (Each layout cuts an epoch to a multiple of its
    ``dp x B``, so at the end of the epoch the new one may read up to ``dp x B - 1`` rows that
    the old one would have skipped.) Refuses (one line) a layout that cannot stop at that row.
    """
    old_dp, old_batch = int(cursor["dp_size"]), int(cursor["micro_batch_size"])
    if (old_dp, old_batch) == (dp_size, micro_batch_size):
        return cursor
    rows = int(cursor["num_rows"])
    position = int(cursor["next_batch"]) * old_batch * old_dp
    per_batch = micro_batch_size * dp_size
    new_epoch = (rows // dp_size) // micro_batch_size * per_batch
    if position % per_batch or position > new_epoch:
        raise LongctxError(
            f"the checkpoint's data position (row {position} of its epoch, read at dp {old_dp} x "
            f"micro_batch_size {old_batch}) has no exact equivalent at dp {dp_size} x "
            f"micro_batch_size {micro_batch_size} (batches of {per_batch} rows, {new_epoch} per "
            f"epoch); choose dp x micro_batch_size dividing {position}, e.g. "
            f"{old_dp * old_batch} as before"
        )
    return {
        **cursor,
        "next_batch": position // per_batch,
        "dp_size": dp_size,
        "micro_batch_size": micro_batch_size,
    }


def decoder_of(engine: DeepSpeedEngine) -> torch.nn.Module:
    """The decoder (``Transformer``) inside the engine's ``ModelWithLoss``."""
    return engine.module.model


def base_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch AdamW that holds the moments: the client optimizer itself (ZeRO-0 fp32), or
    the one DeepSpeed's ZeRO / bf16 wrapper drives over its flat fp32 partitions."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def unique_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of each trainable parameter once (tied weights under their first
    name), in registration order: the order every rank walks them in.

    Names are the module's state-dict names, not its ``named_parameters`` paths: sequence-
    parallel wrappers keep the plain model's names in the state dict (``model/
    state_names.py``) but not in their parameter paths (``core.inner.``), and the saved
    weights and moments must carry the layout-free names to resume under any layout."""
    names: dict[int, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), name)
    return [(names[id(p)], p) for _, p in module.named_parameters() if p.requires_grad]


def saved_names(module: torch.nn.Module) -> set[str]:
    """The ``state_dict`` names a checkpoint of ``module`` holds: all of them when every
    parameter trains; only the trained parameters' (``unique_parameters``) when some are
    frozen (adapters): the frozen base is named by the manifest's base reference, not copied."""
    if all(param.requires_grad for param in module.parameters()):
        return set(module.state_dict().keys())
    return {name for name, _ in unique_parameters(module)}


def optimizer_step_count(engine: DeepSpeedEngine) -> int:
    """AdamW's step count (the same for every parameter), 0 before the first applied step."""
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            return int(float(state["step"]))
    return 0


def master_partitions(engine: DeepSpeedEngine) -> list[Tensor]:
    """The tensors AdamW's state is keyed by: this rank's flat fp32 partitions under ZeRO-3,
    ZeRO-1/2 and the bf16 optimizer (each keeps them under its own name), else the client
    optimizer's own parameters."""
    wrapper = engine.optimizer
    for name in (
        "fp32_partitioned_groups_flat",  # ZeRO-3
        "single_partition_of_fp32_groups",  # ZeRO-1/2
        "fp32_groups_flat_partition",  # bf16 optimizer
    ):
        if hasattr(wrapper, name):
            return list(getattr(wrapper, name))
    return [p for group in wrapper.param_groups for p in group["params"]]


def link_moment_fragments(engine: DeepSpeedEngine) -> None:
    """(Re)point each parameter's fragment view at the current moment tensors (ZeRO-1/2 and
    bf16). DeepSpeed links them once, right after the first parameter group's first step, so
    the fragments of later groups stay empty; and restored moments are new tensors."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def fresh_adam_state(like: Tensor, step: int) -> dict[str, Tensor]:
    """An AdamW state entry as torch creates it at the first step (step count, two moments)."""
    return {
        "step": torch.tensor(float(step), dtype=torch.float32),
        "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(like, memory_format=torch.preserve_format),
    }


def copy_masters_to_model(engine: DeepSpeedEngine) -> None:
    """Refresh the model's (possibly low-precision, possibly partitioned) parameters from the
    fp32 masters just restored: ZeRO-1/2 and bf16 copy each rank's partition and all-gather
    (``update_lp_params``); ZeRO-3 copies each sub-group's fp32 partition into the parameter
    partition it backs. ZeRO-0 fp32 parameters are their own masters (already set)."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "update_lp_params"):
        wrapper.update_lp_params()
    elif hasattr(wrapper, "fp32_partitioned_groups_flat"):
        for sub_group in range(len(wrapper.fp32_partitioned_groups_flat)):
            wrapper._reassign_or_swap_out_partitioned_parameters(sub_group)


def engine_counters(engine: DeepSpeedEngine) -> dict[str, int]:
    """AdamW's step count, DeepSpeed's step counters and the LR schedule's position: the
    scalars of the training state, kept in the manifest."""
    schedule = engine.lr_scheduler
    return {
        "optimizer_step": optimizer_step_count(engine),
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "schedule_last_epoch": int(schedule.last_epoch),
        "schedule_step_count": int(schedule._step_count),
    }


def restore_counters(engine: DeepSpeedEngine, counters: dict[str, Any]) -> None:
    """Put back what ``engine_counters`` returned."""
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])
    schedule = engine.lr_scheduler
    schedule.last_epoch = int(counters["schedule_last_epoch"])
    schedule._step_count = int(counters["schedule_step_count"])
