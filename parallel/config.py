"""How the ranks of a run are laid out: data parallel x Ulysses x ring.

The world is ``dp x sp`` with ``sp = ulysses x ring`` (DESIGN section 5). Sequence parallelism
splits one sequence over the ``sp`` ranks of a group; Ulysses does it with an all-to-all over
heads and ring attention by rotating key/value blocks. DeepSpeed sees every rank as data parallel,
so ZeRO shards over the whole world.

``dp`` may be ``"auto"``: the number of data-parallel groups then follows from the number of
workers the launcher starts (``workers / sp``), so one recipe runs unchanged on 2 or 64 ranks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from longctx.errors import LongctxError

# Cores whose softmax merges block by block, so parallel.ring runs as ring attention; every other
# variant or score-based position encoding runs under the ring group as a key all-gather.
RING_MERGE_VARIANTS = frozenset({"dense", "power"})
RING_MERGE_POSITIONALS = frozenset({"rope", "none"})


def ring_runs_as(variant: str, positional_kind: str) -> str:
    """What ``parallel.ring`` does for ``attention.variant`` and ``positional.kind``: ``ring
    attention`` (K,V blocks passed around the ring, softmax merged block by block) or ``key
    all-gather, not ring attention`` (every rank gathers all keys for its local queries)."""
    if variant in RING_MERGE_VARIANTS and positional_kind in RING_MERGE_POSITIONALS:
        return "ring attention"
    return "key all-gather, not ring attention"


class ParallelConfig(BaseModel):
    """Degrees of the process mesh. Every degree is a positive integer; ``dp`` may be ``auto``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dp: PositiveInt | Literal["auto"] = Field(
        "auto", description="data-parallel groups; 'auto' = workers / (ulysses x ring)"
    )
    ulysses: int = Field(1, ge=1, description="Ulysses (all-to-all over heads) degree")
    ring: int = Field(
        1,
        ge=1,
        description="ranks that split each sequence in zigzag order (2*ring chunks): ring "
        "attention for attention.variant dense / power under positional.kind rope / none; for "
        "every other core (NSA, MoSA, landmark; CoPE, BAM, TAPA) a key all-gather (local "
        "queries against every rank's keys), not ring attention",
    )

    @property
    def sp(self) -> int:
        """Ranks that share one sequence (the sequence-parallel group size)."""
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        """Total ranks, ``dp x sp``; needs a concrete ``dp`` (see ``resolve``)."""
        if self.dp == "auto":
            raise LongctxError(
                "parallel.dp is 'auto', so the world size is not known yet; "
                "resolve it with the worker count (--workers N) or set parallel.dp to a number"
            )
        return self.dp * self.sp

    def resolve(self, workers: int | None, *, ranks: str = "--workers") -> ParallelConfig:
        """The same layout with a concrete ``dp`` for ``workers`` ranks: the one place the
        ``dp x ulysses x ring = world`` arithmetic is checked (``mesh.validate_mesh`` asks here).

        ``workers=None`` means the launcher was not told a count: ``dp: auto`` becomes 1 (one
        sequence-parallel group) and a concrete ``dp`` is kept. With a count, it must be a
        multiple of ``sp`` and, when ``dp`` is concrete, equal ``dp x sp``. ``ranks`` names the
        count in the one-line error (``--workers`` on the command line, ``world size`` for a
        process group that exists).
        """
        if workers is None:
            return self if self.dp != "auto" else self.model_copy(update={"dp": 1})
        count = f"{ranks} {workers}"
        if workers < 1:
            raise LongctxError(f"{count} must be at least 1; pass a positive count")
        if workers % self.sp:
            raise LongctxError(
                f"{count} is not a multiple of parallel.ulysses x ring = "
                f"{self.ulysses} x {self.ring} = {self.sp}; use a multiple of {self.sp}"
            )
        if self.dp == "auto":
            return self.model_copy(update={"dp": workers // self.sp})
        if self.dp * self.sp != workers:
            raise LongctxError(
                f"{count} does not match parallel.dp x ulysses x ring = "
                f"{self.dp} x {self.ulysses} x {self.ring} = {self.dp * self.sp}; use "
                f"{self.dp * self.sp} ranks (--workers {self.dp * self.sp}) or set "
                "parallel.dp: auto"
            )
        return self

    def describe(self) -> str:
        """``dp x ulysses x ring = world`` for logs and the dry-run plan."""
        return f"dp {self.dp} x ulysses {self.ulysses} x ring {self.ring} = {self.world} ranks"
