"""A whole model step under sequence parallelism equals one process on the full batch.

4 real gloo ranks run forward, tiled SP-exact loss and backward of a tiny fp32 decoder after
``parallelize``; parameter gradients are averaged over the world as DeepSpeed does (each rank's
loss share scaled by the SP size). The reference is the unmodified model on the full, unsharded
batch in one process with plain ``F.cross_entropy``. Layouts: dp 2 x ring 2 (each dp rank one
sequence, zigzag over 2 ranks) and ulysses 2 x ring 2 (both sequences over 4 ranks). The batch
packs documents (doc ids, per-document RoPE positions), one layer has a sliding window, and the
length needs padding. Bad input: heads that the Ulysses degree does not divide are refused
before any layer changes.

Tolerance: rtol 1e-5 with an absolute floor of 1e-6 (fp32; the two runs add the same terms in a
different order, and some weight gradients are near zero).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_on_ranks
from sp_cases import random_doc_ids
from torch import nn

from longctx.attention.dense import DenseAttention
from longctx.errors import LongctxError
from longctx.model import ModelConfig, Transformer
from longctx.parallel.config import ParallelConfig
from longctx.parallel.loss import tiled_cross_entropy, world_mean_scale
from longctx.parallel.mesh import build_mesh
from longctx.parallel.parallelize import parallelize
from longctx.parallel.ulysses import UlyssesAttention

RTOL, ATOL = 1e-5, 1e-6
SEQ_LEN = 46  # pads to 48 = 6 x (2 x 2 x 2)
LAYOUTS = {"dp2_ring2": (2, 1, 2), "ulysses2_ring2": (1, 2, 2)}


def _model_config(**overrides) -> ModelConfig:
    fields = {
        "vocab_size": 61,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 12,
        "max_window_layers": 1,  # layer 0 attends fully, layer 1 within 12 tokens
        "initializer_range": 0.2,
        **overrides,
    }
    return ModelConfig(**fields)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two packed sequences: tokens, pre-shifted labels, per-document positions and doc ids."""
    gen = torch.Generator().manual_seed(seed)
    doc_ids = random_doc_ids(2, SEQ_LEN, gen)
    starts = torch.stack([torch.searchsorted(row, row, right=False) for row in doc_ids])
    return {
        "input_ids": torch.randint(0, 61, (2, SEQ_LEN), generator=gen),
        "labels": torch.randint(0, 61, (2, SEQ_LEN), generator=gen),
        "position_ids": torch.arange(SEQ_LEN) - starts,  # RoPE restarts in each document
        "doc_ids": doc_ids,
    }


def _all_checks(rank, world, state, batch):
    """Both layouts' steps and the refusals, in one spawn of 4 ranks."""
    steps = {name: _parallel_step(state, batch, layout) for name, layout in LAYOUTS.items()}
    return {"steps": steps, "refusals": _refusals()}


def _parallel_step(state, batch, layout):
    """One forward/backward on this rank's tokens; returns the loss and averaged gradients."""
    world = dist.get_world_size()
    dp, ulysses, ring = layout
    mesh = build_mesh(ParallelConfig(dp=dp, ulysses=ulysses, ring=ring))
    model = Transformer(_model_config())
    model.load_state_dict(state)
    parallelize(model, mesh.config, mesh)
    rows = slice(mesh.dp_rank, mesh.dp_rank + 1) if dp > 1 else slice(None)
    shard = mesh.shard_batch({name: value[rows] for name, value in batch.items()})
    hidden = model.forward_hidden(
        shard["input_ids"],
        shard["position_ids"],
        doc_ids=shard["doc_ids"],
        seq_positions=shard["seq_positions"],
    )
    share = tiled_cross_entropy(
        hidden, model.lm_head.weight, shard["labels"], chunk_size=5, group=mesh.sp_group
    )
    (share * world_mean_scale(mesh.sp_group)).backward()
    loss = share.detach().clone()
    dist.all_reduce(loss)  # sum of the dp groups' sequence losses
    grads = {}
    for name, param in model.named_parameters():
        dist.all_reduce(param.grad)
        grads[name] = param.grad / world  # DeepSpeed's world mean
    cores = set()
    for layer in model.layers:
        core, names = layer.self_attn.core, []
        while not isinstance(core, DenseAttention):
            names.append(type(core).__name__)
            core = core.inner if isinstance(core, UlyssesAttention) else core.local
        cores.add(" > ".join(names))
    return {"loss": loss / dp, "grads": grads, "cores": cores}


class _OtherCore(nn.Module):
    """A core that is not the dense one (stands in for a sparse variant)."""

    def __init__(self, inner: DenseAttention):
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v, ctx):
        return self.inner(q, k, v, ctx)


def _refusals():
    """parallelize's refusals, each leaving the model as it was: 6 heads over Ulysses 4, and
    ring attention over a core that is not ``DenseAttention``."""
    messages = {}
    ulysses4 = build_mesh(ParallelConfig(dp=1, ulysses=4, ring=1))
    model = Transformer(_model_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=48))
    ring4 = build_mesh(ParallelConfig(dp=1, ulysses=1, ring=4))
    other = Transformer(_model_config())
    other.layers[1].self_attn.core = _OtherCore(other.layers[1].self_attn.core)
    for name, (net, mesh) in {"heads": (model, ulysses4), "core": (other, ring4)}.items():
        before = [type(layer.self_attn.core) for layer in net.layers]
        with pytest.raises(LongctxError) as info:
            parallelize(net, mesh.config, mesh)
        assert [type(layer.self_attn.core) for layer in net.layers] == before
        messages[name] = str(info.value)
    return messages


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = Transformer(_model_config())
    state = {name: value.clone() for name, value in model.state_dict().items()}
    batch = _batch()
    logits = model(batch["input_ids"], batch["position_ids"], doc_ids=batch["doc_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return {"state": state, "batch": batch, "loss": loss.detach(), "grads": grads}


@pytest.fixture(scope="module")
def spawned(reference):
    return run_on_ranks(_all_checks, 4, reference["state"], reference["batch"])


@pytest.fixture(params=list(LAYOUTS))
def parallel_run(request, spawned):
    return request.param, [r["steps"][request.param] for r in spawned]


def test_parallelize_swaps_every_core(parallel_run):
    layout, results = parallel_run
    expected = {
        "dp2_ring2": {"RingAttention"},
        "ulysses2_ring2": {"UlyssesAttention > RingAttention"},
    }[layout]
    assert all(r["cores"] == expected for r in results)


def test_loss_equals_single_process(parallel_run, reference):
    _, results = parallel_run
    for r in results:
        torch.testing.assert_close(r["loss"], reference["loss"], rtol=RTOL, atol=ATOL)


def test_gradients_equal_single_process(parallel_run, reference):
    _, results = parallel_run
    for name, expected in reference["grads"].items():
        torch.testing.assert_close(
            results[0]["grads"][name],
            expected,
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_refusals_name_the_numbers_and_leave_the_model_intact(spawned):
    messages = spawned[0]["refusals"]
    assert messages["heads"] == (
        "num_attention_heads 6 is not divisible by parallel.ulysses 4; choose parallel.ulysses "
        "among [1, 2, 3, 6] or use parallel.ring for the rest"
    )
    assert messages["core"].startswith(
        "attention core _OtherCore of layer 1 does not support ring attention (parallel.ring 4)"
    )
