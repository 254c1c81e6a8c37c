"""What a run will look like before it starts: world layout, batch sizes, parameter count and a
rough memory estimate per rank. Printed by ``longctx train RECIPE --dry-run``; it only reads the
recipe (no Ray, no model, no tensors).

Memory model (bytes per parameter, as in the ZeRO paper's accounting):
  fp32: weights 4, gradients 4, Adam moments 8;
  bf16: weights 2, gradients 2, optimizer 12 (fp32 master weights + two fp32 moments).
ZeRO stage >= 1 shards the optimizer state over all ranks, >= 2 also the gradients, 3 also the
weights (DeepSpeed sees every rank as data parallel, so it shards over the whole world).
Activations: see ``activation_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from longctx.model.config import ModelConfig
from longctx.parallel.config import ParallelConfig
from longctx.trainer.config import Recipe

# Tokens per chunk of the tiled cross-entropy (longctx.parallel.loss default): the largest
# logits block that exists at once is [chunk, vocab] in fp32.
LOSS_CHUNK_TOKENS = 4096
# (weights, gradients, optimizer state) bytes per parameter for each training dtype.
_STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12)}
_ACTIVATION_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at the peak of a training step (rough: ignores communication
    buffers, allocator fragmentation and the attention kernel's own O(T * chunk) workspace)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def activation_bytes(
    model: ModelConfig, tokens: int, dtype: str, activation_checkpointing: bool
) -> int:
    """Activations kept for backward on one rank holding ``tokens`` tokens.

    Per token and layer, autograd keeps the two RMSNorm inputs and outputs (4 d), q and the
    attention output (2 Hq hd), k and v (2 Hkv hd), and the SwiGLU gate, up, silu(gate) and
    product (4 I). With activation checkpointing only each layer's input (d) is kept, plus one
    layer's full set while it is recomputed. On top: the final hidden state (d per token) and
    one fp32 logits chunk of the tiled loss.
    """
    d, hd = model.hidden_size, model.dim_per_head
    per_layer = (
        4 * d
        + 2 * model.num_attention_heads * hd
        + 2 * model.kv_heads * hd
        + 4 * model.intermediate_size
    )
    layers = model.num_hidden_layers
    kept = layers * d + per_layer if activation_checkpointing else layers * per_layer
    element = _ACTIVATION_BYTES[dtype]
    logits_chunk = min(tokens, LOSS_CHUNK_TOKENS) * model.vocab_size * 4
    return tokens * (kept + d) * element + logits_chunk


def estimate_memory(recipe: Recipe, layout: ParallelConfig) -> MemoryEstimate:
    """Per-rank memory of ``recipe`` on ``layout`` (a ParallelConfig with a concrete dp)."""
    trainer = recipe.trainer
    params = recipe.model.num_parameters()
    weight_b, grad_b, optim_b = _STATE_BYTES[trainer.dtype]
    world, stage = layout.world, trainer.zero_stage
    tokens = trainer.micro_batch_size * recipe.data.seq_len // layout.sp
    return MemoryEstimate(
        weights=params * weight_b // (world if stage >= 3 else 1),
        gradients=params * grad_b // (world if stage >= 2 else 1),
        optimizer=params * optim_b // (world if stage >= 1 else 1),
        activations=activation_bytes(
            recipe.model, tokens, trainer.dtype, trainer.activation_checkpointing
        ),
    )


def human_bytes(count: int) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, one decimal."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_count(count: int) -> str:
    """``12_345_678`` -> ``12,345,678 (12.3M)``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count:,} ({count / scale:.1f}{suffix})"
    return f"{count:,}"


def plan_rows(recipe: Recipe, layout: ParallelConfig) -> list[tuple[str, str]]:
    """The dry-run plan as (what, value) rows."""
    trainer, seq_len = recipe.trainer, recipe.data.seq_len
    memory = estimate_memory(recipe, layout)
    per_step = layout.dp * trainer.micro_batch_size * trainer.grad_accum
    return [
        ("world layout", layout.describe()),
        ("tokens per rank per micro-batch", f"{trainer.micro_batch_size} x {seq_len // layout.sp}"),
        ("sequences per optimizer step", f"{per_step} ({per_step * seq_len:,} tokens)"),
        ("parameters", human_count(recipe.model.num_parameters())),
        ("precision / ZeRO stage", f"{trainer.dtype} / {trainer.zero_stage}"),
        ("memory per rank: weights", human_bytes(memory.weights)),
        ("memory per rank: gradients", human_bytes(memory.gradients)),
        ("memory per rank: optimizer", human_bytes(memory.optimizer)),
        ("memory per rank: activations", human_bytes(memory.activations)),
        ("memory per rank: total (rough)", human_bytes(memory.total)),
        ("recipe hash (model shape)", recipe.recipe_hash()),
        ("run directory", str(trainer.run_dir)),
    ]


def print_plan(recipe: Recipe, layout: ParallelConfig, console: Console) -> None:
    """Print the plan table for ``recipe`` on ``layout``."""
    table = Table(title=f"plan for '{recipe.name}'", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in plan_rows(recipe, layout):
        table.add_row(what, value)
    console.print(table)
