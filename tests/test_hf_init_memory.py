"""Model init from Hugging Face weights without a full copy per rank, and the streaming shard
writer behind ``longctx export --hf``.

References: transformers' logits of a tiny random Llama saved with ``save_pretrained`` into
several safetensors shards with an index; ZeRO-3's partition arithmetic
(``ceil(numel / W)`` flat elements per rank) for the structural memory checks: the bytes a rank
reads from the checkpoint are its partition plus at most two partial rows per tensor, and no
parameter is materialised in full after loading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from harness import run_on_ranks
from hf_fixtures import hf_logits, random_tokens, tiny_hf_model
from trainer_helpers import deepspeed_env

from longctx.checkpoint.saved_model import build_model
from longctx.config.recipe import Recipe
from longctx.model.hf_io import write_weight_shards
from longctx.parallel.zero_init import build_partitioned_hf, partition_range
from longctx.trainer.engine import build_engine, deepspeed_config


def sharded_llama(directory: Path):
    """A tiny random Llama saved by transformers in several shards; (directory, model)."""
    model = tiny_hf_model("llama", seed=5)
    model.save_pretrained(directory, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 2
    return directory, model


def hf_recipe(path: Path, **trainer) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"init": f"hf:{path}"},
            "data": {"tokenizer": {"path": str(path)}},
            "trainer": {"micro_batch_size": 1, "grad_accum": 1, **trainer},
        }
    )


def _zero3_rank(rank: int, world: int, directory: Path, input_ids: torch.Tensor) -> dict:
    import os

    for key, value in deepspeed_env().items():
        os.environ.setdefault(key, value)
    recipe = hf_recipe(directory, zero_stage=3)
    model, load = build_partitioned_hf(
        directory,
        recipe.model,
        recipe.positional,
        recipe.attention,
        deepspeed_config(recipe.trainer),
    )
    params = list(model.parameters())
    unmaterialised = all(p.data.numel() == 0 for p in params)
    partitions_ok = all(p.ds_tensor.numel() == math.ceil(p.ds_numel / world) for p in params)
    rows = [math.prod(p.ds_shape[1:]) * 4 for p in params]
    engine = build_engine(model, recipe.trainer)
    engine.module.model.eval()
    with torch.no_grad():
        logits = engine.module.model(input_ids)
    engine.module.model.train()  # one optimizer step: the engine trains the partitioned model
    labels = torch.roll(input_ids, -1, dims=1)
    loss = engine(input_ids[:1], labels[:1])
    engine.backward(loss)
    engine.step()
    return {
        "logits": logits,
        "loss": float(loss),
        "load": load,
        "unmaterialised": unmaterialised,
        "partitions_ok": partitions_ok,
        "model_bytes": sum(p.ds_numel * 4 for p in params),
        "two_rows_per_tensor": 2 * sum(rows),
        "largest_tensor": max(p.ds_numel * 4 for p in params),
    }


@pytest.mark.slow
def test_zero3_init_reads_each_ranks_partition_only_with_transformers_logits(tmp_path):
    directory, reference = sharded_llama(tmp_path / "hf")
    input_ids = random_tokens(2, 24)
    results = run_on_ranks(_zero3_rank, 2, directory, input_ids)
    expected = hf_logits(reference, input_ids)
    for result in results:
        torch.testing.assert_close(result["logits"], expected, rtol=1e-5, atol=1e-5)
        load = result["load"]
        assert result["unmaterialised"] and result["partitions_ok"]
        assert math.isfinite(result["loss"])
        # each rank holds half the model (ceil per tensor) and read only that from disk,
        # plus at most two partial rows per tensor: never the whole model
        assert load.partition_bytes <= result["model_bytes"] / 2 + 4 * 64
        assert load.bytes_read <= load.partition_bytes + result["two_rows_per_tensor"]
        assert load.bytes_read < 0.6 * result["model_bytes"]
        assert load.largest_read_bytes <= result["largest_tensor"] / 2 + 2 * 64 * 4
    assert sum(r["load"].bytes_read for r in results) >= results[0]["model_bytes"]


def test_partition_ranges_tile_the_flat_parameter_like_zero3():
    for numel, world in [(10, 4), (12, 4), (7, 2), (3, 4)]:
        ranges = [partition_range(numel, rank, world) for rank in range(world)]
        size = math.ceil(numel / world)
        assert [start for start, _ in ranges] == [min(size * r, numel) for r in range(world)]
        assert sum(count for _, count in ranges) == numel


def test_hf_init_under_zero_0_2_reads_one_tensor_at_a_time_in_the_training_dtype(
    tmp_path, monkeypatch
):
    """One copy, in bf16, filled from ``safe_open`` tensor by tensor: the whole-file reader
    (which would put a second full fp32 copy beside the model) is never called."""
    directory = tmp_path / "hf"
    reference = tiny_hf_model("llama", seed=5)
    reference.save_pretrained(directory)  # one model.safetensors holding everything

    def whole_file(*args, **kwargs):
        raise AssertionError("a whole checkpoint file was loaded at once")

    monkeypatch.setattr(safetensors.torch, "load_file", whole_file)
    model = build_model(hf_recipe(directory, dtype="bf16"), dtype=torch.bfloat16)
    weights = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16
        expected = weights[name if name.startswith("lm_head") else f"model.{name}"]
        assert torch.equal(param, expected.to(torch.bfloat16))


def test_shard_writer_writes_each_full_shard_before_taking_the_next_tensor(tmp_path):
    """The writer holds at most one shard: when the generator is asked for tensor k, every
    shard completed before it is already on disk; the result is transformers' layout."""
    tensors = {
        f"t{i}": torch.randn(50 + i, 10, generator=torch.Generator().manual_seed(i))
        for i in range(7)
    }
    on_disk_when_asked: list[int] = []

    def stream():
        for name, tensor in tensors.items():
            on_disk_when_asked.append(len(list(tmp_path.glob(".model-*.partial"))))
            yield name, tensor

    files = write_weight_shards(tmp_path, stream(), max_shard_bytes=4_500)
    # 2,000-2,240 bytes each: two per shard, so a shard is flushed before tensors 2, 4, 6
    assert on_disk_when_asked == [0, 0, 0, 1, 1, 2, 2]
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    for name, tensor in tensors.items():
        shard = safetensors.torch.load_file(tmp_path / index["weight_map"][name])
        assert torch.equal(shard[name], tensor)
