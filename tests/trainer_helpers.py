"""Shared pieces of the trainer and checkpoint tests: a tiny corpus and tokenizer, a tiny
recipe, rank functions that run ``train_worker`` on gloo ranks, and directory snapshots.

The model is 2 layers, hidden 64, vocab 320; sequences are 64 tokens of generated English
filler; a DeepSpeed step takes milliseconds, so each multi-rank test is dominated by process
start-up and DeepSpeed's import (a few seconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
from harness import run_on_ranks

from longctx.config.recipe import Recipe
from longctx.data import train_tokenizer
from longctx.data.filler import filler_sentences

VENV = Path(__file__).resolve().parents[1] / ".venv"
TOKENIZER_VOCAB = 320


def logged_steps(output: str) -> list[int]:
    """Step numbers of rank 0's progress lines (``step 3/12 loss ...``)."""
    steps = []
    for line in output.splitlines():
        words = line.split()
        for index, word in enumerate(words[:-1]):
            if word == "step" and "/" in words[index + 1] and words[index + 2] == "loss":
                steps.append(int(words[index + 1].split("/")[0]))
    return steps


def deepspeed_env() -> dict[str, str]:
    """Environment for DeepSpeed on CPU with its compiled comm op cached in the venv."""
    return {
        "DS_ACCELERATOR": "cpu",
        # a directory already chosen wins (the venv's is shared by every checkout of the repo)
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(VENV / "torch_extensions")
        ),
    }


def write_corpus(directory: Path, documents: int = 120, seed: int = 0) -> Path:
    """A .txt corpus of generated filler paragraphs (blank-line separated documents)."""
    rng = np.random.default_rng(seed)
    sentences = filler_sentences(rng, documents * 12)
    paragraphs = [" ".join(sentences[i : i + 12]) for i in range(0, len(sentences), 12)]
    path = directory / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def make_data(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> tuple[Path, Path]:
    """(corpus path, tokenizer path) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(directory)
    tokenizer = directory / f"tokenizer_{vocab_size}.model"
    train_tokenizer([str(corpus)], vocab_size, str(tokenizer))
    return corpus, tokenizer


def tiny_recipe(
    corpus: Path, tokenizer: Path, run_dir: Path, *, model_vocab: int = TOKENIZER_VOCAB, **trainer
) -> Recipe:
    """A tiny valid recipe; ``trainer`` keyword arguments override trainer fields."""
    trainer_fields = {
        "run_dir": str(run_dir),
        "seed": 3,
        "steps": 6,
        "micro_batch_size": 2,
        "grad_accum": 2,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "zero_stage": 0,
        "log_every": 1,
        "eval_every": 3,
        "eval_batches": 2,
        "ckpt_every": 3,
        "keep_last": 2,
        **trainer,
    }
    return Recipe.model_validate(
        {
            "name": "trainer-test",
            "model": {
                "vocab_size": model_vocab,
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
            },
            "attention": {"backend": "auto", "chunk_size": 32},
            "data": {
                "sources": [str(corpus)],
                "tasks": {"text": 1.0},
                "seq_len": 64,
                "tokenizer": {"path": str(tokenizer)},
                "eval_fraction": 0.1,
            },
            "trainer": trainer_fields,
        }
    )


def job(recipe: Recipe, resume: str | None = None) -> dict:
    """A ``train_worker`` job for ``recipe``."""
    return {
        "recipe": recipe.model_dump(mode="json"),
        "run_dir": recipe.trainer.run_dir,
        "resume": resume,
    }


def rank_train(rank: int, world: int, jobs: list[dict]) -> list[dict]:
    """Run ``train_worker`` for each job in turn on this rank; collect what happened.

    Per job: ``{"summary", "reports": [(metrics, checkpoint_dir), ...]}``, or ``{"error":
    message}`` when it raised ``LongctxError``. A job ``{"digest": DIR}`` records
    ``tree_digest(DIR)`` instead (taken between the other jobs, after a barrier).
    """
    import torch.distributed as dist

    from longctx.errors import LongctxError
    from longctx.trainer.worker import train_worker

    results = []
    for one_job in jobs:
        if "digest" in one_job:
            dist.barrier()
            results.append({"digest": tree_digest(Path(one_job["digest"]))})
            continue
        reports: list[tuple[dict, str | None]] = []
        try:
            summary = train_worker(one_job, lambda m, c, sink=reports: sink.append((m, c)))
        except LongctxError as error:
            results.append({"error": str(error)})
            continue
        results.append({"summary": summary, "reports": reports})
    return results


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path: equal digests = nothing changed."""
    if not root.exists():
        return {}
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@contextlib.contextmanager
def deepspeed_environment():
    """Set ``deepspeed_env()`` for the ranks spawned inside the block, then restore."""
    saved = {key: os.environ.get(key) for key in deepspeed_env()}
    os.environ.update(deepspeed_env())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_on_ranks(jobs: list[dict], world: int = 2) -> list[list[dict]]:
    """``rank_train(jobs)`` on ``world`` spawned gloo ranks: per rank, per job, the summary and
    reports (or the ``LongctxError`` message under ``"error"``)."""
    with deepspeed_environment():
        return run_on_ranks(rank_train, world, jobs)


_FINISHED_RUNS: dict[str, dict] = {}


def finished_run(tmp_path_factory) -> dict:
    """A 2-rank ZeRO-2 run of 6 steps, checkpoints every 2 steps, the last 2 kept, followed
    (same ranks) by a second launch into the same run directory without ``--resume``, which must
    be refused. Made once per test session and shared read-only; tests that damage it copy it.

    Keys: ``root`` (data and run), ``run_dir``, ``corpus``, ``tokenizer``, ``recipe`` and
    ``results``: per rank, [the run, run-directory digest, the refused launch, digest again].
    """
    if "zero2" not in _FINISHED_RUNS:
        root = tmp_path_factory.mktemp("finished_run")
        corpus, tokenizer = make_data(root / "data")
        recipe = tiny_recipe(
            corpus, tokenizer, root / "run", zero_stage=2, steps=6, ckpt_every=2, eval_every=3
        )
        digest = {"digest": str(root / "run")}
        results = train_on_ranks([job(recipe), digest, job(recipe), digest])
        _FINISHED_RUNS["zero2"] = {
            "root": root,
            "run_dir": root / "run",
            "corpus": corpus,
            "tokenizer": tokenizer,
            "recipe": recipe,
            "results": results,
        }
    return _FINISHED_RUNS["zero2"]
