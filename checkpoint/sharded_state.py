"""The training state of a checkpoint as per-rank shards: each rank writes and reads only the
fragments of the fp32 weights and AdamW moments it owns, and any layout can read them back.

Files inside a checkpoint directory::

    state_index.json                  where every fragment of every tensor lives (JSON)
    state_rRRRRR_pPPPPP.safetensors   rank RRRRR's fragments, in parts of about PART_BYTES:
                                      ``param.NAME``, ``exp_avg.NAME``, ``exp_avg_sq.NAME``
                                      (1-D fp32 slices ``[start, start + length)`` of the
                                      flattened tensor ``NAME``), and in rank 0's parts the
                                      whole persistent buffers (``param.NAME`` as well)

``state_index.json`` holds ``checkpoint_id`` (random, also in every part's safetensors
metadata, so a part copied from another checkpoint is recognised), ``world_size``, the part
files of each rank, whether moments were saved, and for each ``state_dict`` name of the decoder
(in order) its kind (``param``, ``buffer``, or ``alias`` of a tied parameter), its global shape
and its fragments ``[file, start, length]`` sorted by ``start`` and covering the tensor.

What a rank owns is what its engine already holds (``local_pieces``): under ZeRO-3 its
partition of each parameter (``deepspeed.utils.safe_get_local_fp32_param`` and
``safe_get_local_optimizer_state``, DeepSpeed's flat partitions ``partition_numel x rank``);
under ZeRO-1/2 and the bf16 optimizer the fragment of each parameter inside its flat fp32
partition (``param._hp_mapping``: ``lp_fragment_address`` and the fp32 views); under ZeRO-0
fp32, where every rank holds every parameter, writing is shared by splitting each flat range
evenly over the ranks, and reading takes the whole parameter (which that rank holds anyway).
Restoring computes the ranges the *new* layout needs and reads only the overlapping slices
(``safe_open(...).get_slice``), so any world size, ZeRO stage and sequence-parallel layout
restores from any other. Per rank, a save holds one part (about ``PART_BYTES``, or one
fragment when larger) beyond the training state, and a restore one fragment slice: never the
full model.

Everything is safetensors or JSON: loading never unpickles. ``iter_model_tensors`` yields the
full fp32 tensors one at a time (evaluation, export); ``fill_partitions`` reads only a ZeRO-3
rank's partitions into a model built under ``zero.Init`` (a new stage's weights).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from longctx.checkpoint.full_state import (
    MOMENTS,
    base_optimizer,
    copy_masters_to_model,
    decoder_of,
    fresh_adam_state,
    link_moment_fragments,
    master_partitions,
    saved_names,
    unique_parameters,
)
from longctx.errors import LongctxError
from longctx.parallel.zero_init import PartitionedLoad, local_partition, partition_bytes

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

INDEX_FILE = "state_index.json"
STATE_FORMAT = "longctx-sharded-1"
PART_BYTES = 256 << 20  # a part is written once its fragments reach this size
_PART_PATTERN = re.compile(r"^state_r(\d{5})_p(\d{5})\.safetensors$")


def part_file(rank: int, part: int) -> str:
    """Name of rank ``rank``'s ``part``-th shard file."""
    return f"state_r{rank:05d}_p{part:05d}.safetensors"


def is_part_file(name: str) -> bool:
    """Whether ``name`` (relative to the checkpoint) is a shard file."""
    return _PART_PATTERN.match(name) is not None


@dataclass
class Piece:
    """The flat range ``[start, start + length)`` of one parameter that this rank holds, with
    writable 1-D views of the live fp32 storage: ``param`` and, once AdamW has state, each
    moment (``exp_avg``, ``exp_avg_sq``), all ``[length]``."""

    start: int
    length: int
    views: dict[str, Tensor] = field(default_factory=dict)


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_shape(param: torch.nn.Parameter) -> list[int]:
    """The parameter's full shape (ZeRO-3 keeps it in ``ds_shape``; the tensor is empty)."""
    return list(getattr(param, "ds_shape", param.shape))


def local_pieces(engine: DeepSpeedEngine, param: torch.nn.Parameter, writing: bool) -> list[Piece]:
    """The range of ``param`` this rank holds (``writing=False``: needs filled on restore), as
    views of the engine's fp32 masters and moments. Empty when this rank holds none of it."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    optimizer = base_optimizer(engine)
    has_moments = bool(optimizer.state)
    if hasattr(param, "ds_id"):  # ZeRO-3: partition_numel x partition rank, padded at the end
        group = getattr(param, "ds_process_group", None)
        size = param.partition_numel()
        start = dist.get_rank(group=group) * size
        length = min(size, max(0, param.ds_numel - start))
        if length == 0:
            return []
        views = {"param": safe_get_local_fp32_param(param).view(-1)[:length]}
        if has_moments:
            for key in MOMENTS:
                views[key] = safe_get_local_optimizer_state(param, key).view(-1)[:length]
        return [Piece(start, length, views)]
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and bf16: a fragment of a flat partition
        mapping = param._hp_mapping
        if mapping is None:
            return []
        address = mapping.lp_fragment_address
        views = {"param": mapping.get_hp_fragment()}
        if has_moments:
            for key in MOMENTS:
                views[key] = mapping.get_optim_state_fragment(key)
        return [Piece(address.start, address.numel, views)]
    # ZeRO-0 fp32: the parameter is its own master on every rank
    numel = param.numel()
    start, end = 0, numel
    if writing:
        rank, world = _rank_world()
        start, end = numel * rank // world, numel * (rank + 1) // world
        if start == end:
            return []
    views = {"param": param.detach().view(-1)[start:end]}
    state = optimizer.state.get(param, {})
    for key in MOMENTS:
        if key in state:
            views[key] = state[key].view(-1)[start:end]
    return [Piece(start, end - start, views)]


class _PartWriter:
    """Collects this rank's CPU copies of fragments and writes them as safetensors parts of
    about ``PART_BYTES`` each, so at most one part is held in memory beyond the live state."""

    def __init__(self, directory: Path, rank: int, world: int, checkpoint_id: str):
        self.directory, self.rank = directory, rank
        self.metadata = {
            "format": STATE_FORMAT,
            "checkpoint_id": checkpoint_id,
            "rank": str(rank),
            "world_size": str(world),
        }
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []

    @property
    def current(self) -> str:
        return part_file(self.rank, len(self.files))

    def add(self, tensors: dict[str, Tensor]) -> str:
        """Queue ``tensors`` (one fragment's, kept in one part); returns their part's name."""
        name = self.current
        self.pending.update(tensors)
        self.pending_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending_bytes >= PART_BYTES:
            self.flush()
        return name

    def flush(self) -> None:
        if not self.pending and self.files:
            return
        save_file(self.pending, str(self.directory / self.current), metadata=self.metadata)
        self.files.append(self.current)
        self.pending, self.pending_bytes = {}, 0


def _cpu_copy(view: Tensor) -> Tensor:
    return view.detach().to("cpu", copy=True).contiguous()


def _first_non_finite(name: str, tensors: dict[str, Tensor]) -> str | None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = key.split(".", 1)[0]
            return name if kind == "param" else f"{kind} of {name}"
    return None


def new_checkpoint_id() -> str:
    """A random id shared by every rank (rank 0 draws it): marks the files of one save."""
    holder = [uuid.uuid4().hex]
    if dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def write_shards(
    engine: DeepSpeedEngine, directory: Path, checkpoint_id: str
) -> tuple[list[str], str | None]:
    """Write this rank's fragments into ``directory`` and, on rank 0, ``state_index.json``.

    Collective. Returns this rank's file names (parts, and the index on rank 0) and the name of
    the first weight or moment holding NaN or inf on any rank (None when all are finite: the
    caller refuses to publish otherwise).
    """
    rank, world = _rank_world()
    decoder = decoder_of(engine)
    has_moments = bool(base_optimizer(engine).state)
    if has_moments:
        link_moment_fragments(engine)
    writer = _PartWriter(directory, rank, world, checkpoint_id)
    placed: dict[str, tuple[str, int, int]] = {}
    bad: str | None = None
    for name, param in unique_parameters(decoder):
        for piece in local_pieces(engine, param, writing=True):
            copies = {f"{key}.{name}": _cpu_copy(view) for key, view in piece.views.items()}
            bad = bad or _first_non_finite(name, copies)
            placed[name] = (writer.add(copies), piece.start, piece.length)
    entries = state_entries(decoder)
    if rank == 0:
        for name, (kind, tensor) in entries.items():
            if kind == "buffer":
                copies = {f"param.{name}": _cpu_copy(tensor)}
                bad = bad or _first_non_finite(name, copies)
                placed[name] = (writer.add(copies), 0, tensor.numel())
    writer.flush()
    gathered: list[Any] = [(placed, writer.files, bad)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (placed, writer.files, bad))
    first_bad = next((b for _, _, b in gathered if b is not None), None)
    files = list(writer.files)
    if rank == 0 and first_bad is None:
        index = _build_index(entries, gathered, checkpoint_id, world, has_moments)
        (directory / INDEX_FILE).write_text(json.dumps(index) + "\n")
        files.append(INDEX_FILE)
    return files, first_bad


def state_entries(decoder: torch.nn.Module) -> dict[str, tuple[str, Any]]:
    """Each ``state_dict`` name of the decoder, in order, as ``(kind, what)``: ``("param",
    parameter)``, ``("alias", first name)`` for a tied parameter's second name, ``("buffer",
    tensor)``. Only what ``saved_names`` keeps: with adapters, the trained parameters (the frozen
    base is named by the manifest's ``adapter_base``, not copied)."""
    first = {id(p): name for name, p in unique_parameters(decoder)}
    saved = saved_names(decoder)
    entries: dict[str, tuple[str, Any]] = {}
    for name, tensor in decoder.state_dict(keep_vars=True).items():
        if name not in saved:
            continue
        owner = first.get(id(tensor))
        if owner is None:
            entries[name] = ("buffer", tensor)
        elif owner == name:
            entries[name] = ("param", tensor)
        else:
            entries[name] = ("alias", owner)
    return entries


def _build_index(
    entries: dict[str, tuple[str, Any]],
    gathered: list[Any],
    checkpoint_id: str,
    world: int,
    has_moments: bool,
) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for name, (kind, what) in entries.items():
        if kind == "alias":
            tensors[name] = {"kind": kind, "of": what}
            continue
        fragments = sorted(
            [list(placed[name]) for placed, _, _ in gathered if name in placed],
            key=lambda fragment: fragment[1],
        )
        shape = global_shape(what) if kind == "param" else list(what.shape)
        tensors[name] = {"kind": kind, "shape": shape, "fragments": fragments}
    return {
        "format": STATE_FORMAT,
        "checkpoint_id": checkpoint_id,
        "world_size": world,
        "moments": has_moments,
        "files": [files for _, files, _ in gathered],
        "tensors": tensors,
    }


# ---------------------------------------------------------------------------------------------
# Reading


def _refuse(directory: Path, problem: str) -> LongctxError:
    return LongctxError(
        f"checkpoint {directory}: {problem}; the checkpoint is damaged or mixed with another "
        "one, resume from another checkpoint"
    )


def read_index(directory: Path) -> dict[str, Any]:
    """``state_index.json`` of a checkpoint, parsed (unverified)."""
    try:
        index = json.loads((directory / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _refuse(directory, f"{INDEX_FILE} is unreadable ({type(error).__name__})") from None
    if not isinstance(index, dict) or index.get("format") != STATE_FORMAT:
        raise _refuse(directory, f"{INDEX_FILE} is not a {STATE_FORMAT} index")
    return index


def check_shards(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Check the shard layout against the index and the manifest before anything is loaded;
    returns the index. Refuses (one line): a world size or shard count that differs between
    index, manifest and directory, a part whose header is unreadable or truncated, a part of
    another checkpoint (its ``checkpoint_id`` or rank differ), and fragments that do not cover
    their tensor exactly. Reads only the JSON and the safetensors headers."""
    index = read_index(directory)
    try:
        _check_layout(directory, manifest, index)
    except LongctxError:  # a ValueError too: the refusals below are already one line
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _refuse(directory, f"{INDEX_FILE} is malformed ({type(error).__name__})") from None
    return index


def _check_layout(directory: Path, manifest: dict[str, Any], index: dict[str, Any]) -> None:
    world = index.get("world_size")
    per_rank = index.get("files")
    if world != manifest["world_size"] or not isinstance(per_rank, list) or len(per_rank) != world:
        raise _refuse(
            directory,
            f"{INDEX_FILE} describes {world} rank(s) with "
            f"{len(per_rank) if isinstance(per_rank, list) else 'no'} shard list(s), the manifest "
            f"says world size {manifest['world_size']}",
        )
    indexed = [name for files in per_rank for name in files]
    listed = sorted(name for name in manifest["files"] if is_part_file(name))
    if sorted(indexed) != listed or any(not files for files in per_rank):
        raise _refuse(
            directory,
            f"the manifest lists {len(listed)} shard file(s), {INDEX_FILE} {len(indexed)} over "
            f"{world} rank(s) (shard count does not match the metadata)",
        )
    for rank, files in enumerate(per_rank):
        for name in files:
            metadata = _part_metadata(directory, name)
            if metadata.get("checkpoint_id") != index["checkpoint_id"]:
                raise _refuse(directory, f"shard {name} belongs to another checkpoint")
            if metadata.get("rank") != str(rank) or metadata.get("world_size") != str(world):
                raise _refuse(directory, f"shard {name} was written by another rank or layout")
    for name, entry in index["tensors"].items():
        if entry.get("kind") != "alias":
            _check_coverage(directory, name, entry, set(indexed))


def _part_metadata(directory: Path, name: str) -> dict[str, str]:
    try:
        with safe_open(str(directory / name), framework="pt") as part:
            return part.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise _refuse(directory, f"shard {name} is truncated or unreadable ({error})") from None


def _check_coverage(directory: Path, name: str, entry: dict[str, Any], files: set[str]) -> None:
    numel = math.prod(entry["shape"])
    position = 0
    for file, start, length in entry["fragments"]:
        if file not in files or start != position or length <= 0:
            break
        position += length
    else:
        if position == numel:
            return
    raise _refuse(
        directory, f"{INDEX_FILE}: the fragments of {name} do not cover its {numel} values"
    )


class _FragmentReader:
    """Reads flat ranges of a checkpoint's tensors from the parts that hold them, opening
    each part once (safetensors maps the file; a slice reads only its bytes)."""

    def __init__(self, directory: Path, index: dict[str, Any]):
        self.directory, self.index = directory, index
        self.handles: dict[str, Any] = {}
        self.bytes_read = 0  # what the slices read from disk, in all
        self.largest_read = 0  # the largest single slice

    def _part(self, file: str) -> Any:
        if file not in self.handles:
            self.handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self.handles[file]

    def read_into(self, key: str, name: str, start: int, out: Tensor) -> None:
        """Fill ``out`` (1-D, ``[length]``) with values ``[start, start + length)`` of ``key``
        (``param`` or a moment) of tensor ``name``."""
        end = start + out.numel()
        for file, first, length in self.index["tensors"][name]["fragments"]:
            low, high = max(start, first), min(end, first + length)
            if low < high:
                piece = self._part(file).get_slice(f"{key}.{name}")[low - first : high - first]
                out[low - start : high - start].copy_(piece)
                read = piece.numel() * piece.element_size()
                self.bytes_read += read
                self.largest_read = max(self.largest_read, read)

    def full(self, name: str, key: str = "param") -> Tensor:
        """Tensor ``name`` (a parameter or buffer, or with ``key`` a moment of a parameter)
        whole, in its saved dtype and shape."""
        entry = self.index["tensors"][name]
        file = entry["fragments"][0][0]
        dtype = self._part(file).get_slice(f"{key}.{name}").get_dtype()
        out = torch.empty(math.prod(entry["shape"]), dtype=_DTYPES.get(dtype, torch.float32))
        self.read_into(key, name, 0, out)
        return out.view(entry["shape"])


_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "BOOL": torch.bool,
}


def iter_model_tensors(
    directory: Path, index: dict[str, Any] | None = None, key: str = "param"
) -> Iterator[tuple[str, Tensor]]:
    """``(state_dict name, full tensor)`` of the decoder, one at a time, from a checkpoint's
    shards: parameters as fp32 masters and buffers (a tied parameter's second name yields it
    again); with ``key`` ``exp_avg`` or ``exp_avg_sq`` that AdamW moment of each parameter
    instead. Each tensor is assembled from its fragments; only one is held at a time."""
    index = index if index is not None else read_index(directory)
    for name, entry in index["tensors"].items():
        reader = _FragmentReader(directory, index)  # per tensor: unmaps the parts read before
        if key == "param":
            yield name, reader.full(entry["of"] if entry["kind"] == "alias" else name)
        elif entry["kind"] == "param" and index["moments"]:
            yield name, reader.full(name, key)


def restore_shards(
    engine: DeepSpeedEngine, directory: Path, index: dict[str, Any], step: int, where: Path
) -> None:
    """Fill ``engine``'s fp32 masters, AdamW moments (when ``step`` > 0) and buffers from a
    checked checkpoint, reading on each rank only the ranges its layout holds. Refuses (one
    line) a checkpoint whose tensor names or shapes differ from this model's."""
    decoder = decoder_of(engine)
    entries = state_entries(decoder)
    check_names_and_shapes(entries, index, where, "resume")
    moments = step > 0 and bool(index.get("moments"))
    optimizer = base_optimizer(engine)
    if moments:
        for hp in master_partitions(engine):
            optimizer.state[hp] = fresh_adam_state(hp, step)
        link_moment_fragments(engine)
    reader = _FragmentReader(directory, index)
    for name, param in unique_parameters(decoder):
        for piece in local_pieces(engine, param, writing=False):
            for key, view in piece.views.items():
                if key == "param" or moments:
                    with torch.no_grad():
                        reader.read_into(key, name, piece.start, view)
    copy_masters_to_model(engine)
    _copy_buffers(reader, entries)


def _copy_buffers(reader: _FragmentReader, entries: dict[str, tuple[str, Any]]) -> None:
    with torch.no_grad():
        for name, (kind, tensor) in entries.items():
            if kind == "buffer":
                tensor.copy_(reader.full(name))


def check_names_and_shapes(
    entries: dict[str, tuple[str, Any]], index: dict[str, Any], where: Path, verb: str
) -> None:
    """Refuse (one line) a checkpoint whose tensor names or global shapes differ from the
    model's ``state_entries``; ``verb`` (``resume``, ``load it``) starts the fix."""
    saved = index["tensors"]
    if set(saved) != set(entries):
        differing = sorted(set(saved) ^ set(entries))
        raise LongctxError(
            f"checkpoint {where} holds {len(saved)} tensors named differently from this model "
            f"({len(differing)} differ, e.g. {differing[0]}); {verb} with the recipe the "
            "checkpoint was trained with"
        )
    for name, (kind, what) in entries.items():
        if kind == "alias":
            continue
        shape = global_shape(what) if kind == "param" else list(what.shape)
        if saved[name].get("shape") != shape:
            raise LongctxError(
                f"checkpoint {where} holds {name} of shape {saved[name].get('shape')}, this "
                f"model's is {shape}; {verb} with the recipe the checkpoint was trained with"
            )


def fill_partitions(
    model: torch.nn.Module, directory: Path, index: dict[str, Any]
) -> PartitionedLoad:
    """Fill a ZeRO-3 ``model`` built under ``zero.Init`` (``parallel.zero_init.build_partitioned``)
    with a checked checkpoint's fp32 weights, each rank reading only the flat range of each
    parameter its partition holds (``local_partition``) from the fragments that overlap it, and
    the (small) buffers whole. Refuses (one line) other tensor names or shapes. Returns what
    was read: at most the rank's partitions in fp32, the largest read one fragment's slice."""
    entries = state_entries(model)
    check_names_and_shapes(entries, index, directory, "load it")
    reader = _FragmentReader(directory, index)
    with torch.no_grad():
        for name, param in unique_parameters(model):
            start, local = local_partition(param)  # [count] of this rank's partition
            if local.numel() > 0:
                reader.read_into("param", name, start, local)
    _copy_buffers(reader, entries)
    return PartitionedLoad(reader.bytes_read, partition_bytes(model), reader.largest_read)
