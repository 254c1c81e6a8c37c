"""The Llama-family decoder (Llama, Mistral, Qwen2) on one device.

One file a reader can hold in their head, in the spirit of nanoGPT:

    embed_tokens -> L x [input_layernorm -> self_attn -> +residual,
                         post_attention_layernorm -> mlp (SwiGLU) -> +residual]
                 -> norm -> lm_head (tied to embed_tokens when ``tie_word_embeddings``)

Module leaf names are Hugging Face's (``layers.N.self_attn.q_proj``, ``mlp.gate_proj``, ...), so
``longctx.model.hf_io`` converts checkpoints with a one-line key mapping. There is no distributed
code here: the attention layer delegates the inner ``softmax(q k^T) v`` to one swappable seam,
``self_attn.core`` (``(q, k, v, ctx) -> out``), which sequence parallelism and the sparse
variants replace without touching this file. RoPE comes from ``longctx.positional``: one rotary
module computes ``cos``/``sin`` once per forward and every layer rotates its q and k with them.

The memory options for long sequences (all exact, all off by default) are applied to a built
model by ``longctx.parallel.apply.apply_transforms``: ``SwiGLU.seq_chunk`` computes each MLP over
sequence chunks recomputed in backward (only a chunk's ``[B, chunk, intermediate]`` activations
ever exist), and the layer wrappers of ``longctx.model.wrappers`` checkpoint each layer and keep
what it saves for backward in CPU memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import LayerProjections
from longctx.attention.registry import build_attention_core
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.positional.config import PositionalConfig
from longctx.positional.rope import RotaryEmbedding, apply_rotary

RotaryTables = tuple[Tensor, Tensor]  # (cos, sin), each [B, T, D] float32


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no mean subtraction, no bias).

    The statistic is taken in float32 and the result cast back before the gain, as Hugging Face
    Llama does, so bf16 models match transformers bit for bit in spirit and fp32 exactly.
    Computed by ``_RMSNormFunction``, whose backward is written out.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)  # [B, T, d]


class _RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rstd).to(x.dtype)`` with ``rstd = rsqrt(mean(x^2) + eps)`` per token,
    in at least float32.

    Autograd through the plain expression makes about eight ``[B, T, d]`` temporaries and
    keeps the normed activations; this keeps only x and rstd ``[B, T, 1]`` and makes two
    temporaries each way (each big one costs page faults at long context). With
    n = x * rstd and gn = grad * weight (per token, D = d):
    dx = rstd * gn - x * rstd^3 * (gn . x) / D and dweight = sum over tokens of grad * n.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x_wide = x.to(torch.promote_types(x.dtype, torch.float32))  # [B, T, d]
        sum_squares = torch.linalg.vector_norm(x_wide, dim=-1, keepdim=True).pow_(2)  # [B, T, 1]
        rstd = sum_squares.div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x_wide * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_wide = x.to(rstd.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_x_wide = (grad.to(rstd.dtype) * x_wide).reshape(-1, x.shape[-1])  # [N, d]
            grad_weight = (grad_x_wide.t() @ rstd.reshape(-1)).to(weight.dtype)  # [d]
        grad_normed = (grad * weight).to(rstd.dtype)  # [B, T, d], a new tensor
        coef = torch.linalg.vecdot(grad_normed, x_wide).unsqueeze(-1)  # [B, T, 1]
        coef.mul_(rstd.pow(3)).div_(-x.shape[-1])
        grad_x = grad_normed.mul_(rstd).addcmul_(x_wide, coef)
        return grad_x.to(x.dtype), grad_weight, None


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: the gated MLP of the Llama family.

    ``seq_chunk`` (None: off; set by ``apply_transforms``' tiled MLP) computes the MLP over sequence chunks
    of that many tokens. Under autograd each chunk runs through a non-reentrant checkpoint, so
    backward recomputes it from its input slice: the three ``[B, T, intermediate]`` tensors an
    untiled MLP keeps (gate, up and their product, about 8 x d floats per token for Llama
    shapes) shrink to one chunk's, alive only while that chunk is computed. The MLP acts on each
    token alone, so the result is the untiled one (up to the matmuls' summation order).
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.seq_chunk: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        # x [B, T, d] -> [B, T, d]
        if self.seq_chunk is None or x.shape[1] <= self.seq_chunk:
            return self._mlp(x)
        return checkpointed_chunks(self._mlp, self.seq_chunk, x)

    def _mlp(self, x: Tensor) -> Tensor:
        # x [B, t, d] -> [B, t, intermediate] -> [B, t, d]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def checkpointed_chunks(fn: Callable[..., Tensor], chunk: int, *inputs: Tensor) -> Tensor:
    """``fn(*inputs)`` for a per-token ``fn``, computed over sequence chunks of ``chunk`` tokens.

    Each input is ``[B, T, *]`` and is split along T the same way; the result is ``[B, T, d']``.
    Under autograd each chunk runs through a non-reentrant checkpoint, so between forward and
    backward only the chunks' inputs (views of ``inputs``) are kept and backward recomputes one
    chunk's activations at a time; without autograd the chunks simply run in turn."""
    pieces = zip(*(x.split(chunk, dim=1) for x in inputs))  # each [B, <= chunk, *] per input
    if torch.is_grad_enabled():
        outs = [checkpoint(fn, *piece, use_reentrant=False) for piece in pieces]
    else:
        outs = [fn(*piece) for piece in pieces]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class SelfAttention(nn.Module):
    """Grouped-query attention: projections and RoPE here, the inner attention in ``self.core``.

    ``q_proj`` makes ``num_attention_heads`` heads, ``k_proj``/``v_proj`` make
    ``num_key_value_heads`` (each serves ``heads / kv_heads`` consecutive query heads, the order
    of transformers' ``repeat_kv``). ``attention_bias`` puts a bias on q, k and v only (Qwen2);
    ``o_proj`` never has one. The core comes from the attention registry with this layer's
    ``config.attention_shape(layer_index)``, whose ``sliding_window`` (Mistral, Qwen2) it
    honours: the core owns every masking decision. A core that ``projects_itself`` (MoSA, as
    the layer's own core) gets x and the projections and runs the whole layer instead.
    """

    def __init__(
        self,
        config: ModelConfig,
        attention: AttentionConfig,
        positional: PositionalConfig,
        *,
        layer_index: int,
    ):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.dim_per_head
        d, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.core = build_attention_core(config.attention_shape(layer_index), attention, positional)

    def forward(self, x: Tensor, rotary: RotaryTables | None, ctx: AttentionContext) -> Tensor:
        if self.core.projects_itself:  # the whole layer, e.g. MoSA's chosen-token projections
            return self.core.forward_layer(x, self.projections, rotary, ctx)  # [B, T, d]
        return self.o_proj(self.heads(x, rotary, ctx))  # [B, T, d]

    def heads(self, x: Tensor, rotary: RotaryTables | None, ctx: AttentionContext) -> Tensor:
        """The attention heads' outputs before ``o_proj``, ``[B, T, Hq*D]`` (for SDPA's
        kernels a view of the kernel's own output, whose memory is ``[B, T, Hq, D]``); only for
        a core that does not project itself."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # q [B, Hq, T, D]; k, v [B, Hkv, T, D]
        if rotary is not None and not self.core.applies_rope_itself:
            q, k = apply_rotary(q, k, *rotary)
            rotary = None  # else the core (or its SP wrapper) rotates with ctx.rotary
        out = self.core(q, k, v, dataclasses.replace(ctx, hidden=x, rotary=rotary))
        return out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)

    @property
    def projections(self) -> LayerProjections:
        """q_proj, k_proj, v_proj, o_proj, for a core that ``projects_itself``."""
        return LayerProjections(q=self.q_proj, k=self.k_proj, v=self.v_proj, o=self.o_proj)

    def weights_read_by_core(self) -> list[nn.Parameter]:
        """The projection parameters this layer's core reads without calling their modules
        (a core that ``projects_itself``; else none). ZeRO-3 gathers a parameter for its own
        module's forward; the trainer registers these with this layer
        (``register_external_parameter``) so that the layer's pre-forward hook gathers them
        with its own (DeepSpeed would otherwise find them one by one on first access)."""
        if not self.core.projects_itself:
            return []
        return [p for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
                for p in linear.parameters()]  # fmt: skip


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        config: ModelConfig,
        attention: AttentionConfig,
        positional: PositionalConfig,
        *,
        layer_index: int,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config, attention, positional, layer_index=layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, rotary: RotaryTables | None, ctx: AttentionContext) -> Tensor:
        return self.mlp_residual(self.attention_residual(x, rotary, ctx))  # [B, T, d]

    def attention_residual(
        self, x: Tensor, rotary: RotaryTables | None, ctx: AttentionContext
    ) -> Tensor:
        """The first half, ``x + attn(norm(x))`` [B, T, d]."""
        return x + self.self_attn(self.input_layernorm(x), rotary, ctx)

    def mlp_residual(self, x: Tensor) -> Tensor:
        """The second half, ``x + mlp(norm(x))`` [B, T, d]; it acts on each token alone, so a
        checkpointed layer may run it over sequence chunks."""
        return x + self.mlp(self.post_attention_layernorm(x))

    def attention_heads(
        self, x: Tensor, rotary: RotaryTables | None, ctx: AttentionContext
    ) -> Tensor:
        """The attention heads' outputs on ``norm(x)``, before ``o_proj``: [B, T, Hq*D]."""
        return self.self_attn.heads(self.input_layernorm(x), rotary, ctx)

    def rest_from_heads(self, x: Tensor, heads: Tensor) -> Tensor:
        """The layer from its input x [B, t, d] and ``attention_heads`` [B, t, Hq*D] on:
        ``o_proj``, both residuals and the MLP half, [B, t, d]. Per token, so a checkpointed
        layer runs it over sequence chunks from the two tensors it keeps anyway."""
        return self.mlp_residual(x + self.self_attn.o_proj(heads))


class Transformer(nn.Module):
    """Decoder-only language model of the Llama family.

    ``positional.kind`` ``rope`` rotates q and k by ``position_ids`` (with ``config.rope_theta``
    and ``config.rope_scaling``); ``none`` uses no position encoding (NoPE, causal mask only).
    ``attention`` selects the inner attention kernel of ``self_attn.core``.
    """

    def __init__(
        self,
        config: ModelConfig,
        positional: PositionalConfig | None = None,
        attention: AttentionConfig | None = None,
    ):
        super().__init__()
        # one draw from torch's global generator: the seed of every parameter's own generator
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.config = config
        self.positional = positional or PositionalConfig()
        self.attention = attention or AttentionConfig()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.attention, self.positional, layer_index=i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = (
            RotaryEmbedding.from_config(config) if self.positional.kind == "rope" else None
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights ~ N(0, initializer_range), biases 0, norm gains 1 (the Llama recipe), each
        parameter drawn from its own generator (``initial_values``). A tied embedding is drawn
        once, under its first name.

        A parameter with no local values (``numel() == 0``: partitioned by ZeRO-3's
        ``zero.Init``) is skipped; ``parallel.zero_init`` fills its partitions from the same
        ``initial_values``, so the model does not depend on the number of ranks.
        """
        for _, param, initial in self.initial_values():
            if param.numel() > 0:
                param.copy_(initial(tuple(param.shape)))

    def initial_values(self) -> list[tuple[str, nn.Parameter, Callable[[tuple[int, ...]], Tensor]]]:
        """``(name, parameter, initial)`` for each parameter the Llama init sets (the weights
        and biases of every ``Linear``, ``Embedding`` weights, ``RMSNorm`` gains), once per
        distinct parameter under its first name; ``initial(shape)`` returns its full initial
        value (float32, CPU, ``shape`` = the parameter's global shape).

        Each random value comes from a generator seeded with ``(init_seed, name)`` alone, so a
        rank that needs only a slice of a parameter computes the value a single-process model
        has, whatever else it builds and in whatever order. Other parameters (position
        encoding or variant tables) keep their modules' own init."""
        std = self.config.initializer_range
        seen: set[int] = set()
        out = []
        for prefix, module in self.named_modules():
            if isinstance(module, nn.Linear):
                rules = [("weight", "normal"), ("bias", "zero")]
            elif isinstance(module, nn.Embedding):
                rules = [("weight", "normal")]
            elif isinstance(module, RMSNorm):
                rules = [("weight", "one")]
            else:
                continue
            for attr, rule in rules:
                param = getattr(module, attr)
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                name = f"{prefix}.{attr}" if prefix else attr
                out.append((name, param, _initial(rule, std, self.init_seed, name)))
        return out

    def num_parameters(self) -> int:
        """Number of distinct scalar parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward_hidden(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        *,
        doc_ids: Tensor | None = None,
        seq_positions: Tensor | None = None,
        rope_seq_len: int | None = None,
    ) -> Tensor:
        """Final normed hidden states ``[B, T, d]``, before ``lm_head``.

        A tiled loss calls this and applies ``lm_head`` chunk by chunk so that ``[T, vocab]``
        logits never exist at once. ``position_ids`` ``[B, T]`` are the RoPE positions (global
        under sequence parallelism, restarting per document when packed; default
        ``arange(T)``); ``seq_positions`` ``[T]`` is each local token's index in the global
        sequence (default ``arange(T)``); ``doc_ids`` ``[B, T]`` keeps packed documents from
        attending to each other; ``rope_seq_len`` is the sequence length dynamic/longrope
        scalings see (default: decided by the rotary module from ``position_ids``).
        """
        B, T = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)
        if seq_positions is None:
            seq_positions = torch.arange(T, device=device)
        _check_shape("position_ids", position_ids, (B, T))
        _check_shape("seq_positions", seq_positions, (T,))
        if doc_ids is not None:
            _check_shape("doc_ids", doc_ids, (B, T))
        ctx = AttentionContext(
            position_ids=position_ids, seq_positions=seq_positions, doc_ids=doc_ids
        )
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(position_ids, seq_len=rope_seq_len)  # cos, sin [B, T, D]
        h = self.embed_tokens(input_ids)  # [B, T, d]
        for layer in self.layers:
            h = layer(h, rotary, ctx)  # [B, T, d]
        return self.norm(h)  # [B, T, d]

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        *,
        doc_ids: Tensor | None = None,
        seq_positions: Tensor | None = None,
        rope_seq_len: int | None = None,
    ) -> Tensor:
        """Logits ``[B, T, vocab]`` for ``input_ids`` ``[B, T]``; arguments as in
        ``forward_hidden``."""
        hidden = self.forward_hidden(
            input_ids,
            position_ids,
            doc_ids=doc_ids,
            seq_positions=seq_positions,
            rope_seq_len=rope_seq_len,
        )
        return self.lm_head(hidden)  # [B, T, V]


def _initial(rule: str, std: float, seed: int, name: str) -> Callable[[tuple[int, ...]], Tensor]:
    """The function returning parameter ``name``'s full initial value for ``rule``: ``normal``
    (N(0, std) from a generator seeded by ``seed`` and ``name``), ``zero`` or ``one``."""

    def initial(shape: tuple[int, ...]) -> Tensor:
        if rule == "zero":
            return torch.zeros(shape)
        if rule == "one":
            return torch.ones(shape)
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    return initial


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise LongctxError(
            f"{name} has shape {tuple(tensor.shape)} but the input ids need {expected}; "
            f"pass one {name} entry per token"
        )
