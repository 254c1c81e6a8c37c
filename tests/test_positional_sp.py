"""CoPE, BAM and TAPA under Ulysses on 2 and 4 real gloo ranks equal the unsharded model (logits
and every parameter's gradient, fp32 rtol 1e-5). Ring and hybrid layouts: test_positional_ring.py
(which reuses this file's model, batch and per-rank run).

Each rank holds the zigzag shard of a packed batch; Ulysses gathers the whole sequence of a
head subset, so CoPE sees its keys out of sequence order and BAM/CoPE per-head parameters are
sliced to the rank's heads: both are what these tests pin down.
"""

from __future__ import annotations

import functools

import pytest
import torch
from harness import run_on_ranks

from longctx.attention.config import AttentionConfig
from longctx.model.config import ModelConfig
from longctx.model.transformer import Transformer
from longctx.parallel.config import ParallelConfig
from longctx.parallel.mesh import build_mesh
from longctx.parallel.parallelize import parallelize
from longctx.positional.config import BAMConfig, CoPEConfig, PositionalConfig

B, T, VOCAB = 2, 24, 37
RTOL, ATOL = 1e-5, 2e-6  # fp32 on both sides, different summation orders
# Gradients reach ~40 here and BAM's shape parameters sum large terms to nearly 0: the fp32
# one-process run is itself up to 1e-5 off a float64 run of the same weights, so the sharded
# sum can only be held to that noise floor.
GRAD_ATOL = 3e-5
POSITIONALS = {
    "cope": PositionalConfig(kind="cope", cope=CoPEConfig(npos_max=6, shared_heads=False)),
    "bam": PositionalConfig(kind="bam", bam=BAMConfig(ssmax=True)),
    "tapa": PositionalConfig(kind="tapa"),
}
MODEL = ModelConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def positional_model(positional: PositionalConfig) -> Transformer:
    """Seeded model whose encoding parameters are random (not their flat initial values)."""
    torch.manual_seed(0)
    model = Transformer(MODEL, positional, AttentionConfig(chunk_size=5))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".score." in name:
                param.add_(0.5 * torch.randn(param.shape, generator=gen)).abs_()
    return model


def packed_batch():
    """Token ids [B, T], doc ids [B, T] (row 0 packs two documents) and the loss weights."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    docs = torch.tensor([[0] * 9 + [1] * 15, [0] * T])
    weight = torch.randn(B, T, VOCAB, generator=gen)  # the loss is sum(logits * weight)
    return ids, docs, weight


def _sharded_rank(rank, world):
    """Every encoding on this rank (one spawn per world size: starting ranks is the cost)."""
    config = ParallelConfig(dp=1, ulysses=world, ring=1)
    mesh = build_mesh(config)
    return {kind: sharded_run(positional, config, mesh) for kind, positional in POSITIONALS.items()}


def sharded_run(positional, config, mesh):
    """This rank's logits [B, T/P, V] and parameter grads of the ``positional`` model
    parallelized by ``config`` on ``mesh`` (its tokens from ``mesh.shard_batch``), with their
    global positions."""
    model = parallelize(positional_model(positional), config, mesh)
    ids, docs, weight = packed_batch()
    shard = mesh.shard_batch({"input_ids": ids, "doc_ids": docs})
    positions = shard["seq_positions"]
    logits = model(
        shard["input_ids"],
        positions.expand(B, -1),
        doc_ids=shard["doc_ids"],
        seq_positions=positions,
    )
    (logits * weight[:, positions]).sum().backward()
    return {
        "positions": positions,
        "logits": logits.detach(),
        "grads": [p.grad for p in model.parameters()],
    }


@functools.cache
def _sharded(world):
    return run_on_ranks(_sharded_rank, world)


def reference_run(positional):
    """The one-process reference: logits [B, T, V] and every parameter's gradient."""
    model = positional_model(positional)
    ids, docs, weight = packed_batch()
    logits = model(ids, doc_ids=docs)
    (logits * weight).sum().backward()
    return logits.detach(), [p.grad for p in model.parameters()]


@functools.cache
def _unsharded(kind):
    return reference_run(POSITIONALS[kind])


def check_sharded_equals_reference(results, logits, grads):
    """Every rank's logits equal the reference at its positions; the ranks' summed parameter
    gradients (what the data-parallel all-reduce gives) equal the reference's."""
    positions = torch.cat([r["positions"] for r in results])
    sharded_logits = torch.cat([r["logits"] for r in results], dim=1)
    torch.testing.assert_close(sharded_logits, logits[:, positions], rtol=RTOL, atol=ATOL)
    for index, grad in enumerate(grads):
        summed = sum(r["grads"][index] for r in results)  # what the data-parallel sum gives
        torch.testing.assert_close(summed, grad, rtol=RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", list(POSITIONALS))
def test_ulysses_equals_unsharded(kind, world):
    results = [r[kind] for r in _sharded(world)]
    check_sharded_equals_reference(results, *_unsharded(kind))
