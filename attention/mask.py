"""Which keys each query may see: the one mask description every attention kernel reads.

A ``MaskSpec`` describes visibility by rules on GLOBAL sequence positions (SPECS.md, preamble),
never by a materialised ``T x T`` matrix, so the same spec serves a single device, a tile of a
blockwise kernel and a (query shard, key shard) pair of ring attention. Query ``i`` sees key
``j`` iff every active rule holds:

- ``causal``:        ``k_pos[j] <= q_pos[i]``
- document ids:      ``q_doc[b, i] == k_doc[b, j]`` (packed sequences)
- ``window``:        ``q_pos[i] - k_pos[j] < window`` (Hugging Face Mistral semantics)
- ``block_sparse``:  ``pattern.visible(q_pos[i] // block, k_pos[j] // block)``

Kernels ask two cheap questions: ``classify_tiles`` (is a tile pair EMPTY, FULL or PARTIAL,
from per-tile min/max alone) so they skip hidden tiles and drop the mask on fully visible ones,
and ``dense_mask`` for the few PARTIAL tiles (and for the float64 reference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from longctx.errors import LongctxError


class TileClass(IntEnum):
    """Visibility of a (query tile, key tile) pair: no pair visible, some, or all."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


@dataclass(frozen=True)
class BlockSparsePattern:
    """A static pattern over position blocks of ``block_size`` tokens.

    ``rule(qb, kb)`` receives broadcastable int64 tensors of query and key block indices and
    returns a bool tensor of their broadcast shape. It must use only elementwise tensor ops
    (comparisons, ``&``, ``|``, arithmetic): the flex backend traces it under ``vmap``.
    """

    block_size: int
    rule: Callable[[Tensor, Tensor], Tensor]

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise LongctxError(
                f"BlockSparsePattern.block_size must be >= 1, got {self.block_size}; "
                "pass the number of tokens per block"
            )

    def visible(self, qb: Tensor, kb: Tensor) -> Tensor:
        """Bool visibility of query block ``qb`` to key block ``kb`` (broadcast shapes)."""
        return self.rule(qb, kb)


@dataclass(frozen=True)
class _TileStats:
    """Per-tile summaries of one side (queries or keys); ``n`` tiles."""

    pos_min: Tensor  # [n] int64
    pos_max: Tensor  # [n] int64
    contiguous: Tensor  # [n] bool: positions are start, start+1, ... inside the tile
    length: Tensor  # [n] int64
    doc_min: Tensor | None  # [B, n]
    doc_max: Tensor | None  # [B, n]


def _tile_reduce(x: Tensor, tile: int, reduce: str) -> Tensor:
    """Min or max over the last dim of ``x`` ([..., T], T >= 1) per tile -> [..., ceil(T/tile)].

    The last tile is padded by repeating the final entry, which changes neither min nor max.
    """
    pad = (-x.shape[-1]) % tile
    padded = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    tiles = padded.unflatten(-1, (-1, tile))
    return tiles.amin(-1) if reduce == "min" else tiles.amax(-1)


def _tile_stats(pos: Tensor, docs: Tensor | None, tile: int) -> _TileStats:
    total = pos.shape[0]
    starts = torch.arange(0, total, tile, device=pos.device)
    length = (total - starts).clamp(max=tile)
    # A break is a step other than +1; a tile is contiguous iff no break lies inside it.
    steps_ok = torch.ones_like(pos, dtype=torch.bool)
    steps_ok[1:] = pos[1:] - pos[:-1] == 1
    steps_ok[starts] = True  # the step into a tile's first token does not count
    contiguous = _tile_reduce(steps_ok.long(), tile, "min").bool()
    doc_min = doc_max = None
    if docs is not None:
        docs = docs.long()
        doc_min = _tile_reduce(docs, tile, "min")
        doc_max = _tile_reduce(docs, tile, "max")
    return _TileStats(
        pos_min=_tile_reduce(pos, tile, "min"),
        pos_max=_tile_reduce(pos, tile, "max"),
        contiguous=contiguous,
        length=length,
        doc_min=doc_min,
        doc_max=doc_max,
    )


def _combine(full: Tensor, empty: Tensor, classes: Tensor) -> Tensor:
    """Fold one rule's FULL/EMPTY verdicts ([nq, nk] bool) into the running classes."""
    classes = torch.where(empty, torch.full_like(classes, TileClass.EMPTY), classes)
    partial = ~full & (classes == TileClass.FULL)
    return torch.where(partial, torch.full_like(classes, TileClass.PARTIAL), classes)


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Visibility rules of one attention call; see the module docstring.

    Positions default to ``arange``; ``bind(tq, tk)`` fills them in, and every helper below
    works on a bound spec (kernels bind on entry). Doc ids are per batch row, positions are
    shared by the batch.
    """

    causal: bool = True
    q_positions: Tensor | None = None  # [Tq] int64 global sequence index of each query
    k_positions: Tensor | None = None  # [Tk] int64 global sequence index of each key
    q_doc_ids: Tensor | None = None  # [B, Tq]
    k_doc_ids: Tensor | None = None  # [B, Tk]
    window: int | None = None
    block_sparse: BlockSparsePattern | None = None

    # ----------------------------------------------------------------- binding, slicing
    def bind(self, tq: int, tk: int, device: torch.device | str | None = None) -> MaskSpec:
        """A copy with positions filled in (``arange`` where None), shapes checked, and positions
        and doc ids on ``device`` (when given)."""
        q_pos = self._resolved_positions(self.q_positions, tq, "q_positions", device)
        k_pos = self._resolved_positions(self.k_positions, tk, "k_positions", device)
        if (self.q_doc_ids is None) != (self.k_doc_ids is None):
            raise LongctxError(
                "MaskSpec needs both q_doc_ids and k_doc_ids or neither; got only "
                f"{'q_doc_ids' if self.k_doc_ids is None else 'k_doc_ids'}; pass the other side"
            )
        for name, docs, length in (
            ("q_doc_ids", self.q_doc_ids, tq),
            ("k_doc_ids", self.k_doc_ids, tk),
        ):
            if docs is not None and (docs.dim() != 2 or docs.shape[1] != length):
                raise LongctxError(
                    f"MaskSpec.{name} must have shape [B, {length}], got {tuple(docs.shape)}; "
                    "pass one doc id per token of each batch row"
                )
        if self.q_doc_ids is not None and self.q_doc_ids.shape[0] != self.k_doc_ids.shape[0]:
            raise LongctxError(
                f"MaskSpec doc ids disagree on batch size: q {self.q_doc_ids.shape[0]}, "
                f"k {self.k_doc_ids.shape[0]}; pass doc ids of the same batch"
            )
        if self.window is not None and self.window < 1:
            raise LongctxError(
                f"MaskSpec.window must be >= 1 or None, got {self.window}; use None for no window"
            )
        q_docs, k_docs = self.q_doc_ids, self.k_doc_ids
        if q_docs is not None:
            q_docs, k_docs = q_docs.to(device or q_docs.device), k_docs.to(device or k_docs.device)
        return dataclasses.replace(
            self, q_positions=q_pos, k_positions=k_pos, q_doc_ids=q_docs, k_doc_ids=k_docs
        )

    @staticmethod
    def _resolved_positions(
        pos: Tensor | None, length: int, name: str, device: torch.device | str | None
    ) -> Tensor:
        if pos is None:
            return torch.arange(length, device=device)
        if pos.dim() != 1 or pos.shape[0] != length:
            raise LongctxError(
                f"MaskSpec.{name} must have shape [{length}], got {tuple(pos.shape)}; "
                "pass one global sequence index per token"
            )
        return pos.to(device=device, dtype=torch.long)

    @property
    def is_bound(self) -> bool:
        return self.q_positions is not None and self.k_positions is not None

    def _require_bound(self) -> None:
        if not self.is_bound:
            raise LongctxError(
                "MaskSpec has no positions yet; call mask.bind(tq, tk) before slicing or "
                "classifying"
            )

    def slice(self, q_range: slice, k_range: slice) -> MaskSpec:
        """The spec of a (query index range, key index range) tile of a bound spec."""
        self._require_bound()
        return dataclasses.replace(
            self,
            q_positions=self.q_positions[q_range],
            k_positions=self.k_positions[k_range],
            q_doc_ids=None if self.q_doc_ids is None else self.q_doc_ids[:, q_range],
            k_doc_ids=None if self.k_doc_ids is None else self.k_doc_ids[:, k_range],
        )

    # ----------------------------------------------------------------- dense visibility
    def dense_mask(self) -> Tensor:
        """Bool visibility ``[Bm, Tq, Tk]`` of a bound spec (``Bm`` = B with doc ids, else 1).

        Materialises the tile: use only for small tiles and the reference.
        """
        self._require_bound()
        q_pos = self.q_positions[:, None]  # [Tq, 1]
        k_pos = self.k_positions[None, :]  # [1, Tk]
        visible = torch.ones(q_pos.shape[0], k_pos.shape[1], dtype=torch.bool, device=q_pos.device)
        if self.causal:
            visible &= k_pos <= q_pos
        if self.window is not None:
            visible &= q_pos - k_pos < self.window
        if self.block_sparse is not None:
            size = self.block_sparse.block_size
            visible &= self.block_sparse.visible(q_pos // size, k_pos // size)
        if self.q_doc_ids is None:
            return visible[None]  # [1, Tq, Tk]
        same_doc = self.q_doc_ids[:, :, None] == self.k_doc_ids[:, None, :]  # [B, Tq, Tk]
        return visible[None] & same_doc

    # ----------------------------------------------------------------- tile classification
    def classify(self, q_range: slice | None = None, k_range: slice | None = None) -> TileClass:
        """Class of one (query range, key range) pair of a bound spec (whole sides by default).

        Ring attention calls this per visiting K,V shard to skip or unmask it.
        """
        self._require_bound()
        tile = self.slice(q_range or slice(None), k_range or slice(None))
        tq, tk = tile.q_positions.shape[0], tile.k_positions.shape[0]
        if tq == 0 or tk == 0:
            return TileClass.EMPTY
        classes, _ = tile.classify_tiles(tq, tk)
        return TileClass(int(classes[0, 0]))

    def classify_tiles(self, q_tile: int, k_tile: int) -> tuple[Tensor, Tensor]:
        """Classes of all tile pairs when queries/keys are cut into tiles of the given sizes.

        Returns ``classes`` [nq, nk] int64 (``TileClass`` values) and ``causal_diagonal``
        [nq, nk] bool: the pair is PARTIAL only through causality, both tiles are contiguous
        runs of positions with the same start and length, so a kernel's own ``is_causal``
        (top-left or bottom-right aligned alike) expresses its mask exactly.
        Uses per-tile min/max only; nothing ``Tq x Tk`` is materialised.
        """
        self._require_bound()
        q = _tile_stats(self.q_positions, self.q_doc_ids, q_tile)
        k = _tile_stats(self.k_positions, self.k_doc_ids, k_tile)
        shape = (q.pos_min.shape[0], k.pos_min.shape[0])
        classes = torch.full(shape, int(TileClass.FULL), dtype=torch.long, device=q.pos_min.device)
        q_min, q_max = q.pos_min[:, None], q.pos_max[:, None]
        k_min, k_max = k.pos_min[None, :], k.pos_max[None, :]
        if self.window is not None:
            classes = _combine(q_max - k_min < self.window, q_min - k_max >= self.window, classes)
        if self.block_sparse is not None:
            classes = _combine(*self._block_sparse_verdicts(q, k), classes)
        if q.doc_min is not None:
            q_lo, q_hi = q.doc_min[:, :, None], q.doc_max[:, :, None]  # [B, nq, 1]
            k_lo, k_hi = k.doc_min[:, None, :], k.doc_max[:, None, :]  # [B, 1, nk]
            one_doc = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
            disjoint = (q_hi < k_lo) | (k_hi < q_lo)
            classes = _combine(one_doc.all(0), disjoint.all(0), classes)
        if not self.causal:
            return classes, torch.zeros(shape, dtype=torch.bool, device=classes.device)
        others_full = classes == TileClass.FULL
        causal_full, causal_empty = k_max <= q_min, k_min > q_max
        classes = _combine(causal_full, causal_empty, classes)
        aligned = (
            q.contiguous[:, None]
            & k.contiguous[None, :]
            & (q_min == k_min)
            & (q.length[:, None] == k.length[None, :])
        )
        # PARTIAL only through causality: every other rule said FULL, causality said neither.
        causal_diagonal = aligned & others_full & ~causal_full & ~causal_empty
        return classes, causal_diagonal

    def _block_sparse_verdicts(self, q: _TileStats, k: _TileStats) -> tuple[Tensor, Tensor]:
        """(all visible, none visible) per tile pair from the pattern on the present blocks.

        A tile's block set is over-approximated by the present blocks between its min and max
        block; FULL/EMPTY on a superset is still true of the tile. Counts come from a summed-
        area table of the rule evaluated once on [present q blocks, present k blocks].
        """
        size = self.block_sparse.block_size
        q_blocks = torch.unique(self.q_positions // size)  # sorted
        k_blocks = torch.unique(self.k_positions // size)
        grid = self.block_sparse.visible(q_blocks[:, None], k_blocks[None, :]).long()
        table = torch.nn.functional.pad(grid.cumsum(0).cumsum(1), (1, 0, 1, 0))  # [nqb+1, nkb+1]
        q_lo = torch.searchsorted(q_blocks, q.pos_min // size)[:, None]
        q_hi = torch.searchsorted(q_blocks, q.pos_max // size, right=True)[:, None]
        k_lo = torch.searchsorted(k_blocks, k.pos_min // size)[None, :]
        k_hi = torch.searchsorted(k_blocks, k.pos_max // size, right=True)[None, :]
        count = table[q_hi, k_hi] - table[q_lo, k_hi] - table[q_hi, k_lo] + table[q_lo, k_lo]
        area = (q_hi - q_lo) * (k_hi - k_lo)
        return count == area, count == 0
