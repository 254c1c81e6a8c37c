"""The real-model recipes (issue 8 item 4): every one passes ``longctx train RECIPE --dry-run``
from its config.json alone (no weights), its model configs have the published shapes, and the
printed per-GPU memory estimate of one recipe equals a hand calculation written out below.

References:
- the shapes: Hugging Face transformers builds each model from our config.json on the meta
  device (no memory, no weights) and counts its parameters; that count must equal
  ``ModelConfig.num_parameters`` and the published sizes (Llama-2-7B 6.74B, Llama-3(.1)-8B 8.03B,
  Qwen2-7B 7.62B);
- the memory estimate of llama2-7b-yarn-32k: explicit arithmetic of the model in
  ``longctx.launch.plan``'s docstring, term by term, in exact integers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longctx.launch.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    # recipe: (model directory, layout line, tokens per rank line)
    "llama2-7b-yarn-32k": ("llama2-7b", "dp 1 x ulysses 8 x ring 1 = 8 ranks", "1 x 4096"),
    "llama31-8b-128k": ("llama31-8b", "dp 1 x ulysses 8 x ring 1 = 8 ranks", "1 x 16384"),
    "qwen2-7b-128k": ("qwen2-7b", "dp 1 x ulysses 4 x ring 2 = 8 ranks", "1 x 16384"),
    "llama3-8b-1m": ("llama3-8b", "dp 1 x ulysses 8 x ring 8 = 64 ranks", "1 x 16384"),
    "llama2-7b-longlora-32k": ("llama2-7b", "dp 1 x ulysses 2 x ring 1 = 2 ranks", "1 x 16384"),
}
# Published parameter counts (rounded as the model cards give them, in billions).
PUBLISHED_BILLIONS = {"llama2-7b": 6.74, "llama31-8b": 8.03, "llama3-8b": 8.03, "qwen2-7b": 7.62}


def dry_run(recipe: str, capsys, monkeypatch) -> str:
    """stdout of ``longctx train recipes/RECIPE.yaml --dry-run`` run from the repository root
    (the recipes name their config directories relative to it)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("COLUMNS", "200")
    code = main(["train", f"recipes/{recipe}.yaml", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def plan_value(stdout: str, what: str) -> str:
    """The value cell of the plan row ``what``."""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[0] == what:
            return cells[1]
    raise AssertionError(f"no plan row {what!r} in:\n{stdout}")


def plan_bytes(stdout: str, what: str) -> int:
    """The exact byte count ``(N B)`` of the plan row ``what``."""
    return int(re.search(r"\(([\d,]+) B\)", plan_value(stdout, what)).group(1).replace(",", ""))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_real_recipe_dry_run_prints_its_layout_and_memory(recipe, capsys, monkeypatch):
    out = dry_run(recipe, capsys, monkeypatch)
    model_dir, layout, tokens = RECIPES[recipe]
    assert plan_value(out, "world layout") == layout
    assert plan_value(out, "tokens per rank per micro-batch") == tokens
    assert plan_value(out, "precision / ZeRO stage") == "bf16 / 3"
    assert plan_value(out, "activation checkpointing").startswith("on (")
    total_bytes = plan_bytes(out, "memory per rank: total (estimate)")
    assert total_bytes < 80 * 10**9  # each recipe names an 80 GB GPU
    for phase in ("init", "step", "save", "restore"):  # the checkpoint's phases fit as well
        assert plan_bytes(out, f"peak per rank: {phase}") < 80 * 10**9
    assert plan_bytes(out, "peak per rank: step") == total_bytes
    assert f"init: hf:recipes/models/{model_dir}" in out


@pytest.mark.parametrize("model_dir", sorted(PUBLISHED_BILLIONS))
def test_model_config_has_the_published_shape(model_dir):
    """transformers builds the model from config.json on the meta device; its parameter count
    equals ours and the published size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx.model.hf_io import model_config_from_hf

    path = REPO / "recipes" / "models" / model_dir
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    reference = sum(p.numel() for p in model.parameters())
    ours = model_config_from_hf(path).num_parameters()
    assert ours == reference
    assert round(reference / 1e9, 2) == PUBLISHED_BILLIONS[model_dir]


def test_llama31_config_carries_the_llama3_rope_scaling():
    config = json.loads((REPO / "recipes/models/llama31-8b/config.json").read_text())
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert config["max_position_embeddings"] == 131072  # as published (not 8 x 8192)


def test_llama2_yarn_recipe_resolves_factor_8_from_4k_to_32k(capsys, monkeypatch):
    import yaml

    out = dry_run("llama2-7b-yarn-32k", capsys, monkeypatch)
    resolved = yaml.safe_load(out.partition("plan for '")[0])
    assert resolved["model"]["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 4096,
    }
    assert resolved["model"]["max_position_embeddings"] == 32768 == 8 * 4096
    assert resolved["data"]["seq_len"] == 32768
    assert resolved["model"]["hidden_size"] == 4096  # from config.json


def test_llama2_yarn_memory_estimate_equals_the_hand_calculation(capsys, monkeypatch):
    """llama2-7b-yarn-32k on 8 ranks (Ulysses 8), ZeRO-3, bf16, activation checkpointing,
    micro-batch 1 x 32768 tokens -> t = 4096 tokens per rank."""
    # Llama-2-7B: V 32000, d 4096, I 11008, L 32, Hq = Hkv = 32, head dim 128.
    # World 8, t = 32768 / 8 = 4096 tokens per rank.
    # Parameters: per layer q,o 2*4096*4096 + k,v 2*4096*4096 + MLP 3*4096*11008 + 2 norms.
    per_layer_params = 33_554_432 + 33_554_432 + 135_266_304 + 8192
    assert per_layer_params == 202_383_360
    params = 32 * 202_383_360 + 2 * 32000 * 4096 + 4096
    assert params == 6_738_415_616
    # ZeRO-3 over 8 ranks, bf16: weights 2 B, gradients 2 B, optimizer 12 B per parameter / 8.
    weights = 6_738_415_616 * 2 // 8
    gradients = 6_738_415_616 * 2 // 8
    optimizer = 6_738_415_616 * 12 // 8
    assert (weights, optimizer) == (1_684_603_904, 10_107_623_424)
    # DeepSpeed default buffers: reduce bucket 5e8 x 2 B + stage-3 live parameters 1e9 x 2 B.
    zero_buffers = 500_000_000 * 2 + 1_000_000_000 * 2
    # Activations with checkpointing, bf16 (2 B): each layer's input (d per token) and attention
    # output (Hq hd = 4096) for 32 layers, one layer's full set while it is recomputed (4d +
    # 2 Hq hd + 2 Hkv hd + 4 I = 76800 per token), the final hidden state (d); plus one fp32
    # logits chunk of 2^25 // V = 1048 tokens x V.
    full_layer = 4 * 4096 + 2 * 32 * 128 + 2 * 32 * 128 + 4 * 11008
    assert full_layer == 76_800
    activations = 4096 * (32 * (4096 + 4096) + 76_800 + 4096) * 2 + 1048 * 32000 * 4
    assert activations == 2_944_327_680
    # Attention: fp32 out + lse accumulators t x 32 x (128 + 1) x 4 B; Ulysses 8 copies q, out
    # (32 heads) and k, v (32 kv heads, no replication since 8 divides 32): t x 128 x 128 x 2 B.
    attention = 4096 * 32 * 129 * 4 + 4096 * (2 * 32 + 2 * 32) * 128 * 2
    assert attention == 201_850_880
    # Loss gradients (the logits gradient lives in the logits chunk): the fp32 LM-head gradient
    # accumulator and the head's fp32 copy, 2 x 32000 x 4096 x 4 B, and one chunk's bf16 matmul
    # output before its cast (1048 x 32000 x 2 B).
    loss = 2 * 32000 * 4096 * 4 + 1048 * 32000 * 2
    assert loss == 1_115_648_000
    total = weights + gradients + optimizer + zero_buffers + activations + attention + loss
    assert total == 20_738_657_792  # 19.31 GiB

    out = dry_run("llama2-7b-yarn-32k", capsys, monkeypatch)
    assert plan_value(out, "parameters") == "6,738,415,616 (6.7B)"
    assert plan_value(out, "memory per rank: weights") == "1.6 GiB"
    assert plan_value(out, "memory per rank: gradients") == "1.6 GiB"
    assert plan_value(out, "memory per rank: optimizer") == "9.4 GiB"
    assert plan_value(out, "memory per rank: ZeRO buffers") == "2.8 GiB"
    assert plan_value(out, "memory per rank: activations") == "2.7 GiB"
    assert plan_value(out, "memory per rank: attention workspace") == "192.5 MiB"
    assert plan_value(out, "memory per rank: loss workspace") == "1.0 GiB"
    assert plan_value(out, "memory per rank: total (estimate)") == "19.3 GiB (20,738,657,792 B)"


def test_llama2_yarn_phase_peaks_equal_the_hand_calculation(capsys, monkeypatch):
    """Init from the Hugging Face weights under ZeRO-3: the bf16 partition of the weights plus
    one full tensor (the [32000, 4096] embedding, the largest); save and restore: the step peak
    (20,738,657,792 B above) plus 1/8 of the full fp32 state (12 B per parameter) plus 256 MiB."""
    params, world = 6_738_415_616, 8
    embedding = 32000 * 4096
    assert embedding > 11008 * 4096  # larger than an MLP matrix
    init = params * 2 // world + embedding * 2
    assert init == 1_946_747_904
    save = 20_738_657_792 + params * 12 // world + 256 * 2**20
    assert save == 31_114_716_672  # 29.0 GiB, under the recipe's 80 GB GPU

    out = dry_run("llama2-7b-yarn-32k", capsys, monkeypatch)
    assert plan_bytes(out, "peak per rank: init") == init
    assert plan_bytes(out, "peak per rank: step") == 20_738_657_792
    assert plan_bytes(out, "peak per rank: save") == save
    assert plan_bytes(out, "peak per rank: restore") == save
