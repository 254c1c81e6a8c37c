"""longctx.model: the Llama-family decoder and Hugging Face checkpoint load/save."""

from longctx.model.config import ModelConfig
from longctx.model.hf_io import (
    empty_model,
    hf_config_dict,
    load_hf,
    model_config_from_hf,
    save_hf,
)
from longctx.model.transformer import Transformer

__all__ = [
    "ModelConfig",
    "Transformer",
    "empty_model",
    "hf_config_dict",
    "load_hf",
    "model_config_from_hf",
    "save_hf",
]
