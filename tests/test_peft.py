"""LoRA / LongLoRA adapters through peft: the recipe section, the adapted model against a dense
reference, and real 2-rank DeepSpeed runs (ring 2 under ZeRO-3, Ulysses 2 under ZeRO-2) that
checkpoint only what trains, resume bit for bit, resume elastically, and export both ways with
transformers / peft logits equal to longctx's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from trainer_helpers import deepspeed_environment, job, make_data, rank_train, tiny_recipe

from longctx.config.recipe import Recipe
from longctx.errors import LongctxError
from longctx.launch.cli import main
from longctx.model import Transformer, save_hf
from longctx.model.adapters import AdapterConfig, attach_adapters, merge_adapters

LONGLORA = {"rank": 4, "alpha": 8.0, "trainable": ["embed", "norm"]}


def _recipe(**sections) -> Recipe:
    base = {
        "model": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64},
        "data": {"tokenizer": {"vocab_size": 320}},
    }
    return Recipe.model_validate({**base, **sections})


@pytest.mark.parametrize(
    ("peft", "words"),
    [
        ({"target_modules": ["q_proj", "query_key_value"]}, "'query_key_value'"),
        ({"rank": 0}, "peft.rank"),
        ({"rank": -2}, "peft.rank"),
        ({"trainable": ["embed", "bias"]}, "peft.trainable"),
    ],
)
def test_bad_peft_sections_are_refused_in_one_line(tmp_path, capsys, peft, words):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(json.dumps({"peft": peft}))
    assert main(["train", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and words in err


def test_target_modules_default_to_the_attention_projections_and_exist():
    recipe = _recipe(peft={})
    assert recipe.adapters.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert _recipe(peft={"enabled": False}).adapters is None
    mlp = _recipe(peft={"target_modules": ["gate_proj", "down_proj"]})
    assert mlp.adapters.target_modules == ["gate_proj", "down_proj"]


def test_a_stage_may_switch_adapters_on_and_off():
    recipe = _recipe(
        stages=[{"name": "full"}, {"name": "lora", "peft": {"rank": 2}}, {"peft": {"enabled": 0}}]
    )
    from longctx.config.stages import plan_stages

    stages = plan_stages(recipe)
    assert [s.recipe.adapters for s in stages][0::2] == [None, None]
    assert stages[1].recipe.adapters.rank == 2


def test_adapted_model_equals_dense_lora_reference_and_merges_exactly():
    """The adapted forward is W x + (alpha / r) B A x per targeted projection (float64 dense
    reference with the same random A, B); merging gives the same function with plain names."""
    recipe = _recipe()
    torch.manual_seed(0)
    model = Transformer(recipe.model, recipe.positional, recipe.attention).double()
    reference = Transformer(recipe.model, recipe.positional, recipe.attention).double()
    reference.load_state_dict(model.state_dict())
    cfg = AdapterConfig(rank=3, alpha=5.0, trainable=["norm"])
    attach_adapters(model, cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero; make the update visible
        for layer, ref_layer in zip(model.layers, reference.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                adapted = getattr(layer.self_attn, proj)
                delta = adapted.lora_B["default"].weight @ adapted.lora_A["default"].weight
                getattr(ref_layer.self_attn, proj).weight += cfg.alpha / cfg.rank * delta
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "norm" in n for n in trained)
    assert not any("embed" in n or "mlp" in n for n in trained)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        expected = reference(ids)
        torch.testing.assert_close(model(ids), expected, rtol=1e-10, atol=1e-10)
        merge_adapters(model)
        torch.testing.assert_close(model(ids), expected, rtol=1e-10, atol=1e-10)
    assert set(model.state_dict()) == set(reference.state_dict())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_peft_format_adapter_loads_onto_the_hf_base_with_equal_logits(tmp_path, tied):
    """LongLoRA tensors (random B, changed embedding and norms) written by
    ``peft_adapter_files`` and loaded by ``PeftModel.from_pretrained`` onto the base saved for
    transformers give the adapted longctx model's logits (a tied head follows the embedding)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longctx.model.adapters import peft_adapter_files

    recipe = _recipe(model={"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
                            "tie_word_embeddings": tied})  # fmt: skip
    torch.manual_seed(1)
    model = Transformer(recipe.model, recipe.positional, recipe.attention)
    save_hf(model, recipe.model, tmp_path / "base")
    cfg = AdapterConfig(rank=4, alpha=8.0, trainable=["embed", "norm"])
    attach_adapters(model, cfg)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    names = {id(t): n for n, t in reversed(model.state_dict(keep_vars=True).items())}
    trained = {names[id(p)]: p.detach() for p in model.parameters() if p.requires_grad}
    peft_adapter_files(
        tmp_path / "adapter", cfg, trained, base_model=str(tmp_path / "base"), tied_embeddings=tied
    )
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(adapted(ids).logits, model.eval()(ids), rtol=0, atol=1e-5)


# ----------------------------------------------------------------- real runs (2 gloo ranks)

STEPS, HALF = 4, 2


class Preempted(Exception):
    pass


def _stop_after_checkpoint(metrics: dict, checkpoint: str | None) -> None:
    if checkpoint is not None:
        raise Preempted(str(metrics["step"]))


def _rank_preempted(rank: int, world: int, one_job: dict) -> int:
    from longctx.trainer.worker import train_worker

    with pytest.raises(Preempted) as stop:
        train_worker(one_job, _stop_after_checkpoint)
    return int(str(stop.value))


def _adapter_recipe(root: Path, name: str, base: Path, **trainer) -> Recipe:
    corpus, tokenizer = root / "data" / "corpus.txt", root / "data" / "tokenizer_320.model"
    raw = tiny_recipe(corpus, tokenizer, root / name, steps=STEPS, **trainer).model_dump(
        mode="json"
    )
    raw["model"] = {"init": f"hf:{base}", "max_position_embeddings": 128}
    raw["peft"] = LONGLORA
    return Recipe.model_validate(raw)


def _layout(recipe: Recipe, **parallel) -> Recipe:
    return recipe.model_copy(update={"parallel": recipe.parallel.model_copy(update=parallel)})


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory) -> dict:
    """Base HF model (tied embeddings); LongLoRA runs of 4 steps: uninterrupted (ring 2,
    ZeRO-3), stopped after step 2 and resumed exactly, and resumed elastically from the same
    step-2 checkpoint under Ulysses 2 and ZeRO-2."""
    root = tmp_path_factory.mktemp("peft")
    corpus, tokenizer = make_data(root / "data")
    base_recipe = tiny_recipe(corpus, tokenizer, root / "unused")
    torch.manual_seed(11)
    config = base_recipe.model.model_copy(update={"tie_word_embeddings": True})
    save_hf(Transformer(config), config, root / "base")
    ring = dict(ring=2, dp=1)
    whole = _layout(
        _adapter_recipe(root, "whole", root / "base", zero_stage=3, ckpt_every=HALF), **ring
    )
    split = _layout(
        _adapter_recipe(root, "split", root / "base", zero_stage=3, ckpt_every=HALF), **ring
    )
    with deepspeed_environment():
        results = run_on_ranks(rank_train, 2, [job(whole)], timeout=900)
        stopped = run_on_ranks(_rank_preempted, 2, job(split), timeout=900)
        resumed = run_on_ranks(rank_train, 2, [job(split, resume="latest")], timeout=900)
    return {
        "root": root,
        "whole": whole,
        "split": split,
        "results": results[0][0],
        "stopped": stopped,
        "resumed": resumed[0][0],
    }


def _tensors(checkpoint: Path, key: str = "param") -> dict[str, torch.Tensor]:
    """A checkpoint's saved tensors (``key``: the weights, or an AdamW moment), assembled from
    its per-rank shards."""
    from longctx.checkpoint.sharded_state import iter_model_tensors

    return dict(iter_model_tensors(checkpoint, key=key))


def _final(run: Recipe) -> Path:
    return Path(run.trainer.run_dir) / "checkpoints" / f"step_{STEPS:06d}"


@pytest.mark.slow
def test_longlora_run_lowers_the_loss_and_saves_only_what_trains(adapter_runs):
    reports = [m for m, _ in adapter_runs["results"]["reports"] if "loss" in m]
    assert reports[-1]["loss"] < reports[0]["loss"]
    final = _final(adapter_runs["whole"])
    model = _tensors(final)
    assert model and all("lora_" in n or "norm" in n or n == "embed_tokens.weight" for n in model)
    assert not any("base_layer" in n or "mlp" in n for n in model)
    for moment in ("exp_avg", "exp_avg_sq"):
        assert _tensors(final, moment).keys() == model.keys() - {"lm_head.weight"}  # tied
    shards = [p for p in final.iterdir() if p.name.startswith("state_r")]
    assert {p.name[: len("state_r00000")] for p in shards} == {"state_r00000", "state_r00001"}
    manifest = json.loads((final / "manifest.json").read_text())
    base = adapter_runs["root"] / "base"
    assert manifest["adapter_base"]["source"] == f"hf:{base.resolve()}"
    assert len(manifest["adapter_base"]["sha256"]) == 64


@pytest.mark.slow
def test_adapter_resume_is_bit_exact(adapter_runs):
    assert adapter_runs["stopped"] == [HALF, HALF]
    whole = _tensors(_final(adapter_runs["whole"]))
    resumed = _tensors(_final(adapter_runs["split"]))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


def _copy_up_to_half(source: Path, target: Path) -> Path:
    """Copy run ``source`` to ``target`` without its final checkpoint; returns the copy's
    step-``HALF`` checkpoint, to resume from."""
    import shutil

    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / f"step_{STEPS:06d}", ignore_errors=True)
    return target / "checkpoints" / f"step_{HALF:06d}"


def _rank_whole_then_resumed(rank: int, world: int, whole: dict, resumed: dict) -> list[dict]:
    """Train ``whole`` to the end, copy its run to ``resumed``'s directory up to step
    ``HALF`` and resume that copy from there: two runs in the same ranks."""
    import torch.distributed as dist

    first = rank_train(rank, world, [whole])[0]
    if rank == 0:
        _copy_up_to_half(Path(whole["run_dir"]), Path(resumed["run_dir"]))
    dist.barrier()
    return [first, rank_train(rank, world, [resumed])[0]]


@pytest.mark.slow
# ZeRO-0 runs in `make test-heavy`: the fixture covers ZeRO-3 and CI keeps ZeRO-2 here
@pytest.mark.parametrize("zero_stage", [pytest.param(0, marks=pytest.mark.heavy), 2])
def test_adapter_resume_is_bit_exact_under_zero_0_and_2(tmp_path, zero_stage):
    """Data parallel 2 under ZeRO-0 and ZeRO-2 (the fixture covers ZeRO-3 under ring 2): the
    run resumed at step 2 ends with the uninterrupted run's adapters and moments, bit for bit."""
    corpus, tokenizer = make_data(tmp_path / "data")
    config = tiny_recipe(corpus, tokenizer, tmp_path / "unused").model
    torch.manual_seed(11)
    save_hf(Transformer(config), config, tmp_path / "base")
    whole = _adapter_recipe(
        tmp_path, "whole", tmp_path / "base", zero_stage=zero_stage, ckpt_every=HALF
    )
    whole = _layout(whole, dp=2)
    resumed = whole.model_copy(deep=True)
    resumed.trainer.run_dir = str(tmp_path / "resumed")
    step_two = tmp_path / "resumed" / "checkpoints" / f"step_{HALF:06d}"
    with deepspeed_environment():
        runs = run_on_ranks(
            _rank_whole_then_resumed, 2, job(whole), job(resumed, resume=str(step_two)), timeout=900
        )[0]
    assert [r["summary"]["step"] for r in runs] == [STEPS, STEPS]
    for key in ("param", "exp_avg", "exp_avg_sq"):
        ours, theirs = _tensors(_final(whole), key), _tensors(_final(resumed), key)
        assert ours.keys() == theirs.keys() and ours
        assert all(torch.equal(ours[n], theirs[n]) for n in ours), key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "zero_stage", "layout"),
    [
        # Ulysses 2 under ZeRO-2 runs in `make test-heavy` (CI: one rank, and Ulysses 2 / ZeRO-3)
        pytest.param(2, 2, {"ring": 1, "ulysses": 2, "dp": 1}, marks=pytest.mark.heavy),
        (1, 0, {"ring": 1, "ulysses": 1, "dp": 1}),
        (2, 3, {"ring": 1, "ulysses": 2, "dp": 1}),
    ],
    ids=["ulysses2-zero2", "one-rank-zero0", "ulysses2-zero3"],
)
def test_adapter_checkpoint_resumes_elastically(adapter_runs, tmp_path, world, zero_stage, layout):
    """The step-2 checkpoint of the ring 2 / ZeRO-3 run continues under Ulysses 2 / ZeRO-2, on
    one rank under ZeRO-0 and under Ulysses 2 / ZeRO-3 (the base partitioned again) with the
    uninterrupted run's losses (fp32, 1e-5)."""
    source = Path(adapter_runs["split"].trainer.run_dir)
    step_two = _copy_up_to_half(source, tmp_path / "elastic")
    recipe = adapter_runs["split"].model_copy(deep=True)
    recipe.trainer.run_dir = str(tmp_path / "elastic")
    recipe.trainer.zero_stage = zero_stage
    recipe = _layout(recipe, **layout)
    with deepspeed_environment():
        result = run_on_ranks(rank_train, world, [job(recipe, resume=str(step_two))], timeout=900)
    result = result[0][0]
    elastic = {m["step"]: m["loss"] for m, _ in result["reports"] if "loss" in m}
    whole = {m["step"]: m["loss"] for m, _ in adapter_runs["results"]["reports"] if "loss" in m}
    assert sorted(elastic) == list(range(HALF + 1, STEPS + 1))
    for step, loss in elastic.items():
        assert loss == pytest.approx(whole[step], rel=1e-5)


@pytest.mark.slow
def test_exports_merged_hf_and_peft_adapter_with_equal_logits(adapter_runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longctx.checkpoint.saved_model import load_trained_model, open_checkpoint

    final = _final(adapter_runs["whole"])
    assert main(["export", str(final), "--hf", str(tmp_path / "hf")]) == 0
    assert main(["export", str(final), "--peft", str(tmp_path / "adapter")]) == 0
    ours = load_trained_model(open_checkpoint(final))
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ours(ids)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(adapter_runs["root"] / "base").eval()
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(adapted(ids).logits, expected, rtol=0, atol=1e-4)
        with adapted.disable_adapter():  # the base alone differs: the adapters did train
            assert not torch.allclose(adapted(ids).logits, expected, atol=1e-3)


@pytest.mark.slow
def test_resuming_adapters_onto_a_different_base_is_refused(adapter_runs, tmp_path, capsys):
    """A different base under the same path (same shape, other weights): exit 2, one line
    naming the checkpoint and both bases, nothing written."""
    import shutil

    root = adapter_runs["root"]
    other = tmp_path / "base"
    shutil.copytree(root / "base", other)
    torch.manual_seed(99)
    config = adapter_runs["whole"].model.model_copy(update={"init": "scratch"})
    (other / "model.safetensors").unlink()
    (other / "config.json").unlink()
    save_hf(Transformer(config), config, other)
    run_dir = tmp_path / "run"
    shutil.copytree(Path(adapter_runs["split"].trainer.run_dir), run_dir)
    recipe = tmp_path / "recipe.yaml"
    raw = adapter_runs["split"].model_dump(mode="json", exclude={"stages"})
    raw["model"] = {"init": f"hf:{other}", "max_position_embeddings": 128}
    raw["trainer"]["run_dir"] = str(run_dir)
    recipe.write_text(json.dumps(raw))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert main(["train", str(recipe), "--resume", "latest", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapters trained on base" in err and str(other) in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    with pytest.raises(LongctxError, match="adapters trained on base"):
        from longctx.checkpoint.saved_model import build_base_model

        manifest = json.loads((_final(adapter_runs["whole"]) / "manifest.json").read_text())
        moved = dict(manifest["adapter_base"], source=f"hf:{other}")
        build_base_model(adapter_runs["whole"], moved, _final(adapter_runs["whole"]))


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a ZeRO-3 model in full (gathered one at a time), by name."""
    import deepspeed

    full = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            full[name] = param.data.detach().clone()
    return full


def _rank_partitioned_merge(rank: int, world: int, recipe_json: dict, checkpoint: str) -> dict:
    """The merged model of adapter ``checkpoint`` built partitioned under ZeRO-3 (what a full
    stage after an adapter stage starts from), gathered."""
    from longctx.checkpoint.saved_model import build_model
    from longctx.trainer.engine import deepspeed_config

    recipe = Recipe.model_validate(recipe_json)
    zero3 = deepspeed_config(recipe.trainer.model_copy(update={"zero_stage": 3}))
    model = build_model(recipe, weights=checkpoint, zero3=zero3)
    return {"unmaterialised": all(p.data.numel() == 0 for p in model.parameters())} | {
        "weights": gathered(model)
    }


@pytest.mark.slow
# ZeRO-1 runs in `make test-heavy`; CI keeps ZeRO-3, where every stage's model is partitioned
@pytest.mark.parametrize("zero_stage", [pytest.param(1, marks=pytest.mark.heavy), 3])
def test_adapter_stage_after_a_full_stage_and_a_full_stage_after_it(tmp_path, zero_stage):
    """full (steps 1-2) -> LoRA on its final weights (3-4) -> full from the merged weights (5),
    keep_last 2: step 3 is pruned, step 2 stays (the kept step-4 adapters name it as their
    base); the merged step-4 model is W + (alpha / r) B A of stage 1's final weights, built
    in one process and, partitioned on 2 ranks, gathered (ZeRO-3 runs build every stage's
    model partitioned)."""
    from longctx.checkpoint.saved_model import load_trained_model, open_checkpoint
    from longctx.checkpoint.store import load_model_state_dict
    from longctx.config.stages import plan_stages

    corpus, tokenizer = make_data(tmp_path / "data")
    raw = tiny_recipe(
        corpus,
        tokenizer,
        tmp_path / "run",
        steps=2,
        ckpt_every=1,
        keep_last=2,
        zero_stage=zero_stage,
    ).model_dump(mode="json")
    lora = {"rank": 4, "alpha": 8.0, "trainable": ["norm"]}
    raw["stages"] = [
        {"name": "full"},
        {"name": "lora", "peft": lora},
        {
            "name": "full-again",
            "peft": {"enabled": False},
            "trainer": {"steps": 1, "warmup_steps": 1},
        },
    ]
    recipe = Recipe.model_validate(raw)
    with deepspeed_environment():
        results = run_on_ranks(
            rank_train,
            2,
            [job(recipe), job(recipe, "latest"), job(recipe, "latest")],
            timeout=900,
        )
    assert [r["summary"]["step"] for r in results[0]] == [2, 4, 5]
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == [
        "step_000002",
        "step_000004",
        "step_000005",
    ]
    manifest = json.loads((root / "step_000004" / "manifest.json").read_text())
    assert manifest["adapter_base"]["source"] == "checkpoint:step_000002"
    assert "adapter_base" not in json.loads((root / "step_000005" / "manifest.json").read_text())
    base = load_model_state_dict(root / "step_000002")
    adapters = load_model_state_dict(root / "step_000004")
    merged = load_trained_model(open_checkpoint(root / "step_000004")).state_dict()
    prefix = "layers.1.self_attn.v_proj"
    delta = (
        adapters[f"{prefix}.lora_B.default.weight"] @ adapters[f"{prefix}.lora_A.default.weight"]
    )
    expected = base[f"{prefix}.weight"] + lora["alpha"] / lora["rank"] * delta
    torch.testing.assert_close(merged[f"{prefix}.weight"], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(
        merged["layers.0.input_layernorm.weight"], adapters["layers.0.input_layernorm.weight"]
    )
    assert torch.equal(merged["layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"])
    full = load_model_state_dict(root / "step_000005")
    assert "layers.0.self_attn.q_proj.weight" in full and not any("lora" in k for k in full)
    if zero_stage == 3:
        last = plan_stages(recipe)[2].recipe.model_dump(mode="json")
        with deepspeed_environment():
            partitioned = run_on_ranks(
                _rank_partitioned_merge, 2, last, str(root / "step_000004"), timeout=900
            )
        expected = dict(
            load_trained_model(open_checkpoint(root / "step_000004")).named_parameters()
        )
        for result in partitioned:
            assert result["unmaterialised"] and result["weights"].keys() == expected.keys()
            for name, tensor in result["weights"].items():
                torch.testing.assert_close(tensor, expected[name].detach(), rtol=1e-6, atol=1e-7)
