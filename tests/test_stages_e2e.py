"""A context extension end to end, as a user runs it: a tiny saved Hugging Face checkpoint (with
its tokenizer.model) extended by a two-stage recipe on 2 Ray workers, stopped at the stage
boundary and resumed by a second invocation, then ``longctx eval`` and ``longctx export --hf``.

Stage 1 trains the checkpoint at 64 tokens, data parallel over the 2 workers. Stage 2 trains the
stage-1 weights at 256 tokens with a YaRN rope_scaling (factor 4 over 64 positions) and ring
attention over the same 2 workers (dp 1). References: the stage ranges and files the recipe
implies, Ray Train's pointer to each checkpoint, the manifests' token counts, and transformers
itself loading the export (logits equal longctx's, fp32, 1e-4). This is CI's end-to-end run of
``longctx train`` on Ray, with its resume by a second invocation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hf_fixtures import hf_logits, load_with_transformers, random_tokens, save_tiny_hf
from trainer_helpers import logged_steps, make_data

from longctx.checkpoint.saved_model import load_trained_model, open_checkpoint
from longctx.launch.train import loss_curve

pytestmark = pytest.mark.slow  # three Ray launches of DeepSpeed workers, eval and export (~90 s)

REPO = Path(__file__).resolve().parents[1]
LONGCTX = Path(sys.executable).parent / "longctx"
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def longctx(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``longctx ARGS`` in ``cwd``, output captured."""
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [str(LONGCTX), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def extension_recipe(hf_dir: Path, corpus: Path, run_dir: Path) -> dict:
    return {
        "name": "extend-e2e",
        "model": {"init": f"hf:{hf_dir}"},
        "attention": {"chunk_size": 32},
        "data": {"sources": [str(corpus)], "tasks": {"text": 1.0}, "seq_len": 64},
        "trainer": {
            "run_dir": str(run_dir),
            "steps": 4,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 1,
            "log_every": 1,
            "eval_every": 0,
            "ckpt_every": 4,
            "keep_last": 5,
        },
        "stages": [
            {"name": "short"},
            {
                "name": "extend",
                "data": {"seq_len": 256},
                "model": {"rope_scaling": YARN, "max_position_embeddings": 256},
                "parallel": {"ring": 2},
                "trainer": {"steps": 3, "micro_batch_size": 1},
            },
        ],
    }


def test_two_stage_extension_from_hf_resumes_at_the_boundary_and_exports(tmp_path: Path):
    corpus, tokenizer = make_data(tmp_path / "data")
    hf_dir, _ = save_tiny_hf(tmp_path / "hf", "llama", vocab_size=512, max_position_embeddings=64)
    shutil.copyfile(tokenizer, hf_dir / "tokenizer.model")
    run_dir = tmp_path / "run"
    recipe = tmp_path / "extend.yaml"
    recipe.write_text(yaml.safe_dump(extension_recipe(hf_dir, corpus, run_dir)))

    first = longctx(["train", str(recipe), "--workers", "2", "--until-stage", "1"], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert logged_steps(first.stdout) == [1, 2, 3, 4]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_000004"
    assert json.loads((run_dir / "stages.json").read_text())["current"] == 0
    assert "--resume latest" in first.stdout  # the command that trains stage 2
    assert f"checkpoints:  {checkpoints.relative_to(tmp_path)}" in first.stdout
    assert "tensorboard --logdir" in first.stdout
    boundary = checkpoints / "step_000004"
    first_manifest = json.loads((boundary / "manifest.json").read_text())
    assert (first_manifest["step"], first_manifest["world_size"]) == (4, 2)
    assert first_manifest["tokens_seen"] == 4 * 2 * 2 * 64  # steps x dp x micro batch x seq_len
    # Ray Train holds a pointer to the real checkpoint (no copy of the weights).
    pointers = list((run_dir / "ray").glob("launch-*/step_000004/longctx_checkpoint.json"))
    assert len(pointers) == 1
    assert json.loads(pointers[0].read_text())["path"] == str(boundary)
    # the checkpoint's own tokenizer.model came from the hf: directory
    assert (boundary / "tokenizer.model").read_bytes() == tokenizer.read_bytes()

    second = longctx(["train", str(recipe), "--workers", "2", "--resume", "latest"], tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "stage 2/2 'extend': steps 5-7, seq_len 256, rope_scaling yarn x4" in second.stdout
    assert "dp 1 x ulysses 1 x ring 2 = 2 ranks" in second.stdout
    assert logged_steps(second.stdout) == [5, 6, 7]
    assert (checkpoints / "latest").read_text().strip() == "step_000007"
    final_manifest = json.loads((checkpoints / "step_000007" / "manifest.json").read_text())
    assert final_manifest["tokens_seen"] == first_manifest["tokens_seen"] + 3 * 1 * 1 * 256
    assert json.loads((run_dir / "stages.json").read_text())["current"] == 1
    # TensorBoard steps are global: stage 2 continues the curve at step 5
    assert [step for step, _ in loss_curve(run_dir / "tensorboard")] == list(range(1, 8))

    evaluated = longctx(["eval", str(run_dir), "--task", "ppl", "--lengths", "256"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    ppl = json.loads((run_dir / "eval" / "step_000007" / "ppl.json").read_text())
    assert ppl["results"][0]["length"] == 256

    out = tmp_path / "export"
    exported = longctx(["export", str(run_dir), "--hf", str(out)], tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 256
    assert config["rope_scaling"] == YARN
    reference = load_with_transformers(out)
    saved = open_checkpoint(run_dir)
    input_ids = random_tokens(2, 256, vocab=512)  # past YaRN's 64 original positions
    with torch.no_grad():
        ours = load_trained_model(saved)(input_ids)
    torch.testing.assert_close(hf_logits(reference, input_ids), ours, rtol=1e-4, atol=1e-4)
