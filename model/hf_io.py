"""Hugging Face checkpoints in and out: ``config.json`` <-> ``ModelConfig`` and weights.

A checkpoint directory holds ``config.json`` plus either ``model.safetensors``, a sharded
``model.safetensors.index.json`` with its shards, or (legacy) ``pytorch_model.bin`` /
``pytorch_model.bin.index.json``. Pickled ``.bin`` files are read only with
``torch.load(weights_only=True)``: a pickle that needs arbitrary code is refused, never run.

Both config.json dialects are read: transformers >= 5 writes ``rope_parameters`` (with
``rope_theta`` and ``rope_type`` inside), older versions ``rope_theta`` and ``rope_scaling``.
``save_hf`` writes both, so every transformers version reads the export the same way.

Key mapping: our modules carry Hugging Face's leaf names at the top level, so a parameter
``layers.3.mlp.up_proj.weight`` is ``model.layers.3.mlp.up_proj.weight`` in the checkpoint and
``lm_head.weight`` is itself (``hf_tensor_name``).

New parameters: a model whose position encoding or attention variant adds parameters that a
(RoPE-trained) checkpoint does not have (CoPE tables, BAM priors, ...) can still be loaded. Every
module that owns such parameters has an ``init_new_parameters()`` method that sets them as
SPECS.md says; ``load_hf`` calls it, takes from the checkpoint whatever the checkpoint has, and
logs the names of the parameters that were new (``new_parameter_names`` lists the candidates).
Any other missing tensor is still an error. ``save_hf`` records the position encoding in
config.json (``longctx_positional``), and ``load_hf`` uses it when no ``positional`` is passed,
so an exported CoPE/BAM/TAPA model loads back as itself.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from longctx.attention.config import AttentionConfig
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.model.transformer import Transformer
from longctx.positional.config import PositionalConfig

ARCHITECTURE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# transformers' defaults for config.json keys a checkpoint may leave out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
_MISTRAL_DEFAULT_WINDOW = 4096
# RoPE scalings that need the pre-training length; transformers fills it in when absent.
_ROPE_TYPES_WITH_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Buffers older checkpoints saved that carry no learned state (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_NAMES_IN_ERROR = 12
POSITIONAL_KEY = "longctx_positional"  # config.json entry recording the position encoding
log = logging.getLogger(__name__)


def hf_tensor_name(name: str) -> str:
    """Checkpoint name of one of our parameters: ``lm_head.*`` as is, the rest under
    ``model.``."""
    return name if name.startswith("lm_head.") else f"model.{name}"


# ----------------------------------------------------------------------------- config.json


def model_config_from_hf(path_or_dict: str | Path | dict[str, Any]) -> ModelConfig:
    """``ModelConfig`` from a checkpoint directory, its ``config.json``, or that file's dict.

    Accepts model_type llama, mistral and qwen2 (anything else raises ``LongctxError``). A path
    sets ``init = "hf:DIR"`` so that the config records where its weights come from.
    """
    if isinstance(path_or_dict, dict):
        hf, init = path_or_dict, "scratch"
    else:
        config_path = Path(path_or_dict)
        if config_path.is_dir():
            config_path = config_path / "config.json"
        if not config_path.is_file():
            raise LongctxError(
                f"no Hugging Face config at {config_path}; pass a checkpoint directory that "
                "holds config.json (or the config.json file itself)"
            )
        hf, init = json.loads(config_path.read_text()), f"hf:{config_path.parent}"
    arch = hf.get("model_type")
    if arch not in ARCHITECTURE_CLASSES:
        raise LongctxError(
            f"config.json has model_type={arch!r}, which longctx cannot load; supported are "
            f"{sorted(ARCHITECTURE_CLASSES)} (Llama-family decoders)"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in hf]
    if missing:
        raise LongctxError(f"config.json lacks {missing}; add them (they set the model's shape)")
    if hf.get("hidden_act", "silu") != "silu":
        raise LongctxError(
            f"config.json has hidden_act={hf['hidden_act']!r}; the Llama-family MLP here is "
            "SwiGLU, so only 'silu' is supported"
        )
    if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise LongctxError(
            f"llama config.json has attention_bias={hf.get('attention_bias')}, "
            f"mlp_bias={hf.get('mlp_bias')}; biases on o_proj or the MLP are not supported "
            "(only Qwen2's q/k/v bias is)"
        )
    rope_theta, rope_scaling = _rope_from_hf(hf)
    sliding_window, max_window_layers = _window_from_hf(arch, hf)
    return ModelConfig(
        init=init,
        arch=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[arch]),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=arch == "qwen2",  # Qwen2 always has q/k/v biases; Llama/Mistral never
        sliding_window=sliding_window,
        max_window_layers=max_window_layers,
        initializer_range=hf.get("initializer_range", 0.02),
    )


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either config dialect, normalised the way
    transformers normalises it: the type under ``rope_type`` and, for llama3/yarn/longrope,
    ``original_max_position_embeddings`` always present."""
    # transformers gives a legacy rope_scaling precedence over rope_parameters; so do we.
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    nested = [key for key, value in params.items() if isinstance(value, dict)]
    if nested:
        raise LongctxError(
            f"config.json has per-layer rope parameters {nested}; only one RoPE setting for "
            "all layers is supported"
        )
    rope_theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    legacy_type = params.pop("type", "default")
    rope_type = params.pop("rope_type", legacy_type)
    if rope_type == "default":
        return rope_theta, None
    scaling = {"rope_type": rope_type, **params}
    if rope_type in _ROPE_TYPES_WITH_ORIGINAL_LENGTH:
        if "original_max_position_embeddings" in hf:  # Phi3-style top-level key wins
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        scaling.setdefault(
            "original_max_position_embeddings",
            hf.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[hf["model_type"]]),
        )
    return rope_theta, scaling


def _window_from_hf(arch: str, hf: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(sliding_window, max_window_layers)``: Mistral windows every layer (``null`` = none);
    Qwen2 only when ``use_sliding_window``, on the layers from ``max_window_layers`` on."""
    if arch == "llama":
        return None, None
    if arch == "mistral":
        return hf.get("sliding_window", _MISTRAL_DEFAULT_WINDOW), None
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or window is None:
        return None, None
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first_windowed = min(hf.get("max_window_layers", 28), layers)
    else:
        first_windowed = next(
            (i for i, kind in enumerate(layer_types) if kind == "sliding_attention"), layers
        )
        expected = ["full_attention"] * first_windowed + ["sliding_attention"] * (
            layers - first_windowed
        )
        if list(layer_types) != expected:
            raise LongctxError(
                f"qwen2 config.json has layer_types={layer_types}; only full layers followed by "
                "windowed layers (max_window_layers) are supported"
            )
    if first_windowed == layers:
        return None, None
    return window, first_windowed


def hf_config_dict(
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    positional: PositionalConfig | None = None,
) -> dict[str, Any]:
    """The ``config.json`` content transformers loads as the same architecture.

    ``positional`` (when not plain RoPE) is recorded under ``longctx_positional`` for
    ``load_hf``; transformers ignores the key.

    Writes the RoPE settings in both dialects (``rope_parameters`` for transformers >= 5,
    ``rope_theta``/``rope_scaling`` for 4.x). Raises ``LongctxError`` for a config the named
    architecture cannot express (a q/k/v bias outside Qwen2, a per-layer window outside Qwen2).
    """
    arch = config.arch
    if config.attention_bias != (arch == "qwen2"):
        raise LongctxError(
            f"arch={arch!r} with attention_bias={config.attention_bias} has no Hugging Face "
            "equivalent: transformers' Qwen2 always has a q/k/v bias and Llama/Mistral none; "
            "set arch='qwen2' for a bias, 'llama' or 'mistral' without"
        )
    if arch == "llama" and config.sliding_window is not None:
        raise LongctxError(
            f"arch='llama' with sliding_window={config.sliding_window} has no Hugging Face "
            "equivalent; use arch='mistral' (or 'qwen2') for a sliding window"
        )
    if arch == "mistral" and config.max_window_layers:
        raise LongctxError(
            f"arch='mistral' with max_window_layers={config.max_window_layers}: Mistral windows "
            "every layer; use arch='qwen2' for full lower layers"
        )
    rope_scaling = dict(config.rope_scaling) if config.rope_scaling is not None else None
    rope_parameters = {
        **(rope_scaling or {"rope_type": "default"}),
        "rope_theta": config.rope_theta,
    }
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "rope_parameters": rope_parameters,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if positional is not None and positional.kind != "rope":
        out[POSITIONAL_KEY] = positional.model_dump()
    if config.head_dim is not None:  # otherwise transformers derives hidden_size / heads too
        out["head_dim"] = config.head_dim
    if arch == "llama":
        out |= {"attention_bias": False, "mlp_bias": False}
    elif arch == "mistral":
        out["sliding_window"] = config.sliding_window
    else:
        windowed = config.sliding_window is not None
        out |= {
            "use_sliding_window": windowed,
            "sliding_window": config.sliding_window,
            "max_window_layers": (config.max_window_layers or 0)
            if windowed
            else config.num_hidden_layers,
        }
    return out


# ----------------------------------------------------------------------------- weights in


def load_hf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    positional: PositionalConfig | None = None,
    attention: AttentionConfig | None = None,
    config: ModelConfig | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Build a ``Transformer`` from a Hugging Face checkpoint directory, weights in ``dtype``.

    ``config`` (default: the checkpoint's config.json) is the model to build; a context
    extension passes the checkpoint's config with new ``rope_scaling`` /
    ``max_position_embeddings``. ``positional`` defaults to the one recorded in config.json
    (``longctx_positional``), else RoPE. Every parameter must come from the checkpoint, except
    those of modules with ``init_new_parameters()`` (position encodings, variants), which are
    initialised as SPECS.md says when absent and logged by name. Missing and unexpected tensors
    are reported by name in one ``LongctxError`` (rotary ``inv_freq`` buffers are ignored;
    ``lm_head`` may be absent when the embeddings are tied), and a tensor whose shape differs
    from the config's is named with both shapes.
    """
    directory = Path(path)
    config = config or model_config_from_hf(directory)
    positional = positional or _recorded_positional(directory)
    model = empty_model(config, positional, attention, dtype)
    for module in modules_with_new_parameters(model):
        module.init_new_parameters()
    params = {hf_tensor_name(name): p for name, p in model.named_parameters()}
    files = checked_weight_files(directory, model, config)
    with torch.no_grad():
        for file in files:
            for name, tensor in stream_tensors(file):
                if name not in params:
                    continue  # ignored buffer or a tied lm_head copy
                check_tensor_shape(file, name, tuple(tensor.shape), tuple(params[name].shape))
                params[name].copy_(tensor)
                del tensor  # one checkpoint tensor alive at a time beside the model
    return model, config


def checked_weight_files(directory: Path, model: Transformer, config: ModelConfig) -> list[Path]:
    """The weight files of the checkpoint ``directory`` for ``model``, after checking that they
    hold every parameter of ``model`` except new ones (``new_parameter_names``, logged by name)
    and nothing unexpected (``LongctxError`` naming them). Reads only the index or the
    safetensors headers."""
    expected = {hf_tensor_name(name) for name, _ in model.named_parameters()}
    files, names_in_checkpoint = _checkpoint_contents(directory)
    new = sorted(set(new_parameter_names(model)) - names_in_checkpoint)
    _check_names(directory, expected - set(new), names_in_checkpoint, config.tie_word_embeddings)
    if new:
        log.warning(
            "load_hf: %d parameters are not in %s and were initialised as SPECS.md says: %s",
            len(new),
            directory,
            ", ".join(new),
        )
    return files


def check_tensor_shape(
    file: Path, name: str, found: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    """``LongctxError`` naming ``name`` and both shapes when the checkpoint's tensor does not
    have the shape the config implies."""
    if found != expected:
        raise LongctxError(
            f"tensor {name} in {file} has shape {found} but config.json implies {expected}; "
            "the config does not match the weights"
        )


def stream_tensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of one weight file, one tensor read at a time for safetensors (a
    legacy ``.bin`` pickle is read whole, weights-only)."""
    if file.suffix != ".safetensors":
        yield from _read_tensors(file).items()
        return
    with safe_open(file, framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            yield name, handle.get_tensor(name)


def new_parameter_names(model: Transformer) -> list[str]:
    """Checkpoint names of the parameters a checkpoint may lack: those owned by modules with
    ``init_new_parameters()`` (e.g. ``model.layers.0.self_attn.core.score.pos_emb``)."""
    owners = {id(module) for module in modules_with_new_parameters(model)}
    return [
        hf_tensor_name(f"{module_name}.{param_name}" if module_name else param_name)
        for module_name, module in model.named_modules()
        if id(module) in owners
        for param_name, _ in module.named_parameters(recurse=False)
    ]


def modules_with_new_parameters(model: Transformer) -> list[torch.nn.Module]:
    """The modules of ``model`` that own parameters a checkpoint may lack (they have
    ``init_new_parameters()``)."""
    return [m for m in model.modules() if callable(getattr(m, "init_new_parameters", None))]


def _recorded_positional(directory: Path) -> PositionalConfig | None:
    """The position encoding ``save_hf`` recorded in config.json, if any."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    recorded = json.loads(config_file.read_text()).get(POSITIONAL_KEY)
    return None if recorded is None else PositionalConfig.model_validate(recorded)


def empty_model(
    config: ModelConfig,
    positional: PositionalConfig | None = None,
    attention: AttentionConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> Transformer:
    """A ``Transformer`` whose parameters are allocated in ``dtype`` on the CPU but hold no
    values yet, for a caller that overwrites every one of them: ``load_hf`` (from the
    checkpoint or, for new parameters, their module's ``init_new_parameters()``) and
    ``checkpoint.saved_model.build_model`` (a strict ``load_state_dict``).

    Building on the meta device skips the random init and the float32 copy (for an 8B model,
    tens of seconds and 32 GB). The rotary module rebuilds its float32 frequency tables on every
    move or cast, so they come out exact.
    """
    with torch.device("meta"):
        model = Transformer(config, positional, attention)
    model.to(dtype).to_empty(device="cpu")
    if config.tie_word_embeddings:  # to_empty gives each module its own tensor: share again
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _checkpoint_contents(directory: Path) -> tuple[list[Path], set[str]]:
    """The weight files of a checkpoint and the tensor names they hold (from the index or
    the safetensors header, without reading tensor data where the format allows)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = [directory / shard for shard in sorted(set(weight_map.values()))]
            return files, set(weight_map)
    single = directory / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return [single], set(handle.keys())
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return [legacy], set(_read_tensors(legacy))
    raise LongctxError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin next to config.json"
    )


def _read_tensors(file: Path) -> dict[str, Tensor]:
    """A legacy ``pytorch_model.bin``'s state dict, loaded weights-only (never arbitrary code)."""
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise LongctxError(
            f"{file} is a pickle that is not weights-only ({reason}); it is refused because "
            "loading it could run arbitrary code; convert it to safetensors from a trusted copy"
        ) from error
    if not isinstance(tensors, dict):
        raise LongctxError(
            f"{file} holds a {type(tensors).__name__}, not a state dict of named tensors; "
            "save the model's state_dict()"
        )
    return tensors


def _check_names(directory: Path, expected: set[str], found: set[str], tied: bool) -> None:
    optional = {"lm_head.weight"} if tied else set()
    ignored = {name for name in found if name.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - optional - ignored)
    if missing or unexpected:
        raise LongctxError(
            f"checkpoint {directory} does not match its config.json: missing tensors "
            f"{_name_list(missing)}, unexpected tensors {_name_list(unexpected)}; check that "
            "config.json (layers, tie_word_embeddings, model_type) belongs to these weights"
        )


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_ERROR])
    more = len(names) - _MAX_NAMES_IN_ERROR
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"


# ----------------------------------------------------------------------------- weights out


def save_hf(
    model: Transformer, config: ModelConfig, path: str | Path, *, max_shard_bytes: int | None = None
) -> None:
    """Write ``config.json`` and safetensors weights that ``transformers`` loads.

    One ``model.safetensors``, or with ``max_shard_bytes`` shards of at most that size (a larger
    single tensor gets its own shard) plus ``model.safetensors.index.json``. A directory that
    already holds a checkpoint is never touched (``LongctxError`` naming it); config.json is
    written last, so a directory with it is complete.
    """
    directory = Path(path)
    _refuse_existing_checkpoint(directory)
    tied = model.lm_head.weight is model.embed_tokens.weight
    if tied != config.tie_word_embeddings:
        raise LongctxError(
            f"the model's lm_head is {'' if tied else 'not '}tied to its embedding but "
            f"config.tie_word_embeddings={config.tie_word_embeddings}; save with the config the "
            "model was built from"
        )
    # named_parameters lists a tied matrix once (as embed_tokens), which is what HF expects.
    tensors = ((hf_tensor_name(name), p.detach()) for name, p in model.named_parameters())
    dtype = model.embed_tokens.weight.dtype
    directory.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes is None:
        save_file(dict(tensors), directory / "model.safetensors", metadata={"format": "pt"})
    else:
        write_weight_shards(directory, tensors, max_shard_bytes)
    write_hf_config(directory, config, dtype=dtype, positional=model.positional)


def write_hf_config(
    directory: Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    positional: PositionalConfig | None,
) -> None:
    """``config.json`` (``hf_config_dict``) of a model whose weights are stored in ``dtype``;
    written after the weights, so a directory holding it is complete."""
    (directory / "config.json").write_text(
        json.dumps(hf_config_dict(config, dtype=dtype, positional=positional), indent=2) + "\n"
    )


def _refuse_existing_checkpoint(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise LongctxError(f"{directory} is a file; save_hf needs a new or empty directory")
    if not directory.is_dir():
        return
    patterns = ("config.json", "*.safetensors", "*.index.json", "pytorch_model*.bin")
    existing = sorted({f.name for pattern in patterns for f in directory.glob(pattern)})
    if existing:
        raise LongctxError(
            f"{directory} already holds a checkpoint ({', '.join(existing)}); refusing to "
            "overwrite it: save to a new or empty directory"
        )


def write_weight_shards(
    directory: Path,
    tensors: Iterable[tuple[str, Tensor]],
    max_shard_bytes: int,
    *,
    single_file: bool = False,
) -> list[Path]:
    """Stream ``(checkpoint name, tensor)`` pairs into safetensors shards of at most
    ``max_shard_bytes`` (a larger single tensor gets its own shard), in the order given, named
    ``model-0000i-of-0000n.safetensors`` like transformers, plus the
    ``model.safetensors.index.json`` that maps each tensor to its shard. Returns the files.

    Only the shard being filled is held: each full shard is written and dropped before the next
    tensor is taken from ``tensors`` (a generator that reads one tensor at a time keeps the peak
    at one shard plus one tensor). Shards are written under a provisional name and renamed once
    their count is known. ``single_file``: a result of one shard is ``model.safetensors``
    without an index, as transformers writes a model below its shard size.
    """
    provisional: list[tuple[Path, list[str]]] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, Tensor] = {}
    shard_bytes = total = 0

    def flush() -> None:
        path = directory / f".model-{len(provisional) + 1:05d}.safetensors.partial"
        save_file(shard, path, metadata={"format": "pt"})
        provisional.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor.contiguous()
        weight_map[name] = len(provisional)
        shard_bytes += size
        total += size
    if shard or not provisional:
        flush()
    if single_file and len(provisional) == 1:
        final = directory / "model.safetensors"
        provisional[0][0].rename(final)
        return [final]
    count = len(provisional)
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for (path, _), name in zip(provisional, names):
        path.rename(directory / name)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {tensor: names[i] for tensor, i in weight_map.items()},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [directory / name for name in names]
