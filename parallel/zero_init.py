"""A ZeRO-3 model whose parameters are only ever initialised partition by partition: from a
Hugging Face checkpoint, or from scratch with the single-process model's values.

``build_partitioned`` builds the ``Transformer`` under ``deepspeed.zero.Init``: every module's
parameters are partitioned over the ranks as soon as the module is constructed, so at most one
module's freshly initialised parameters exist in full at a time. ZeRO-3 keeps rank ``r``'s
partition as the flat elements ``[r x n, (r + 1) x n)`` of the parameter (``n = ceil(numel /
W)``, the last partition zero-padded); ``local_partition`` names that range and its storage, and
the fillers write it:

- ``build_partitioned_hf`` reads it straight from the safetensors shards:
  ``safe_open(...).get_slice(name)[first:last]`` reads only the rows ``[first, last)`` of a
  ``[R, C...]`` tensor that cover it. A rank therefore reads its partition plus at most two
  partial rows per tensor from disk and never holds a full parameter (the whole model never
  exists on any rank). Parameters the checkpoint lacks (new position-encoding or variant tables,
  ``hf_io.new_parameter_names``) are gathered one module at a time and set by the module's
  ``init_new_parameters()``, exactly as ``load_hf`` does.
- ``build_partitioned_scratch`` computes each parameter's initial value one tensor at a time
  (``Transformer.initial_values``: a generator per parameter name) and keeps its partition, so
  the partitions hold exactly the single-process model's values, for any number of ranks.
- ``checkpoint.sharded_state.fill_partitions`` reads them from a longctx checkpoint's shards
  (a new stage starting from the previous stage's weights).

The result is what ``deepspeed.initialize`` expects from a model built under ``zero.Init``; the
optimizer's fp32 master partitions are made from these partitions when the engine starts.
Parameters added afterwards (peft's LoRA matrices on a partitioned base) are partitioned by
``partition_new_parameters``; ``gathered_for_update`` gathers one layer to change it in full
(merging an adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from longctx.attention.config import AttentionConfig
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.model.hf_io import (
    check_tensor_shape,
    checked_weight_files,
    hf_tensor_name,
    modules_with_new_parameters,
)
from longctx.model.transformer import Transformer
from longctx.parallel.accelerator import import_deepspeed
from longctx.positional.config import PositionalConfig
from longctx.positional.rope import RotaryEmbedding


@dataclass(frozen=True)
class PartitionedLoad:
    """What one rank did while loading: ``bytes_read`` from the checkpoint files (its
    partitions plus partial rows), ``partition_bytes`` of parameter storage it holds, and
    ``largest_read_bytes``, the largest single read (bounded by one partition plus two rows)."""

    bytes_read: int
    partition_bytes: int
    largest_read_bytes: int


def partition_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, count)`` of the flat elements of a ``numel``-element parameter that ZeRO-3
    partition ``rank`` of ``world`` holds (``count`` may be 0 for the padded tail)."""
    size = math.ceil(numel / world)
    start = min(size * rank, numel)
    return start, min(size, numel - start)


def read_flat_range(handle: Any, name: str, start: int, count: int) -> tuple[Tensor, int]:
    """Elements ``[start, start + count)`` of tensor ``name`` flattened (1-D), reading only the
    rows of its first dimension that hold them from the open safetensors file ``handle``;
    returns them and the bytes of the rows read. (safetensors maps the file: the returned
    tensor's storage may span the whole tensor's bytes, but only the rows read are touched.)"""
    view = handle.get_slice(name)
    shape = view.get_shape()
    if not shape:  # a scalar
        scalar = handle.get_tensor(name).reshape(-1)
        return scalar[start : start + count], scalar.element_size()
    row = math.prod(shape[1:])
    first, last = start // row, (start + count - 1) // row + 1
    rows = view[first:last].reshape(-1)  # [(last - first) x row]
    offset = start - first * row
    return rows[offset : offset + count], rows.numel() * rows.element_size()


def build_partitioned(
    config: ModelConfig,
    positional: PositionalConfig | None,
    attention: AttentionConfig | None,
    ds_config: dict[str, Any],
) -> Transformer:
    """The decoder of ``config`` built under ``deepspeed.zero.Init`` over the default process
    group (``torch.distributed`` must be initialised; every rank calls this): its parameters
    are partitioned, their values not yet set (a filler writes ``local_partition``).
    ``ds_config`` is the run's DeepSpeed config (its ``bf16`` section sets the partitions'
    dtype)."""
    deepspeed = import_deepspeed()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(config, positional, attention)
    if model.rotary is not None:  # float32 tables built outside zero.Init's dtype cast
        model.rotary = RotaryEmbedding.from_config(config)
    return model


def local_partition(param: nn.Parameter) -> tuple[int, Tensor]:
    """``(start, values)``: this rank's ZeRO-3 partition of ``param`` as the flat elements
    ``[start, start + values.numel())`` of the full parameter, ``values`` a writable 1-D view
    of ``param.ds_tensor`` without its zero padding (empty for the padded tail)."""
    group = param.ds_process_group
    start, count = partition_range(param.ds_numel, dist.get_rank(group), dist.get_world_size(group))
    return start, param.ds_tensor.narrow(0, 0, count)  # [count]


def build_partitioned_scratch(
    config: ModelConfig,
    positional: PositionalConfig | None,
    attention: AttentionConfig | None,
    ds_config: dict[str, Any],
) -> Transformer:
    """The randomly initialised decoder of ``config`` under ZeRO-3 (every rank calls this, with
    torch's global generator seeded alike), each partition holding the values the
    single-process ``Transformer(config, ...)`` would have after the same seeding: each
    parameter's full initial value (``Transformer.initial_values``) is computed, its partition
    kept and the tensor dropped, so a rank holds its partitions plus one tensor."""
    model = build_partitioned(config, positional, attention, ds_config)
    with torch.no_grad():
        for _, param, initial in model.initial_values():
            start, local = local_partition(param)
            if local.numel() > 0:
                full = initial(tuple(param.ds_shape)).view(-1)  # [numel], one tensor at a time
                local.copy_(full[start : start + local.numel()])
    return model


def build_partitioned_hf(
    directory: str | Path,
    config: ModelConfig,
    positional: PositionalConfig | None,
    attention: AttentionConfig | None,
    ds_config: dict[str, Any],
) -> tuple[Transformer, PartitionedLoad]:
    """The decoder of ``config`` with the Hugging Face checkpoint ``directory``'s weights,
    partitioned under ZeRO-3 (``build_partitioned``; every rank calls this). Names and shapes
    are checked as ``load_hf`` checks them (``LongctxError`` naming the tensor)."""
    deepspeed = import_deepspeed()
    directory = Path(directory)
    model = build_partitioned(config, positional, attention, ds_config)
    for module in modules_with_new_parameters(model):
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
            module.init_new_parameters()
    params = {hf_tensor_name(name): p for name, p in model.named_parameters()}
    files = checked_weight_files(directory, model, config)
    bytes_read = largest = 0
    with torch.no_grad():
        for file in files:
            if file.suffix != ".safetensors":
                raise LongctxError(
                    f"{file} is a pickled weight file; ZeRO-3 loads each rank's partition from "
                    "safetensors only: convert the checkpoint to safetensors"
                )
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    if name not in params:
                        continue  # ignored buffer or a tied lm_head copy
                    read = _load_partition(handle, file, name, params[name])
                    bytes_read += read
                    largest = max(largest, read)
    return model, PartitionedLoad(bytes_read, partition_bytes(model), largest)


def partition_new_parameters(model: nn.Module) -> None:
    """Partition, in place, the parameters added to a ZeRO-3 ``model`` after it was built under
    ``zero.Init`` (peft's LoRA matrices ``A [r, in]``, ``B [out, r]``, created whole and alike on
    every rank): rank 0's values are broadcast and each rank keeps its partition, as
    ``deepspeed.initialize`` would do at engine start. From here on every parameter is
    partitioned, so the partition fillers (``fill_partitions``) and ``partition_bytes`` see the
    whole model. Every rank calls this."""
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    params = list(model.parameters())
    built = next(p for p in params if is_zero_param(p))
    new = [p for p in params if not is_zero_param(p)]
    if new:
        built.convert_to_zero_parameters(param_list=new)


def gathered_for_update(params: list[nn.Parameter]) -> Any:
    """A context in which every rank holds ``params`` (ZeRO-3 partitioned) whole; on exit rank
    0's values are partitioned again (every rank computes the same update, e.g. merging a LoRA
    adapter into its base weight, so rank 0's are everyone's). One layer's parameters at a
    time keep the peak at the partitions plus that layer."""
    return import_deepspeed().zero.GatheredParameters(params, modifier_rank=0)


def partition_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds of a ZeRO-3 ``model`` (its partitions)."""
    return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())


def _load_partition(handle: Any, file: Path, name: str, param: nn.Parameter) -> int:
    """Copy this rank's partition of tensor ``name`` into ``param.ds_tensor``; returns the
    bytes read from disk."""
    check_tensor_shape(file, name, tuple(handle.get_slice(name).get_shape()), tuple(param.ds_shape))
    start, local = local_partition(param)  # [count], this rank's flat partition
    if local.numel() == 0:
        return 0
    values, bytes_read = read_flat_range(handle, name, start, local.numel())
    local.copy_(values)
    return bytes_read
