"""Sequence parallelism through the trainer: the real engine, loop and worker under
``parallel: {dp, ulysses, ring}`` equal one process on the full batch.

References (all single-process fp32 runs of the same trainer code, no sequence parallelism):

- two DeepSpeed steps (ZeRO-2 on CPU, ``build_engine`` + ``train_step`` + the logged loss of
  ``IntervalStats``) on 4 gloo ranks as dp 2 x ring 2 against the trainer's loss module,
  AdamW and schedule in one process on both sequences: logged loss, every parameter's gradient
  (``safe_get_full_grad``) and the weights after two steps;
- ``train_worker`` for 5 fp32 steps on 2 ranks in ring mode (ring 2) against 1 rank: the logged
  loss curve, the final evaluation loss and the token count (each SP group counted once);
- a checkpoint's manifest records its layout; resuming it under another one is refused;
- the CLI's bad inputs (world size, heads over Ulysses, a variant that ring attention does
  not serve): one line on stderr, exit 2, before any worker starts.

Tolerance: rtol 1e-5 with an absolute floor of 1e-6 (fp32; the sharded and the full runs add
the same terms in a different order, and some gradients are near zero); weights after two AdamW
steps: an absolute floor of 2e-3 x lr (see that test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from trainer_helpers import deepspeed_environment, job, make_data, tiny_recipe, train_on_ranks

from longctx.checkpoint.store import check_recipe_compatible, sequence_parallel_layout
from longctx.config.recipe import Recipe
from longctx.errors import LongctxError
from longctx.launch.cli import main
from longctx.parallel.config import ParallelConfig

RTOL, ATOL = 1e-5, 1e-6
ENGINE_LR = 1e-2
VOCAB, SEQ_LEN = 67, 48


def _model_fields() -> dict:
    return {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,
    }


def _batch() -> dict[str, torch.Tensor]:
    """Two packed sequences: tokens, pre-shifted labels (one unscored per row, so both rows
    score the same number of tokens and the data-parallel mean equals the pooled mean), RoPE
    positions restarting at a document boundary, doc ids."""
    gen = torch.Generator().manual_seed(5)
    boundary = torch.tensor([[17], [30]])
    doc_ids = (torch.arange(SEQ_LEN) >= boundary).long()  # [2, T]
    position_ids = torch.where(
        doc_ids == 1, torch.arange(SEQ_LEN) - boundary, torch.arange(SEQ_LEN)
    )
    labels = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=gen)
    labels[:, -1] = -100
    return {
        "input_ids": torch.randint(0, VOCAB, (2, SEQ_LEN), generator=gen),
        "labels": labels,
        "position_ids": position_ids,
        "doc_ids": doc_ids,
    }


def _trainer_config(micro_batch_size: int, zero_stage: int):
    from longctx.config.recipe import TrainerConfig

    return TrainerConfig(
        steps=2,
        micro_batch_size=micro_batch_size,
        lr=ENGINE_LR,
        min_lr=1e-3,
        warmup_steps=1,
        zero_stage=zero_stage,
    )


def _reference_steps() -> dict:
    """Two steps of the trainer's loss module, optimizer and schedule in this process alone
    (no DeepSpeed, no mesh) on both sequences of ``_batch()``: the single-process reference."""
    from longctx.model import ModelConfig, Transformer
    from longctx.trainer.engine import ModelWithLoss, build_optimizer, warmup_cosine_schedule

    cfg = _trainer_config(2, zero_stage=0)  # GuardedAdamW: clips like DeepSpeed's ZeRO-2
    torch.manual_seed(0)
    module = ModelWithLoss(Transformer(ModelConfig(**_model_fields())), zero_stage=0)
    optimizer = build_optimizer(module, cfg)
    schedule = warmup_cosine_schedule(optimizer, cfg)
    losses, grads = [], {}
    for step in range(2):
        optimizer.zero_grad()
        loss = module(**_batch())
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    return {"losses": losses, "grads": grads, "weights": weights}


def _sharded_steps(rank: int, world: int) -> dict:
    """Two optimizer steps through the trainer's DeepSpeed engine (ZeRO-2) under dp 2 x ring 2
    on this rank's zigzag shard of its dp group's sequence of ``_batch()``; rank 0 also runs
    ``_reference_steps``.

    Step 1 is run by hand to read the full gradients between backward and step; step 2 goes
    through ``train_step``. Returns the logged loss (``IntervalStats``) of each step, the
    step-1 gradients and the weights after step 2.
    """
    from deepspeed.utils import safe_get_full_grad

    from longctx.model import ModelConfig, Transformer
    from longctx.parallel.apply import TransformPlan, apply_transforms
    from longctx.parallel.batch import prepare_batch
    from longctx.parallel.config import ParallelConfig
    from longctx.parallel.mesh import build_mesh
    from longctx.trainer.engine import build_engine
    from longctx.trainer.loop import IntervalStats, StepResult, train_step

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**_model_fields()))
    mesh = build_mesh(ParallelConfig(dp=2, ulysses=1, ring=2))
    apply_transforms(model, TransformPlan(mesh=mesh))
    rows = slice(mesh.dp_rank, mesh.dp_rank + 1)  # one sequence per dp group
    batch = prepare_batch({name: value[rows] for name, value in _batch().items()}, mesh=mesh)
    engine = build_engine(model, _trainer_config(1, zero_stage=2), sp_group=mesh.sp_group)
    names = [name for name, _ in engine.module.model.named_parameters()]

    stats = IntervalStats(torch.device("cpu"))
    loss = engine(**batch)
    engine.backward(loss)
    grads = {
        name: safe_get_full_grad(param).clone()
        for name, param in engine.module.model.named_parameters()
    }
    engine.step()
    stats.add(StepResult(loss.detach(), 1, engine.was_step_applied(), 0.0), 1.0, 1)
    losses = [stats.summary()["loss"]]
    stats.reset()
    stats.add(train_step(engine, iter([batch]), 1), 1.0, 1)
    losses.append(stats.summary()["loss"])
    weights = {
        name: param.detach().clone()
        for name, param in zip(names, engine.module.model.parameters(), strict=True)
    }
    result = {"losses": losses, "grads": grads, "weights": weights}
    return {"sharded": result, "reference": _reference_steps() if rank == 0 else None}


@pytest.fixture(scope="module")
def engine_runs():
    with deepspeed_environment():
        results = run_on_ranks(_sharded_steps, 4)
    return results[0]["reference"], [result["sharded"] for result in results]


def test_dp2_ring2_step_logs_the_single_process_loss(engine_runs):
    reference, sharded = engine_runs
    for rank_result in sharded:
        torch.testing.assert_close(
            torch.tensor(rank_result["losses"]),
            torch.tensor(reference["losses"]),
            rtol=RTOL,
            atol=ATOL,
        )


def test_dp2_ring2_gradients_equal_the_single_process_gradients(engine_runs):
    reference, sharded = engine_runs
    for rank_result in sharded:
        assert rank_result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(rank_result["grads"][name], grad, rtol=RTOL, atol=ATOL)


def test_dp2_ring2_weights_after_two_steps_equal_the_single_process_weights(engine_runs):
    # AdamW divides each gradient by its running RMS: a component whose two gradients nearly
    # cancel turns the fp32 summation-order noise of the gradients (checked above at 1e-6)
    # into up to a few 1e-3 of one update (lr 1e-2), hence an absolute floor of 2e-3 x lr.
    reference, sharded = engine_runs
    for rank_result in sharded:
        for name, weight in reference["weights"].items():
            torch.testing.assert_close(
                rank_result["weights"][name], weight, rtol=RTOL, atol=2e-3 * ENGINE_LR
            )


def _curve(reports: list[tuple[dict, str | None]]) -> list[float]:
    return [metrics["loss"] for metrics, _ in reports if "loss" in metrics]


@pytest.mark.slow
def test_ring2_training_run_has_the_single_process_loss_curve(tmp_path: Path):
    corpus, tokenizer = make_data(tmp_path / "data")
    common = {"steps": 5, "ckpt_every": 5, "eval_every": 5, "zero_stage": 0, "grad_accum": 1}
    plain = tiny_recipe(corpus, tokenizer, tmp_path / "plain", **common)
    ring = tiny_recipe(corpus, tokenizer, tmp_path / "ring", **common).model_copy(
        update={"parallel": plain.parallel.model_copy(update={"ring": 2})}
    )
    reference = train_on_ranks([job(plain)], world=1)[0][0]
    results = train_on_ranks([job(ring)], world=2)
    expected = _curve(reference["reports"])
    assert len(expected) == 5
    for (run,) in results:
        torch.testing.assert_close(
            torch.tensor(_curve(run["reports"])), torch.tensor(expected), rtol=RTOL, atol=ATOL
        )
        assert run["summary"]["eval_loss"] == pytest.approx(
            reference["summary"]["eval_loss"], rel=RTOL
        )
        assert run["summary"]["tokens_seen"] == reference["summary"]["tokens_seen"]


def test_a_checkpoint_resumes_under_another_sequence_parallel_layout(tmp_path: Path):
    """Checkpoints hold the full fp32 state, so the layout may change on resume (elastic
    resume, end to end in test_elastic_resume.py); the model shape still must match."""
    ring = Recipe.model_validate(
        {"parallel": {"ring": 2}, "data": {"seq_len": 512, "tokenizer": {"vocab_size": 300}}}
    )
    plain = ring.model_copy(update={"parallel": ParallelConfig()})
    manifest = {
        "recipe_hash": ring.recipe_hash(),
        "sequence_parallel": sequence_parallel_layout(ring),
    }
    check_recipe_compatible(manifest, ring, tmp_path)  # the same layout resumes
    check_recipe_compatible(manifest, plain, tmp_path)  # and so does another one
    with pytest.raises(LongctxError, match="does not fit this recipe's model") as error:
        check_recipe_compatible({**manifest, "recipe_hash": "0" * 16}, plain, tmp_path)
    assert "\n" not in str(error.value)


TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"

BAD_LAYOUTS = {
    "world size": (
        ["--workers", "3", "--set", "parallel.ring=2"],
        "--workers 3 is not a multiple of parallel.ulysses x ring = 1 x 2 = 2",
    ),
    "heads over ulysses": (
        ["--workers", "3", "--set", "parallel.ulysses=3"],
        "model.num_attention_heads=4 is not divisible by parallel.ulysses=3",
    ),
    "variant heads over ulysses": (
        ["--workers", "4", "--set", "parallel.ulysses=4", "--set", "attention.variant=nsa"],
        "does not divide num_key_value_heads=2",
    ),
}


@pytest.mark.parametrize("case", BAD_LAYOUTS, ids=list(BAD_LAYOUTS))
def test_bad_sequence_parallel_layouts_exit_2_with_one_line(case, tmp_path, capsys, monkeypatch):
    args, fragment = BAD_LAYOUTS[case]
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_bytes(TINY.read_bytes())
    assert main(["train", str(recipe), *args]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and fragment in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # nothing written
