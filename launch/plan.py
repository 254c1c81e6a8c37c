"""What a run will look like before it starts: world layout, batch sizes, parameter count and a
rough memory estimate per rank. Printed by ``longctx train RECIPE --dry-run``; it only reads the
recipe (no Ray, no model, no tensors).

Memory model, per rank (t = micro_batch_size x seq_len / sp tokens on the rank):

- model states (bytes per parameter, as in the ZeRO paper's accounting): fp32: weights 4,
  gradients 4, Adam moments 8; bf16: weights 2, gradients 2, optimizer 12 (fp32 master weights
  + two fp32 moments). ZeRO stage >= 1 shards the optimizer state over all ranks, >= 2 also the
  gradients, 3 also the weights (DeepSpeed sees every rank as data parallel, so it shards over
  the whole world);
- ZeRO communication buffers at DeepSpeed's default sizes (``zero_buffer_bytes``);
- activations kept for backward, with or without activation checkpointing (which keeps each
  layer's input and its attention output), and the fp32 logits chunk of the tiled loss
  (``activation_bytes``);
- the attention workspace of the one layer being computed: float32 merge accumulators, ring
  K,V and dK,dV buffers, Ulysses all-to-all copies (``attention_workspace_bytes``);
- the tiled loss's gradient workspace: the float32 LM-head gradient accumulator (and under bf16
  the head's float32 copy and one chunk's bf16 logits before their cast:
  ``loss_workspace_bytes``).

Adapters (``peft:``): the frozen base stays in the training dtype with no gradient, no fp32
master and no AdamW moments, so only the trained parameters (LoRA matrices, LongLoRA's
embedding and norms: ``parameter_counts``) are counted for gradients, the optimizer state, the
gradient reduce bucket and the checkpoint's state, while the weights count every parameter.
Under ZeRO-3 an adapter run's base is built partitioned like any model; its LoRA matrices are
created whole on every rank and then partitioned (``parallel.zero_init.partition_new_parameters``).

Peaks per phase (``phase_peaks``), on top of the training step's estimate above:

- init from Hugging Face weights: under ZeRO-3 each rank builds its partition of the weights
  (training dtype, ``/ world``) plus one module's parameters in full while it is constructed
  (the largest parameter, ``largest_parameter_numel``), with adapters plus every LoRA matrix
  in full before it is partitioned (``lora_parameter_count``); under ZeRO 0-2 one full copy in the
  training dtype plus one fp32 tensor read from the checkpoint. A scratch init builds the model
  in fp32 on every rank, then casts it tensor by tensor;
- save and restore of a sharded checkpoint: the step peak plus this rank's share of the full
  fp32 state (weights and both AdamW moments, 12 bytes per parameter, ``/ world``) plus a
  256 MiB I/O buffer (the issue's bound; restore happens before the first step, so the step
  peak over-counts it).

Not counted: allocator fragmentation, CUDA context and NCCL's own buffers (about 1-3 GiB on a
GPU), and kernel scratch below one [chunk, chunk] score tile per head.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from longctx.config.recipe import Recipe
from longctx.model.adapters import adapted_parameter_counts
from longctx.model.config import ModelConfig
from longctx.parallel.config import ParallelConfig, ring_runs_as
from longctx.parallel.loss import default_chunk_size
from longctx.parallel.ulysses import kv_head_replication

# (weights, gradients, optimizer state) bytes per parameter for each training dtype.
_STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12)}
_ACTIVATION_BYTES = {"fp32": 4, "bf16": 2}
FP32_BYTES = 4
# DeepSpeed's defaults (elements), which longctx's DeepSpeed config leaves unchanged: the gradient
# reduce bucket (every stage, when there is more than one rank), the parameter all-gather bucket
# of stages 1-2, and the most gathered parameters stage 3 keeps alive at once.
DS_REDUCE_BUCKET = 500_000_000
DS_ALLGATHER_BUCKET = 500_000_000
DS_STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000


FULL_STATE_BYTES = 12  # fp32 weights + AdamW's two fp32 moments, per parameter
CHECKPOINT_IO_BUFFER = 256 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at the peak of a training step (see the module docstring for what
    each part counts and what is left out)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    zero_buffers: int = 0
    attention_workspace: int = 0
    loss_workspace: int = 0
    host_offload: int = 0  # bytes moved to CPU memory by ZeRO offload (not in ``total``)

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.zero_buffers
            + self.attention_workspace
            + self.loss_workspace
        )


def activation_bytes(
    model: ModelConfig,
    tokens: int,
    dtype: str,
    activation_checkpointing: bool,
    checkpoint_mode: str = "selective",
    mlp_chunk: int | None = None,
) -> int:
    """Activations kept for backward on one rank holding ``tokens`` tokens.

    Per token and layer, autograd keeps the two RMSNorm inputs and outputs (4 d), q and the
    attention output (2 Hq hd), k and v (2 Hkv hd), and the SwiGLU gate, up, silu(gate) and
    product (4 I). With activation checkpointing each layer keeps its input (d) and, in the
    ``selective`` mode, its attention output (Hq hd: backward does not recompute attention;
    ``CheckpointedLayer``, with or without the tiled MLP), plus one layer's full set while it
    is recomputed. With the tiled MLP (``mlp_chunk`` tokens) the MLP's four I-sized tensors
    exist for one chunk at a time, not for every token. On top: the final hidden state (d per
    token) and the tiled loss's one fp32 logits chunk (``default_chunk_size`` tokens; its
    gradient is computed in the same buffer).
    """
    d, hd = model.hidden_size, model.dim_per_head
    attention_part = 4 * d + 2 * model.num_attention_heads * hd + 2 * model.kv_heads * hd
    mlp_part = 4 * model.intermediate_size
    layers = model.num_hidden_layers
    element = _ACTIVATION_BYTES[dtype]
    logits_chunk = min(tokens, default_chunk_size(model.vocab_size)) * model.vocab_size * 4
    mlp_tokens = tokens if mlp_chunk is None else min(tokens, mlp_chunk)
    if activation_checkpointing:
        selective = checkpoint_mode == "selective"
        kept_per_layer = d + (model.num_attention_heads * hd if selective else 0)
        kept = tokens * layers * kept_per_layer + tokens * attention_part + mlp_tokens * mlp_part
    elif mlp_chunk is None:
        kept = tokens * layers * (attention_part + mlp_part)
    else:  # each MLP chunk keeps only its input (the norm's output, in attention_part)
        kept = tokens * layers * attention_part + mlp_tokens * mlp_part
    return (kept + tokens * d) * element + logits_chunk


def zero_buffer_bytes(trained: int, params: int, dtype: str, zero_stage: int, world: int) -> int:
    """DeepSpeed's communication buffers at its default sizes: the gradient reduce bucket
    (``min(trained, 5e8)`` gradient elements, only with more than one rank), plus the all-gather
    bucket of the updated weights of stages 1-2 (``min(trained, 5e8)``) or the gathered live
    parameters of stage 3, frozen ones included (``min(params, 1e9)`` weight elements)."""
    weight_b, grad_b, _ = _STATE_BYTES[dtype]
    reduce = min(trained, DS_REDUCE_BUCKET) * grad_b if world > 1 else 0
    if zero_stage == 3:
        return reduce + min(params, DS_STAGE3_MAX_LIVE_PARAMETERS) * weight_b
    if zero_stage >= 1:
        return reduce + min(trained, DS_ALLGATHER_BUCKET) * weight_b
    return reduce


def attention_workspace_bytes(
    model: ModelConfig, tokens: int, dtype: str, layout: ParallelConfig
) -> int:
    """Scratch of one attention layer on a rank holding ``tokens`` tokens (its query shard).

    - the float32 merge accumulators of the output and log-sum-exp: ``tokens x Hq x (hd + 1)``;
    - Ulysses (degree u > 1): the all-to-all makes new copies of q, out (``Hq hd``) and k, v
      (``Hkv r hd`` with each kv head repeated ``r = u / gcd(Hkv, u)`` times) per token;
    - ring (degree > 1): the backward, the larger phase, has two K,V buffers in flight (one
      computed on, one arriving) in the activation dtype and two float32 dK,dV accumulators
      travelling with them; a K,V block has ``tokens x Hkv r hd`` elements per tensor (under
      Ulysses a rank holds ``u`` times the tokens and ``1/u`` of the heads).
    """
    element = _ACTIVATION_BYTES[dtype]
    hd, heads = model.dim_per_head, model.num_attention_heads
    kv_heads = model.kv_heads * kv_head_replication(model.kv_heads, layout.ulysses)
    total = tokens * heads * (hd + 1) * FP32_BYTES
    if layout.ulysses > 1:
        total += tokens * (2 * heads + 2 * kv_heads) * hd * element
    if layout.ring > 1:
        block = tokens * kv_heads * hd  # elements of one K (or V) block
        total += 2 * 2 * block * element + 2 * 2 * block * FP32_BYTES
    return total


def loss_workspace_bytes(model: ModelConfig, tokens: int, dtype: str) -> int:
    """The fused tiled loss's gradient buffers on ``tokens`` tokens, beyond its logits chunk
    (counted in ``activation_bytes``, which also holds the chunk's logits gradient in place):
    the float32 LM-head gradient accumulator ``[V, d]``, and under bf16 the head's float32 copy
    ``[V, d]`` and one chunk's bf16 logits before their float32 cast."""
    head = model.vocab_size * model.hidden_size * FP32_BYTES
    if dtype == "fp32":
        return head
    chunk = min(tokens, default_chunk_size(model.vocab_size)) * model.vocab_size
    return 2 * head + chunk * _ACTIVATION_BYTES[dtype]


def parameter_counts(recipe: Recipe) -> tuple[int, int]:
    """``(trained, total)`` parameters of the recipe's decoder: both ``num_parameters()`` for
    full fine-tuning; with adapters the LoRA matrices and the trainable extras, and the base
    plus the adapters (``model.adapters.adapted_parameter_counts``)."""
    if recipe.adapters is None:
        params = recipe.model.num_parameters()
        return params, params
    return adapted_parameter_counts(
        recipe.adapters, recipe.model, recipe.positional, recipe.attention
    )


def lora_parameter_count(recipe: Recipe) -> int:
    """Scalars of the LoRA matrices ``A [r, in]``, ``B [out, r]`` the recipe's adapters add to
    the decoder (0 without adapters)."""
    return parameter_counts(recipe)[1] - recipe.model.num_parameters()


def estimate_memory(recipe: Recipe, layout: ParallelConfig) -> MemoryEstimate:
    """Per-rank memory of ``recipe`` on ``layout`` (a ParallelConfig with a concrete dp)."""
    trainer = recipe.trainer
    trained, params = parameter_counts(recipe)
    weight_b, grad_b, optim_b = _STATE_BYTES[trainer.dtype]
    world, stage = layout.world, trainer.zero_stage
    tokens = trainer.micro_batch_size * recipe.data.seq_len // layout.sp
    weights = params * weight_b // (world if stage >= 3 else 1)
    optimizer = trained * optim_b // (world if stage >= 1 else 1)
    # ZeRO offload keeps these partitions in host memory instead of on the accelerator.
    host = (optimizer if trainer.offload_optimizer else 0) + (
        weights if trainer.offload_param else 0
    )
    return MemoryEstimate(
        weights=0 if trainer.offload_param else weights,
        gradients=trained * grad_b // (world if stage >= 2 else 1),
        optimizer=0 if trainer.offload_optimizer else optimizer,
        host_offload=host,
        activations=activation_bytes(
            recipe.model,
            tokens,
            trainer.dtype,
            trainer.activation_checkpointing,
            trainer.activation_checkpointing_mode,
            trainer.tiled_mlp_chunk,
        ),
        zero_buffers=zero_buffer_bytes(trained, params, trainer.dtype, stage, world),
        attention_workspace=attention_workspace_bytes(recipe.model, tokens, trainer.dtype, layout),
        loss_workspace=loss_workspace_bytes(recipe.model, tokens, trainer.dtype),
    )


@dataclass(frozen=True)
class PhasePeaks:
    """Per-rank peak bytes of each phase of a run (see the module docstring)."""

    init: int
    step: int
    save: int
    restore: int


def largest_parameter_numel(model: ModelConfig) -> int:
    """Elements of the model's largest parameter: the embedding / LM head ``[V, d]``, an MLP
    matrix ``[I, d]`` or the query projection ``[Hq hd, d]``."""
    d = model.hidden_size
    return max(
        model.vocab_size * d,
        model.intermediate_size * d,
        model.num_attention_heads * model.dim_per_head * d,
    )


def phase_peaks(recipe: Recipe, layout: ParallelConfig) -> PhasePeaks:
    """Per-rank peaks of init, a training step, a sharded save and a restore of ``recipe`` on
    ``layout``."""
    trainer = recipe.trainer
    trained, params = parameter_counts(recipe)
    weight_b = _STATE_BYTES[trainer.dtype][0]
    largest = largest_parameter_numel(recipe.model)
    world = layout.world
    from_hf = recipe.model.init.startswith("hf:")
    if trainer.zero_stage == 3:
        # partitions only, plus the one tensor being read or computed, plus the LoRA matrices
        # of an adapter run, whole until they are partitioned
        lora = lora_parameter_count(recipe)
        base = params - lora
        init = base * weight_b // world + largest * (weight_b if from_hf else FP32_BYTES)
        init += lora * weight_b
    elif not from_hf:
        init = params * FP32_BYTES + largest * weight_b
    else:
        init = params * weight_b + largest * FP32_BYTES
    step = estimate_memory(recipe, layout).total
    checkpoint = step + trained * FULL_STATE_BYTES // world + CHECKPOINT_IO_BUFFER
    return PhasePeaks(init=init, step=step, save=checkpoint, restore=checkpoint)


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
    peaks = phase_peaks(recipe, layout)
    trained, params = parameter_counts(recipe)
    per_step = layout.dp * trainer.micro_batch_size * trainer.grad_accum
    return [
        ("world layout", layout.describe()),
        (
            "parallel.ring runs as",
            ring_runs_as(recipe.attention.variant, recipe.positional.kind)
            + f" ({recipe.attention.variant} / {recipe.positional.kind})"
            + ("" if layout.ring > 1 else "; unused at ring 1"),
        ),
        ("tokens per rank per micro-batch", f"{trainer.micro_batch_size} x {seq_len // layout.sp}"),
        ("sequences per optimizer step", f"{per_step} ({per_step * seq_len:,} tokens)"),
        ("parameters", human_count(params)),
        ("trained parameters", f"{human_count(trained)}, {trained / params:.2%}"),
        ("precision / ZeRO stage", f"{trainer.dtype} / {trainer.zero_stage}"),
        (
            "activation checkpointing",
            f"on ({trainer.activation_checkpointing_mode})"
            if trainer.activation_checkpointing
            else "off",
        ),
        ("memory per rank: weights", human_bytes(memory.weights)),
        ("memory per rank: gradients", human_bytes(memory.gradients)),
        ("memory per rank: optimizer", human_bytes(memory.optimizer)),
        ("memory per rank: ZeRO buffers", human_bytes(memory.zero_buffers)),
        ("memory per rank: activations", human_bytes(memory.activations)),
        ("memory per rank: attention workspace", human_bytes(memory.attention_workspace)),
        ("memory per rank: loss workspace", human_bytes(memory.loss_workspace)),
        ("memory per rank: total (estimate)", f"{human_bytes(memory.total)} ({memory.total:,} B)"),
        *(
            (f"peak per rank: {phase}", f"{human_bytes(value)} ({value:,} B)")
            for phase, value in (
                ("init", peaks.init),
                ("step", peaks.step),
                ("save", peaks.save),
                ("restore", peaks.restore),
            )
        ),
        (
            "host memory per rank: ZeRO offload",
            human_bytes(memory.host_offload)
            + f" (optimizer {'on' if trainer.offload_optimizer else 'off'}, "
            + f"parameters {'on' if trainer.offload_param else 'off'})",
        ),
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
