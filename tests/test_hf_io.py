"""Hugging Face checkpoints: load_hf / save_hf against transformers itself.

Reference: the logits of the same tiny random checkpoint computed by transformers (fp32, eager
attention) at T = 256. Tolerance: max abs diff 1e-4 on logits of magnitude ~5 (both sides are
fp32 with a different order of operations; the observed gap is at most 3e-5).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_fixtures import (
    MAX_POSITIONS,
    PARITY_LENGTH,
    ROPE_SCALINGS,
    hf_logits,
    load_with_transformers,
    random_tokens,
    save_tiny_hf,
)
from safetensors.torch import load_file, save_file

from longctx.errors import LongctxError
from longctx.model import ModelConfig, hf_config_dict, load_hf, model_config_from_hf, save_hf

LOGIT_ATOL = 1e-4
ARCH_KWARGS = {
    "llama": {},
    "mistral": {"sliding_window": 48},  # smaller than T: the window is active
    "qwen2": {},  # q/k/v biases, randomised by the fixture
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def _our_logits(model, input_ids):
    return model.eval()(input_ids)


@pytest.mark.parametrize("rope", [None, *ROPE_SCALINGS])
@pytest.mark.parametrize("arch", sorted(ARCH_KWARGS))
def test_load_hf_matches_transformers_logits(tmp_path, arch, rope):
    scaling = ROPE_SCALINGS[rope] if rope else None
    directory, hf_model = save_tiny_hf(
        tmp_path / "hf", arch, rope_scaling=scaling, **ARCH_KWARGS[arch]
    )
    model, config = load_hf(directory)
    input_ids = random_tokens(2, PARITY_LENGTH)
    assert config.arch == arch
    assert _max_diff(_our_logits(model, input_ids), hf_logits(hf_model, input_ids)) < LOGIT_ATOL


@pytest.mark.parametrize("rope", sorted(ROPE_SCALINGS))
def test_each_rope_scaling_changes_the_logits_at_the_parity_length(tmp_path, rope):
    """Guards the parity test above: at T = 256 every scaling moves the logits by far more than
    the tolerance, so a scaling that were ignored or wrong could not pass it."""
    _, plain = save_tiny_hf(tmp_path / "plain", "llama")
    _, scaled = save_tiny_hf(tmp_path / "scaled", "llama", rope_scaling=ROPE_SCALINGS[rope])
    input_ids = random_tokens(1, PARITY_LENGTH)
    assert _max_diff(hf_logits(plain, input_ids), hf_logits(scaled, input_ids)) > 100 * LOGIT_ATOL


def test_qwen2_window_on_upper_layers_matches_transformers(tmp_path):
    directory, hf_model = save_tiny_hf(
        tmp_path / "hf", "qwen2", use_sliding_window=True, sliding_window=40, max_window_layers=1
    )
    model, config = load_hf(directory)
    input_ids = random_tokens(1, PARITY_LENGTH)
    assert (config.sliding_window, config.max_window_layers) == (40, 1)
    assert _max_diff(_our_logits(model, input_ids), hf_logits(hf_model, input_ids)) < LOGIT_ATOL


@pytest.mark.parametrize(
    ("arch", "rope", "extra"),
    [
        ("llama", "llama3", {}),
        ("mistral", None, {"sliding_window": 48}),
        (
            "qwen2",
            "yarn",
            {"use_sliding_window": True, "sliding_window": 40, "max_window_layers": 1},
        ),
    ],
)
def test_save_hf_output_loads_in_transformers_with_the_same_logits(tmp_path, arch, rope, extra):
    scaling = ROPE_SCALINGS[rope] if rope else None
    source, _ = save_tiny_hf(tmp_path / "source", arch, rope_scaling=scaling, **extra)
    model, config = load_hf(source)
    save_hf(model, config, tmp_path / "export")
    reloaded = load_with_transformers(tmp_path / "export")
    input_ids = random_tokens(1, PARITY_LENGTH)
    assert type(reloaded).__name__ == hf_config_dict(config)["architectures"][0]
    assert _max_diff(hf_logits(reloaded, input_ids), _our_logits(model, input_ids)) < LOGIT_ATOL


def test_load_hf_builds_the_given_config_around_the_checkpoint_weights(tmp_path):
    """A context extension: weights of a plain checkpoint, RoPE of the recipe (yarn). Same
    seed, same weights: it must equal loading a checkpoint saved with yarn."""
    plain, _ = save_tiny_hf(tmp_path / "plain", "llama")
    with_yarn, _ = save_tiny_hf(tmp_path / "yarn", "llama", rope_scaling=ROPE_SCALINGS["yarn"])
    extended = model_config_from_hf(plain).model_copy(
        update={"rope_scaling": ROPE_SCALINGS["yarn"]}
    )
    model, config = load_hf(plain, config=extended)
    expected, _ = load_hf(with_yarn)
    input_ids = random_tokens(1, PARITY_LENGTH)
    assert config is extended
    assert torch.equal(_our_logits(model, input_ids), _our_logits(expected, input_ids))


def test_sharded_save_round_trips_through_load_hf_and_transformers(tmp_path):
    source, _ = save_tiny_hf(tmp_path / "source", "qwen2")
    model, config = load_hf(source)
    save_hf(model, config, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    reloaded, _ = load_hf(tmp_path / "sharded")
    input_ids = random_tokens(1, 64)
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    for (name, ours), theirs in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(ours, theirs), name
    hf_reloaded = load_with_transformers(tmp_path / "sharded")
    assert _max_diff(hf_logits(hf_reloaded, input_ids), _our_logits(model, input_ids)) < LOGIT_ATOL


def test_load_hf_reads_a_checkpoint_sharded_by_transformers(tmp_path):
    _, hf_model = save_tiny_hf(tmp_path / "unused", "llama")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    model, _ = load_hf(tmp_path / "sharded")
    input_ids = random_tokens(1, 64)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert _max_diff(_our_logits(model, input_ids), hf_logits(hf_model, input_ids)) < LOGIT_ATOL


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama")
    weights = load_file(directory / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    weights["model.rotary_emb.inv_freq"] = torch.ones(8)  # harmless buffer: ignored
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LongctxError) as error:
        load_hf(directory)
    message = str(error.value)
    assert "missing tensors [model.layers.1.mlp.up_proj.weight]" in message
    assert "unexpected tensors [model.layers.1.mlp.extra_proj.weight]" in message
    assert "\n" not in message


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama")
    weights = load_file(directory / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(65)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LongctxError, match=r"model\.norm\.weight .* \(65,\) .* \(64,\)"):
        load_hf(directory)


def test_weights_only_pytorch_bin_loads(tmp_path):
    directory, hf_model = save_tiny_hf(tmp_path / "hf", "mistral", sliding_window=48)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    model, _ = load_hf(directory)
    input_ids = random_tokens(1, 96)
    assert _max_diff(_our_logits(model, input_ids), hf_logits(hf_model, input_ids)) < LOGIT_ATOL


class _ArbitraryObject:
    """Stands for code a malicious pickle would run: weights_only unpickling must refuse it."""


def test_a_pickle_that_is_not_weights_only_is_refused(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama")
    state = dict(load_file(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save({**state, "payload": _ArbitraryObject()}, directory / "pytorch_model.bin")
    with pytest.raises(
        LongctxError, match=r"pytorch_model\.bin is a pickle that is not weights-only"
    ):
        load_hf(directory)


@pytest.mark.parametrize("checkpoint_has_lm_head", [False, True])
def test_tied_embeddings_load_from_transformers(tmp_path, checkpoint_has_lm_head):
    directory, hf_model = save_tiny_hf(tmp_path / "hf", "qwen2", tie_word_embeddings=True)
    if checkpoint_has_lm_head:  # some tied checkpoints carry a redundant copy: ignored
        weights = load_file(directory / "model.safetensors")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    model, config = load_hf(directory)
    input_ids = random_tokens(1, 96)
    assert config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert _max_diff(_our_logits(model, input_ids), hf_logits(hf_model, input_ids)) < LOGIT_ATOL


def test_tied_embeddings_save_for_transformers(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama", tie_word_embeddings=True)
    model, config = load_hf(directory)
    save_hf(model, config, tmp_path / "export")
    reloaded = load_with_transformers(tmp_path / "export")
    input_ids = random_tokens(1, 96)
    assert "lm_head.weight" not in load_file(tmp_path / "export" / "model.safetensors")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert _max_diff(hf_logits(reloaded, input_ids), _our_logits(model, input_ids)) < LOGIT_ATOL


def test_untied_checkpoint_without_lm_head_reports_it_missing(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama")
    weights = load_file(directory / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LongctxError, match=r"missing tensors \[lm_head\.weight\]"):
        load_hf(directory)


def test_save_hf_refuses_a_directory_holding_a_checkpoint_and_leaves_it_intact(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    model, config = load_hf(directory)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    with pytest.raises(LongctxError, match=rf"{directory} already holds a checkpoint"):
        save_hf(model, config, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_save_hf_writes_into_an_existing_empty_directory(tmp_path):
    source, _ = save_tiny_hf(tmp_path / "hf", "llama")
    model, config = load_hf(source)
    (tmp_path / "empty").mkdir()
    save_hf(model, config, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "gpt2"
    with pytest.raises(LongctxError, match=r"model_type='gpt2'.*supported are \['llama'"):
        model_config_from_hf(config)


def test_legacy_and_transformers5_config_forms_give_the_same_model_config(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama", rope_scaling=ROPE_SCALINGS["yarn"])
    new_form = json.loads((directory / "config.json").read_text())
    legacy = {k: v for k, v in new_form.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 10000.0
    legacy["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    expected = model_config_from_hf(new_form)
    assert "rope_parameters" in new_form and "rope_theta" not in new_form  # what 5.x writes
    assert model_config_from_hf(legacy) == expected
    assert expected.rope_scaling == ROPE_SCALINGS["yarn"]


def test_original_length_defaults_to_max_position_embeddings_as_in_transformers():
    hf = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
    }
    assert model_config_from_hf(hf).rope_scaling == {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": MAX_POSITIONS,
    }


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(
            arch="llama",
            vocab_size=50,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        ModelConfig(
            arch="mistral",
            vocab_size=50,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=16,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        ModelConfig(
            arch="qwen2",
            vocab_size=50,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            attention_bias=True,
            tie_word_embeddings=True,
            sliding_window=8,
            max_window_layers=2,
        ),
    ],
    ids=["llama", "mistral", "qwen2"],
)
def test_hf_config_dict_maps_back_to_the_same_model_config(config):
    """Every ModelConfig field survives config.json (kv heads given: config.json always has
    them)."""
    assert model_config_from_hf(hf_config_dict(config)) == config


def test_a_qkv_bias_outside_qwen2_cannot_be_exported():
    config = ModelConfig(arch="llama", vocab_size=50, hidden_size=32, attention_bias=True)
    with pytest.raises(LongctxError, match=r"arch='llama' with attention_bias=True"):
        hf_config_dict(config)


def test_load_hf_casts_weights_to_the_requested_dtype(tmp_path):
    directory, hf_model = save_tiny_hf(tmp_path / "hf", "llama")
    model, _ = load_hf(directory, dtype=torch.bfloat16)
    expected = hf_model.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, expected)


def test_a_directory_without_weights_is_a_clear_error(tmp_path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama")
    shutil.move(directory / "model.safetensors", tmp_path / "elsewhere.safetensors")
    with pytest.raises(LongctxError, match=r"no weights in .*expected model\.safetensors"):
        load_hf(directory)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gradients_match_transformers_in_float64(tmp_path, checkpointing):
    """Every parameter's gradient of a tiled-loss training step equals transformers' autograd
    through its own modules (RMSNorm, RoPE, attention, SwiGLU, loss) in float64, up to the
    float32 rotary tables both sides use; the checkpointed, tiled-MLP form too."""
    from longctx.parallel.apply import TransformPlan, apply_transforms
    from longctx.parallel.loss import tiled_cross_entropy

    directory, hf_model = save_tiny_hf(tmp_path / "hf", "llama")
    model, _ = load_hf(directory)
    plan = TransformPlan(tiled_mlp_chunk=16 if checkpointing else None,
                         activation_checkpointing=checkpointing)  # fmt: skip
    model = apply_transforms(model.double().train(), plan)
    hf_model = hf_model.double().train()
    input_ids = random_tokens(2, PARITY_LENGTH)
    labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    tiled_cross_entropy(model.forward_hidden(input_ids), model.lm_head.weight, labels).backward()
    hf_model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
    hf_grads = {name.removeprefix("model."): p.grad for name, p in hf_model.named_parameters()}
    ours = dict(model.named_parameters())
    assert sorted(ours) == sorted(hf_grads)
    for name, param in ours.items():
        # Both sides build cos/sin in float32 (angles ~1 ulp apart): 1e-6 of the largest entry.
        scale = hf_grads[name].abs().max().item()
        torch.testing.assert_close(param.grad, hf_grads[name], rtol=0, atol=1e-5 * scale, msg=name)
