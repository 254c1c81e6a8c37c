"""Tiny random Hugging Face Llama / Mistral / Qwen2 models for parity tests.

Every model is fp32 with eager attention (the reference implementation of transformers), and all
its weights, including norm gains and Qwen2's q/k/v biases, are redrawn from a seeded generator
at a scale where attention is far from uniform; with transformers' own init (std 0.02, gains 1,
biases 0) RoPE or bias mistakes would barely move the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import Tensor

HF_CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}
HEAD_DIM = 16
# max_position_embeddings of the tiny models; parity runs at 256 tokens, so dynamic NTK and
# longrope's long factors are active and linear/yarn/llama3 stretch positions well past it.
MAX_POSITIONS = 128
PARITY_LENGTH = 256

# One transformers rope_scaling per type, in transformers 5's rope_parameters form.
ROPE_SCALINGS: dict[str, dict] = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
        "long_factor": [1.0 + 1.5 * i for i in range(HEAD_DIM // 2)],
        "factor": MAX_POSITIONS / 64,
        "original_max_position_embeddings": 64,
    },
}


def tiny_hf_config(
    arch: str,
    *,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool = False,
    **overrides,
) -> transformers.PreTrainedConfig:
    """2 layers, hidden 64, 4 heads of 16, 2 kv heads, vocab 203 (odd on purpose)."""
    fields = {
        "vocab_size": 203,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {**(rope_scaling or {"rope_type": "default"}), "rope_theta": 1e4},
        "tie_word_embeddings": tie_word_embeddings,
        **overrides,
    }
    return HF_CONFIG_CLASSES[arch](**fields)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: matrices and biases N(0, 0.25^2), norm gains 1 + N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.25 * noise)


def tiny_hf_model(arch: str, seed: int = 0, **config_kwargs) -> transformers.PreTrainedModel:
    """A randomised fp32 ``*ForCausalLM`` with eager attention, in eval mode."""
    config = tiny_hf_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    randomize_(model, seed)
    return model.eval()


def save_tiny_hf(directory: Path, arch: str, seed: int = 0, **config_kwargs):
    """Save a tiny model with ``save_pretrained``; returns (directory, the transformers model)."""
    model = tiny_hf_model(arch, seed, **config_kwargs)
    model.save_pretrained(directory)
    return directory, model


def load_with_transformers(directory: Path) -> transformers.PreTrainedModel:
    """What a user of transformers gets from a checkpoint directory: fp32, eager, eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


@torch.no_grad()
def hf_logits(model: transformers.PreTrainedModel, input_ids: Tensor) -> Tensor:
    """Logits [B, T, V] of a transformers model, without a KV cache."""
    return model(input_ids=input_ids, use_cache=False).logits


def random_tokens(batch: int, length: int, vocab: int = 203, seed: int = 1) -> Tensor:
    """Seeded token ids [batch, length]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)
