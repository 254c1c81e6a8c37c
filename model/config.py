"""Shape of a Llama-family decoder (Llama, Mistral, Qwen2), in Hugging Face's field names.

The names match ``config.json`` of the three architectures so that a checkpoint's config maps
onto ``ModelConfig`` one to one (``longctx.model.hf_io`` does the mapping). RoPE's base and
``rope_scaling`` live here too, because they are part of a pretrained checkpoint and are written
back on export; ``longctx.positional.PositionalConfig.kind`` decides whether RoPE is used.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from longctx.attention.core import AttentionShape

Architecture = Literal["llama", "mistral", "qwen2"]


class ModelConfig(BaseModel):
    """Architecture numbers of the decoder; every size is validated up front."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    init: str = Field(
        "scratch",
        description="'scratch' (random init from the fields below) or 'hf:PATH' (a Hugging Face "
        "checkpoint directory whose config.json overrides the shape fields).",
    )
    arch: Architecture = "llama"
    vocab_size: int = Field(32000, gt=0)
    hidden_size: int = Field(256, gt=0)
    intermediate_size: int = Field(688, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0, description="GQA; None means = heads")
    head_dim: int | None = Field(None, gt=0, description="None means hidden_size / heads")
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = Field(
        None, description="transformers' rope_scaling dict, e.g. {rope_type: yarn, factor: 4, ...}"
    )
    max_position_embeddings: int = Field(2048, gt=0)
    tie_word_embeddings: bool = False
    attention_bias: bool = Field(False, description="bias on q, k, v projections (Qwen2)")
    sliding_window: int | None = Field(None, gt=0, description="Mistral-style window; None = full")
    max_window_layers: int | None = Field(
        None,
        ge=0,
        description="Qwen2: layers with index < max_window_layers attend fully and only the rest "
        "use sliding_window; None = the window applies to every layer (Mistral)",
    )
    initializer_range: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        heads, kv = self.num_attention_heads, self.kv_heads
        if heads % kv:
            raise ValueError(
                f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv}; "
                f"choose kv heads that divide the heads (e.g. {_divisors(heads)})"
            )
        if self.head_dim is None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={heads}; "
                "set head_dim explicitly or change one of them"
            )
        if self.rope_scaling is not None:
            from longctx.positional.rope import validate_rope_scaling

            validate_rope_scaling(self.rope_scaling, self.dim_per_head)
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def attention_shape(self, layer_index: int) -> AttentionShape:
        """What the attention core of layer ``layer_index`` may know of this model, its window
        included: Mistral windows every layer; Qwen2 windows only layers ``>=
        max_window_layers`` (the lower ones attend to the whole past), so the last layer is
        windowed whenever any layer is."""
        window = self.sliding_window
        if self.max_window_layers is not None and layer_index < self.max_window_layers:
            window = None
        return AttentionShape(
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.dim_per_head,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            layer_index=layer_index,
            sliding_window=window,
            initializer_range=self.initializer_range,
        )

    def num_parameters(self) -> int:
        """Trainable parameters of the decoder this config describes, by formula (no model built).

        Per layer: q/o projections ``2 d (H hd)``, k/v ``2 d (Hkv hd)`` (+ q/k/v biases when
        ``attention_bias``), SwiGLU ``3 d I``, two RMSNorm weights ``2 d``; plus the embedding
        ``V d``, the final norm ``d`` and an untied lm_head ``V d``.
        """
        d, hd = self.hidden_size, self.dim_per_head
        q_dim, kv_dim = self.num_attention_heads * hd, self.kv_heads * hd
        attention = 2 * d * q_dim + 2 * d * kv_dim
        if self.attention_bias:
            attention += q_dim + 2 * kv_dim
        layer = attention + 3 * d * self.intermediate_size + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + d


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
