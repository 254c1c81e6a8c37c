"""A ZeRO-3 model initialised from a Hugging Face checkpoint, each rank holding only its share.

``build_partitioned_hf`` builds the ``Transformer`` under ``deepspeed.zero.Init``: every module's
parameters are partitioned over the ranks as soon as the module is constructed, so at most one
module's freshly initialised parameters exist in full at a time. Then every parameter's local
partition is filled straight from the safetensors shards: ZeRO-3 keeps rank ``r``'s partition as
the flat elements ``[r x n, (r + 1) x n)`` of the parameter (``n = ceil(numel / W)``, the last
partition zero-padded), and ``safe_open(...).get_slice(name)[first:last]`` reads only the rows
``[first, last)`` of a ``[R, C...]`` tensor that cover them. A rank therefore reads its partition
plus at most two partial rows per tensor from disk and never holds a full parameter (the whole
model never exists on any rank). Parameters the checkpoint lacks (new position-encoding or
variant tables, ``hf_io.new_parameter_names``) are gathered one module at a time and set by the
module's ``init_new_parameters()``, exactly as ``load_hf`` does.

The result is what ``deepspeed.initialize`` expects from a model built under ``zero.Init``; the
optimizer's fp32 master partitions are made from these partitions when the engine starts.
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


def build_partitioned_hf(
    directory: str | Path,
    config: ModelConfig,
    positional: PositionalConfig | None,
    attention: AttentionConfig | None,
    ds_config: dict[str, Any],
) -> tuple[Transformer, PartitionedLoad]:
    """The decoder of ``config`` with the Hugging Face checkpoint ``directory``'s weights,
    partitioned under ZeRO-3 over the default process group (``torch.distributed`` must be
    initialised; every rank calls this). ``ds_config`` is the run's DeepSpeed config (its
    ``bf16`` section sets the partitions' dtype). Names and shapes are checked as ``load_hf``
    checks them (``LongctxError`` naming the tensor)."""
    deepspeed = import_deepspeed()
    directory = Path(directory)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(config, positional, attention)
    if model.rotary is not None:  # float32 tables built outside zero.Init's dtype cast
        model.rotary = RotaryEmbedding.from_config(config)
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
    partition_bytes = sum(
        p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters()
    )
    return model, PartitionedLoad(bytes_read, partition_bytes, largest)


def _load_partition(handle: Any, file: Path, name: str, param: nn.Parameter) -> int:
    """Copy this rank's partition of tensor ``name`` into ``param.ds_tensor``; returns the
    bytes read from disk."""
    check_tensor_shape(file, name, tuple(handle.get_slice(name).get_shape()), tuple(param.ds_shape))
    group = param.ds_process_group
    start, count = partition_range(param.ds_numel, dist.get_rank(group), dist.get_world_size(group))
    local = param.ds_tensor  # [ceil(numel / W)], this rank's flat partition
    if count == 0:
        return 0
    values, bytes_read = read_flat_range(handle, name, start, count)
    local.narrow(0, 0, count).copy_(values)
    return bytes_read
