"""S2-attn (LongLoRA section 3.2, ``attention/s2.py``): exact against a float64 reference built
from an explicit visibility matrix, dense in evaluation, refused where it cannot run, and under
Ulysses 2 through the real trainer equal to one process.

The reference never rolls a tensor: for a shifted head it maps every position ``p`` to its
rolled index ``r = (p - g / 2) mod T`` and lets query ``i`` see key ``j`` iff both rolled
indices lie in the same group of ``g`` and ``r(j) <= r(i)`` (same document when packed), which
is the wrap-around pattern of LongLoRA's ``roll``-then-reshape code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import job, make_data, tiny_recipe, train_on_ranks

from longctx.attention import AttentionContext, AttentionShape, DenseAttention
from longctx.attention.config import AttentionConfig
from longctx.attention.s2 import S2Attention
from longctx.config.recipe import Recipe, load_recipe
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _shape(heads: int, kv_heads: int, dim: int = 8) -> AttentionShape:
    return AttentionShape(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, hidden_size=heads * dim,
        vocab_size=64, max_position_embeddings=256,
    )  # fmt: skip


def _core(heads: int, kv_heads: int, group_size: int | None = None, backend: str = "auto"):
    attention = AttentionConfig(variant="s2", backend=backend, s2={"group_size": group_size})
    return S2Attention(_shape(heads, kv_heads), attention, PositionalConfig())


def _reference(q, k, v, group: int, doc_ids=None, head_start: int = 0, total_heads=None):
    """float64 S2-attn from an explicit [H, T, T] visibility matrix (see the module docstring)."""
    q, k, v = (x.double() for x in (q, k, v))
    heads, length = q.shape[1], q.shape[2]
    total_heads = total_heads or heads
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    pos = torch.arange(length)
    masks = []
    for head in range(heads):
        shifted = head_start + head >= total_heads // 2
        rolled = (pos - group // 2) % length if shifted else pos
        same_group = rolled[:, None] // group == rolled[None, :] // group
        masks.append(same_group & (rolled[None, :] <= rolled[:, None]))
    visible = torch.stack(masks)[None]  # [1, H, T, T]
    if doc_ids is not None:
        visible = visible & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return weights @ v


def _inputs(batch, heads, kv_heads, length, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen) for _ in range(2))
    return q, k, v


CASES = {  # heads, kv heads, length, group size (None = T / 4), packed documents
    "mha quarter groups": (4, 4, 32, None, False),
    "gqa explicit group": (4, 2, 48, 12, False),
    "split inside a kv group": (6, 2, 40, None, False),
    "odd heads mqa packed": (5, 1, 32, 8, True),
}


@pytest.mark.parametrize("backend", ["cpu_flash", "chunked"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_training_forward_and_gradients_equal_the_float64_reference(case, backend):
    heads, kv_heads, length, group_size, packed = CASES[case]
    q, k, v = _inputs(2, heads, kv_heads, length)
    doc_ids = None
    if packed:  # two documents in row 0 (boundary inside a group), one in row 1
        doc_ids = torch.zeros(2, length, dtype=torch.long)
        doc_ids[0, 11:] = 1
    core = _core(heads, kv_heads, group_size, backend).train()
    group = group_size or length // 4
    ctx = AttentionContext(
        position_ids=torch.arange(length).expand(2, -1), seq_positions=torch.arange(length),
        doc_ids=doc_ids,
    )  # fmt: skip
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = core(*leaves, ctx)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_leaves, group, doc_ids)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    ref.backward(grad.double())
    for got, expected in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), expected.grad, rtol=1e-5, atol=1e-5)


def test_the_shift_wraps_around_like_longloras_reference_code():
    """LongLoRA's code, transcribed: roll half the heads by -g/2, reshape into groups, causal
    attention per group, roll back; S2Attention gives the same numbers."""
    q, k, v = _inputs(1, 4, 4, 32, seed=3)
    length, group, heads = 32, 8, 4

    def shift(x):
        x = x.clone()
        x[:, heads // 2 :] = x[:, heads // 2 :].roll(-group // 2, dims=2)
        return x.reshape(1, heads, length // group, group, 8).transpose(1, 2)

    qs, ks, vs = (shift(x).double() for x in (q, k, v))  # [1, G, H, g, D]
    causal = torch.ones(group, group, dtype=torch.bool).tril()
    scores = (qs @ ks.transpose(-1, -2) / 8**0.5).masked_fill(~causal, float("-inf"))
    out = (scores.softmax(-1) @ vs).transpose(1, 2).reshape(1, heads, length, 8)
    out[:, heads // 2 :] = out[:, heads // 2 :].roll(group // 2, dims=2)
    ctx = AttentionContext(position_ids=torch.arange(length)[None], seq_positions=torch.arange(32))
    got = _core(4, 4, group).train()(q, k, v, ctx)
    torch.testing.assert_close(got.double(), out, rtol=1e-5, atol=1e-6)


def test_a_ulysses_rank_shifts_the_heads_its_global_index_says():
    """Heads 2..3 of 4 computed alone (``restrict_to_heads(2, 4)``) equal those rows of the
    4-head reference: both are in the shifted half."""
    q, k, v = _inputs(1, 4, 2, 32)
    core = _core(4, 2).train()
    core.restrict_to_heads(2, 4)
    ctx = AttentionContext(position_ids=torch.arange(32)[None], seq_positions=torch.arange(32))
    got = core(q[:, 2:], k[:, 1:], v[:, 1:], ctx)
    expected = _reference(q, k, v, 8)[:, 2:]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_evaluation_is_dense_attention():
    q, k, v = _inputs(2, 4, 2, 32)
    ctx = AttentionContext(
        position_ids=torch.arange(32).expand(2, -1), seq_positions=torch.arange(32)
    )
    attention = AttentionConfig(variant="s2")
    dense = DenseAttention(_shape(4, 2), attention, PositionalConfig())
    s2 = _core(4, 2)
    assert torch.equal(s2.eval()(q, k, v, ctx), dense(q, k, v, ctx))
    assert not torch.allclose(s2.train()(q, k, v, ctx), dense(q, k, v, ctx))


def test_a_sequence_that_does_not_split_into_groups_is_refused_at_batch_time():
    q, k, v = _inputs(1, 4, 2, 36)
    ctx = AttentionContext(position_ids=torch.arange(36)[None], seq_positions=torch.arange(36))
    with pytest.raises(LongctxError, match=r"sequence length \(36\).*multiple of 8") as info:
        _core(4, 2).train()(q, k, v, ctx)
    assert "\n" not in str(info.value)


BAD_RECIPES = {
    "length": (["data.seq_len=100"], "sequence length (100) that divides into four groups"),
    "explicit group": (
        ["attention.s2.group_size=48"],
        "groups of attention.s2.group_size=48 tokens; use a multiple of 48",
    ),
    "odd group": (["attention.s2.group_size=7"], "is odd, but half the heads shift"),
    "ring": (["parallel.ring=2"], "cannot run under parallel.ring=2"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES), ids=list(BAD_RECIPES))
def test_bad_s2_recipes_are_refused_in_one_line(case):
    overrides, message = BAD_RECIPES[case]
    with pytest.raises(LongctxError) as info:
        load_recipe(TINY, ["attention.variant=s2", *overrides])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_s2_length_exits_2_from_the_cli(capsys):
    from longctx.launch.cli import main

    code = main(["train", str(TINY), "--dry-run", "--set", "attention.variant=s2",
                 "--set", "data.seq_len=100"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "data.seq_len: 96" in err and "\n" not in err


def _curve(reports):
    return [metrics["loss"] for metrics, _ in reports if "loss" in metrics]


@pytest.mark.slow
def test_ulysses2_training_run_has_the_single_process_loss_curve(tmp_path):
    """``train_worker`` with S2-attn for 3 fp32 steps: 2 ranks under Ulysses (rank 0 computes
    the unshifted heads 0-1, rank 1 the shifted heads 2-3) log the loss curve of 1 rank, and
    the eval loss (dense attention, model.eval()) too."""
    corpus, tokenizer = make_data(tmp_path / "data")
    common = {"steps": 3, "ckpt_every": 3, "eval_every": 3, "grad_accum": 1}
    plain = tiny_recipe(corpus, tokenizer, tmp_path / "plain", **common).model_dump(mode="json")
    plain["attention"].update(variant="s2")
    sharded = {**plain, "parallel": {**plain["parallel"], "ulysses": 2}}
    sharded["trainer"] = {**plain["trainer"], "run_dir": str(tmp_path / "ulysses")}
    reference = train_on_ranks([job(Recipe.model_validate(plain))], world=1)[0][0]
    results = train_on_ranks([job(Recipe.model_validate(sharded))], world=2)
    expected = _curve(reference["reports"])
    assert len(expected) == 3
    dense = {**plain, "attention": {**plain["attention"], "variant": "dense"}}
    dense["trainer"] = {**plain["trainer"], "run_dir": str(tmp_path / "dense")}
    dense_run = train_on_ranks([job(Recipe.model_validate(dense))], world=1)[0][0]
    assert _curve(dense_run["reports"]) != pytest.approx(expected, rel=1e-5)  # S2 is not dense
    for (run,) in results:
        torch.testing.assert_close(
            torch.tensor(_curve(run["reports"])), torch.tensor(expected), rtol=1e-5, atol=1e-6
        )
        assert run["summary"]["eval_loss"] == pytest.approx(
            reference["summary"]["eval_loss"], rel=1e-5
        )
