"""Length-dependent RoPE under sequence parallelism, through the trainer's code path: a sharded
run is the unsharded model (issue 17, item 1).

Dynamic NTK and LongRoPE pick their frequencies from the sequence length. Each rank of a
sequence-parallel group holds only a shard, whose largest position is not the sequence's, so
the trainer's batch path (``prepare_batch``) reads ``rope_seq_len`` from the whole batch and
``ModelWithLoss`` hands it to ``forward_hidden``; without it each rank would rotate with the
frequencies of its own shard's length.

Reference: ``ModelWithLoss`` in this process on the whole batch, with no ``rope_seq_len``
(the unsharded forward's own default, ``max(position_ids) + 1``). Each layout (ring 2,
Ulysses 2, Ulysses 2 x ring 2) runs on 4 gloo ranks: the model through ``apply_transforms``, the
batch through ``prepare_batch``, the SP group's mean of the returned losses and of the
gradients (what DeepSpeed's data-parallel average makes of them) against the reference, fp32
rtol 1e-5. The batches pack documents, so positions restart inside a row and the length RoPE
sees is the longest document's, not ``T``; the document boundaries are placed so that, under
every layout, some rank's shard has a shorter largest position than the whole batch and sits
on the other side of the scaling threshold.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_on_ranks
from test_sp_trainer import VOCAB, _model_fields

from longctx.model import ModelConfig, Transformer

RTOL, ATOL = 1e-5, 1e-6
HEAD_DIM = 8
LAYOUTS = {"ring2": (1, 2), "ulysses2": (2, 1), "ulysses2_ring2": (2, 2)}
CASES = {
    # dynamic NTK, factor 4 over 64 trained positions; T = 256, documents of 100 + 156 and
    # 180 + 76 tokens: the whole batch's RoPE length is 180, every layout has a shard below it.
    "dynamic": (
        {"rope_type": "dynamic", "factor": 4.0},
        64,
        256,
        [100, 180],
    ),
    # LongRoPE over 64 original positions; T = 96, documents of 20 + 76 tokens: the batch's
    # length 76 takes the long factors, some shard of every layout sees <= 64 (short factors).
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
            "long_factor": [1.0 + 1.5 * i for i in range(HEAD_DIM // 2)],
            "original_max_position_embeddings": 64,
        },
        256,
        96,
        [20],
    ),
}


def _model(case: str) -> Transformer:
    """test_sp_trainer's tiny model (vocab 67, head dim 8) with the case's RoPE scaling."""
    scaling, max_positions, _, _ = CASES[case]
    torch.manual_seed(0)
    fields = {"max_position_embeddings": max_positions, "rope_scaling": scaling}
    return Transformer(ModelConfig(**{**_model_fields(), **fields}))


def _batch(case: str) -> dict[str, torch.Tensor]:
    """Packed rows: one document boundary per row (``CASES``), positions restarting there,
    pre-shifted labels with the last token of each row unscored."""
    _, _, length, boundaries = CASES[case]
    rows = len(boundaries)
    gen = torch.Generator().manual_seed(3)
    boundary = torch.tensor(boundaries)[:, None]  # [B, 1]
    index = torch.arange(length)
    doc_ids = (index >= boundary).long()  # [B, T]
    labels = torch.randint(0, VOCAB, (rows, length), generator=gen)
    labels[:, -1] = -100
    return {
        "input_ids": torch.randint(0, VOCAB, (rows, length), generator=gen),
        "labels": labels,
        "position_ids": torch.where(doc_ids == 1, index - boundary, index),
        "doc_ids": doc_ids,
    }


def _loss_and_grads(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = module(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters()}


def _reference(case: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from longctx.trainer.engine import ModelWithLoss

    return _loss_and_grads(ModelWithLoss(_model(case), zero_stage=0), _batch(case))


def _sharded_rank(rank: int, world: int) -> dict:
    """Every layout and case on this rank: the SP group's mean loss and mean gradients."""
    import torch.distributed as dist

    from longctx.parallel.apply import TransformPlan, apply_transforms
    from longctx.parallel.batch import prepare_batch
    from longctx.parallel.config import ParallelConfig
    from longctx.parallel.mesh import build_mesh
    from longctx.trainer.engine import ModelWithLoss

    results = {}
    for layout, (ulysses, ring) in LAYOUTS.items():
        mesh = build_mesh(ParallelConfig(ulysses=ulysses, ring=ring))
        sp = mesh.config.sp
        for case in CASES:
            model = apply_transforms(_model(case), TransformPlan(mesh=mesh))
            module = ModelWithLoss(model, zero_stage=0, sp_group=mesh.sp_group)
            batch = prepare_batch(_batch(case), mesh=mesh)  # every dp group: the whole batch
            loss, grads = _loss_and_grads(module, batch)
            for tensor in (loss, *grads.values()):
                dist.all_reduce(tensor, group=mesh.sp_group)
                tensor /= sp
            results[layout, case] = (loss, grads)
    return results


@pytest.fixture(scope="module")
def sharded_runs():
    return run_on_ranks(_sharded_rank, 4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_length_dependent_rope_equals_one_process(sharded_runs, layout, case):
    ref_loss, ref_grads = _reference(case)
    for rank_results in sharded_runs:
        loss, grads = rank_results[layout, case]
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)


def test_batch_path_reads_the_rope_length_of_the_whole_batch():
    """``prepare_batch`` attaches the unsharded forward's length: the longest document."""
    from longctx.parallel.batch import prepare_batch

    for case, (_, _, _, boundaries) in CASES.items():
        batch = _batch(case)
        longest = max(max(b, batch["input_ids"].shape[1] - b) for b in boundaries)
        assert prepare_batch(batch)["rope_seq_len"] == longest
        assert (
            prepare_batch({"input_ids": batch["input_ids"]})["rope_seq_len"]
            == (batch["input_ids"].shape[1])
        )
