"""LoRA and LongLoRA adapters on the decoder, through ``peft`` (the recipe's ``peft:`` section).

``attach_adapters`` injects peft's LoRA layers into the plain ``Transformer`` (before any
parallel transform): each targeted ``nn.Linear`` (default the attention's ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``) becomes a ``peft`` ``lora.Linear`` whose output is
``W x + (alpha / rank) B A x`` with ``A`` ``[rank, in]`` (Kaiming-initialised from torch's RNG,
so a seeded build is the same on every rank) and ``B`` ``[out, rank]`` (zeros: training starts
from the base model's function). Every base weight is frozen; LongLoRA's extra trainable
parameters (``trainable: [embed, norm]``: the token embedding and every RMSNorm gain) are
unfrozen again. A tied ``lm_head`` shares the embedding's parameter, so it trains with it.

State-dict names of an adapted model are peft's: ``layers.0.self_attn.q_proj.base_layer.weight``
(frozen), ``...q_proj.lora_A.default.weight`` and ``...lora_B.default.weight`` (trained).
``merge_adapters`` folds ``B A`` into each base weight (peft's own ``merge``) and puts the plain
``nn.Linear`` back, so the merged model has the plain model's names again (evaluation, HF
export, a full fine-tuning stage after an adapter stage). ``peft_adapter_files`` writes the
adapter in peft's own format for ``PeftModel.from_pretrained`` onto the Hugging Face base model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import save_file
from torch import Tensor, nn

from longctx.model.hf_io import hf_tensor_name

if TYPE_CHECKING:
    from longctx.attention.config import AttentionConfig
    from longctx.model.config import ModelConfig
    from longctx.model.transformer import Transformer
    from longctx.positional.config import PositionalConfig

ADAPTER_NAME = "default"  # peft's name for a model's only adapter
# LongLoRA's extra trainable parameters, by the module leaf names they live in.
EXTRA_TRAINABLE: dict[str, tuple[str, ...]] = {
    "embed": ("embed_tokens",),
    "norm": ("input_layernorm", "post_attention_layernorm", "norm"),
}
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterConfig(BaseModel):
    """The recipe's ``peft:`` section: LoRA adapters instead of full fine-tuning.

    ``rank`` r and ``alpha`` set the update ``(alpha / r) B A``; ``dropout`` is applied to the
    adapter's input in training; ``target_modules`` are leaf names of the decoder's linear layers
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``,
    ``lm_head``); ``trainable`` adds LongLoRA's trainable embedding and norms. ``enabled: false``
    (e.g. in a stage) trains every weight again.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="false = full fine-tuning (e.g. for one stage)")
    rank: int = Field(8, gt=0, description="LoRA rank r of B [out, r] A [r, in]")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="leaf names of the linear layers that get adapters",
    )
    trainable: list[Literal["embed", "norm"]] = Field(
        default_factory=list,
        description="extra trained parameters (LongLoRA: [embed, norm]); the rest is frozen",
    )

    @field_validator("target_modules", "trainable")
    @classmethod
    def _no_repeats(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"{names} names an entry twice; list each once")
        return names


def linear_module_names(
    config: ModelConfig, positional: PositionalConfig, attention: AttentionConfig
) -> set[str]:
    """Leaf names of the decoder's ``nn.Linear`` layers (the valid ``target_modules``), read
    from a model built on the meta device (no memory, no initialisation cost)."""
    from longctx.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config, positional, attention)
    return {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def target_module_problem(
    cfg: AdapterConfig,
    config: ModelConfig,
    positional: PositionalConfig,
    attention: AttentionConfig,
) -> str | None:
    """Why ``cfg.target_modules`` cannot be adapted on this model (one line), or None."""
    available = linear_module_names(config, positional, attention)
    missing = [name for name in cfg.target_modules if name not in available]
    if not missing:
        return None
    return (
        f"peft.target_modules names {missing}, which this model does not have; its linear "
        f"layers are {sorted(available)}"
    )


def lora_config(cfg: AdapterConfig, **extra):
    """peft's ``LoraConfig`` for ``cfg`` (``extra``: further ``LoraConfig`` fields)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        **extra,
    )


def _extra_modules(cfg: AdapterConfig) -> tuple[str, ...]:
    return tuple(leaf for group in cfg.trainable for leaf in EXTRA_TRAINABLE[group])


def attach_adapters(model: Transformer, cfg: AdapterConfig) -> Transformer:
    """Inject LoRA layers into ``model`` in place, freeze every base weight and unfreeze the
    ``cfg.trainable`` extras; returns ``model``. Seed torch first for a reproducible ``A``."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config(cfg), model, adapter_name=ADAPTER_NAME)
    extras = _extra_modules(cfg)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in extras:
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)
    return model


def adapted_parameter_counts(
    cfg: AdapterConfig,
    config: ModelConfig,
    positional: PositionalConfig,
    attention: AttentionConfig,
) -> tuple[int, int]:
    """``(trained, total)`` scalars of the decoder with ``cfg``'s adapters (a tied weight counts
    once), read from a model built and adapted on the meta device (no memory, no
    initialisation cost): the ``--dry-run`` planner's counts."""
    from longctx.model.transformer import Transformer

    with torch.device("meta"):
        model = attach_adapters(Transformer(config, positional, attention), cfg)
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapter layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


@torch.no_grad()
def merge_adapters(
    model: Transformer,
    gathered: Callable[[list[nn.Parameter]], AbstractContextManager] = nullcontext,
) -> Transformer:
    """Fold every adapter into its base weight (``W + (alpha / r) B A``, peft's ``merge``) and
    replace the adapted layer by its plain base layer; returns ``model`` with plain names and
    every parameter trainable again (as a model built without adapters).

    ``gathered(params)``: the context each adapted layer merges in, given that layer's
    parameters; a ZeRO-3 model passes ``parallel.zero_init.gathered_for_update`` (the layer
    whole while it merges, partitioned again after)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in adapted:
        with gathered(list(module.parameters())):
            module.merge()
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, module.get_base_layer())
    return model.requires_grad_(True)  # a plain model again: every weight trainable


def trainable_fraction(model: nn.Module) -> float:
    """Trained scalars / all scalars of ``model`` (a tied weight counts once)."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if p.requires_grad) / total


def _peft_key(name: str) -> str:
    """A trained tensor's name in longctx (``layers.0.self_attn.q_proj.lora_A.default.weight``,
    ``embed_tokens.weight``) -> its key in a peft adapter file of the Hugging Face model
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    return "base_model.model." + hf_tensor_name(name.replace(f".{ADAPTER_NAME}.", "."))


def peft_adapter_files(
    out: Path,
    cfg: AdapterConfig,
    trained: dict[str, Tensor],
    *,
    base_model: str | None,
    tied_embeddings: bool,
) -> None:
    """Write ``trained`` (an adapter checkpoint's tensors by longctx name) into ``out`` as peft
    writes an adapter: ``adapter_config.json`` (``LoraConfig`` with the trainable extras as
    ``modules_to_save``) and ``adapter_model.safetensors``. ``PeftModel.from_pretrained(
    hf_base, out)`` then gives the adapted model. A tied head follows a trained embedding
    (``ensure_weight_tying``)."""
    modules_to_save = list(_extra_modules(cfg)) or None
    config = lora_config(
        cfg,
        modules_to_save=modules_to_save,
        ensure_weight_tying="embed" in cfg.trainable and tied_embeddings,
        base_model_name_or_path=base_model,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = {_peft_key(name): t.contiguous() for name, t in trained.items()}
    embedding = trained.get("embed_tokens.weight")
    if tied_embeddings and embedding is not None:  # peft wraps the tied head as well
        tensors[_peft_key("lm_head.weight")] = embedding.clone().contiguous()
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
