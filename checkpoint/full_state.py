"""The training state of a checkpoint in a layout-free, pickle-free form.

A checkpoint keeps the whole training state as full (unsharded) fp32 tensors in safetensors
files, whatever ZeRO stage and parallel layout wrote it:

    model.safetensors       every tensor of ``Transformer.state_dict()`` (parameters as the
                            optimizer's fp32 master values, plus persistent buffers), by name
    optimizer.safetensors   ``exp_avg.NAME`` and ``exp_avg_sq.NAME``: AdamW's two moments of
                            each parameter ``NAME``

and the scalars beside them (AdamW's step count, DeepSpeed's step counters, the LR schedule's
position) go into the manifest. Because nothing in these files depends on how the tensors were
partitioned, a checkpoint written at dp 2 x ring 1 under ZeRO-2 restores into dp 1 x ring 2
under ZeRO-0 (or any other stage and world size) exactly as into its own layout: the values
are copied bit for bit into whatever partitions the new engine holds. safetensors holds raw
tensors only, so loading a checkpoint never unpickles anything (a tampered file cannot run
code).

Two smaller pieces make the rest of a checkpoint layout-free and pickle-free as well: each
rank's RNG state in plain types (``rng_state_to_plain``, loadable with
``torch.load(weights_only=True)``), and the data loader's position translated between
data-parallel layouts (``translate_data_cursor``).

Gathering happens on every rank (ZeRO-1/2 and bf16 reassemble a parameter with an all-reduce
over its fragments, ZeRO-3 with an all-gather), and rank 0 writes the files: it holds the full
fp32 model and both moments in CPU memory while writing (12 bytes per parameter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from longctx.errors import LongctxError

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    """Rank 0's gathered state: decoder tensors by ``state_dict`` name, AdamW moments by
    parameter name, and the scalars that go into the manifest."""

    model: dict[str, Tensor]
    moments: dict[str, dict[str, Tensor]]  # moment -> parameter name -> tensor
    counters: dict[str, int]


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


def _decoder(engine: DeepSpeedEngine) -> torch.nn.Module:
    return engine.module.model


def base_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch AdamW that holds the moments: the client optimizer itself (ZeRO-0 fp32), or
    the one DeepSpeed's ZeRO / bf16 wrapper drives over its flat fp32 partitions."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _is_managed(param: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps this parameter's fp32 master value elsewhere (ZeRO-3's
    partitions, or ZeRO-1/2 and bf16 flat partitions; a rank whose partition holds none of it
    has ``_hp_mapping = None`` and still takes part in the gather); else the parameter is its
    own master."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


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


def capture_full_state(engine: DeepSpeedEngine) -> FullState | None:
    """Gather the full fp32 parameters and AdamW moments; rank 0 gets them, other ranks None.

    Collective: every rank must call it (the same parameters in the same order).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    has_moments = bool(base_optimizer(engine).state)
    if has_moments:
        _link_moment_fragments(engine)
    full: dict[int, Tensor] = {}
    moments: dict[str, dict[str, Tensor]] = {key: {} for key in MOMENTS}
    for name, param in unique_parameters(_decoder(engine)):
        if _is_managed(param):
            value = safe_get_full_fp32_param(param)
            for key in MOMENTS:
                moment = safe_get_full_optimizer_state(param, key) if has_moments else None
                moments[key][name] = torch.zeros_like(value) if moment is None else moment
        else:
            value = param.detach()
            state = base_optimizer(engine).state.get(param, {})
            for key in MOMENTS:
                moments[key][name] = state[key] if key in state else torch.zeros_like(value)
        full[id(param)] = value
    if rank != 0:
        return None
    model = {}
    saved = saved_names(_decoder(engine))
    for name, tensor in _decoder(engine).state_dict(keep_vars=True).items():
        if name not in saved:
            continue
        value = full.get(id(tensor), tensor)
        model[name] = value.detach().float().cpu().clone().contiguous()
    cpu_moments = {
        key: {n: t.detach().float().cpu().clone().contiguous() for n, t in values.items()}
        for key, values in moments.items()
    }
    schedule = engine.lr_scheduler
    counters = {
        "optimizer_step": optimizer_step_count(engine),
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "schedule_last_epoch": int(schedule.last_epoch),
        "schedule_step_count": int(schedule._step_count),
    }
    return FullState(model, cpu_moments, counters)


def write_full_state(directory: Path, state: FullState) -> dict[str, int]:
    """Write ``model.safetensors`` and ``optimizer.safetensors`` into ``directory`` (rank 0);
    returns the counters for the manifest."""
    save_file(state.model, str(directory / MODEL_FILE))
    flat = {
        f"{key}.{name}": t for key, values in state.moments.items() for name, t in values.items()
    }
    save_file(flat, str(directory / OPTIMIZER_FILE))
    return state.counters


def read_model_tensors(directory: Path) -> dict[str, Tensor]:
    """The decoder's ``state_dict`` from a checkpoint's ``model.safetensors`` (no unpickling)."""
    return load_file(str(directory / MODEL_FILE))


def _master_partitions(engine: DeepSpeedEngine) -> list[Tensor]:
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


def _link_moment_fragments(engine: DeepSpeedEngine) -> None:
    """(Re)point each parameter's fragment view at the current moment tensors (ZeRO-1/2 and
    bf16). DeepSpeed links them once, right after the first parameter group's first step, so
    the fragments of later groups stay empty; and restored moments are new tensors."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _fresh_adam_state(like: Tensor, step: int) -> dict[str, Tensor]:
    """An AdamW state entry as torch creates it at the first step (step count, two moments)."""
    return {
        "step": torch.tensor(float(step), dtype=torch.float32),
        "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(like, memory_format=torch.preserve_format),
    }


def restore_full_state(
    engine: DeepSpeedEngine, directory: Path, counters: dict[str, Any], where: Path
) -> None:
    """Copy a checkpoint's full state into ``engine``, whatever its ZeRO stage and layout.

    Collective: every rank reads the files and keeps its own partition of each tensor. The
    moments' step count, DeepSpeed's counters and the LR schedule's position come from
    ``counters`` (the manifest). ``where`` names the checkpoint in error messages.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    model = read_model_tensors(directory)
    flat = load_file(str(directory / OPTIMIZER_FILE))
    decoder = _decoder(engine)
    expected = saved_names(decoder)
    if set(model) != expected:
        differing = sorted(set(model) ^ expected)
        raise LongctxError(
            f"checkpoint {where} holds tensors {len(model)} named differently from this model "
            f"({len(differing)} differ, e.g. {differing[0]}); resume with the recipe the "
            "checkpoint was trained with"
        )
    step = int(counters["optimizer_step"])
    optimizer = base_optimizer(engine)
    if step > 0:
        for hp in _master_partitions(engine):
            optimizer.state[hp] = _fresh_adam_state(hp, step)
        _link_moment_fragments(engine)
    for name, param in unique_parameters(decoder):
        value = model[name].to(param.device)
        if _is_managed(param):
            safe_set_full_fp32_param(param, value)
            if step > 0:
                for key in MOMENTS:
                    safe_set_full_optimizer_state(param, flat[f"{key}.{name}"], key)
        else:
            with torch.no_grad():
                param.copy_(value)
            if step > 0:
                for key in MOMENTS:
                    optimizer.state[param][key].copy_(flat[f"{key}.{name}"])
    _copy_masters_to_model(engine, decoder)
    with torch.no_grad():
        for name, buffer in decoder.named_buffers():
            if name in model:
                buffer.copy_(model[name])
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])
    schedule = engine.lr_scheduler
    schedule.last_epoch = int(counters["schedule_last_epoch"])
    schedule._step_count = int(counters["schedule_step_count"])


def _copy_masters_to_model(engine: DeepSpeedEngine, decoder: torch.nn.Module) -> None:
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
