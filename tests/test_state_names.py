"""A parallelized model saves and loads under the plain model's parameter names (real gloo
ranks): BAM's per-layer slopes under ring 2 (key gather) and Ulysses 2, the dense core under
ring 2; a plain model's state dict loads strictly into the wrapped one and back, and the
checkpoint walks the wrapped model's parameters under the plain names, in the plain order
(``unique_parameters``: the names of the saved weights and AdamW moments)."""

import pytest
import torch
from harness import run_on_ranks
from test_positional_sp import positional_model

from longctx.checkpoint.full_state import unique_parameters
from longctx.parallel.config import ParallelConfig
from longctx.parallel.mesh import build_mesh
from longctx.parallel.parallelize import parallelize
from longctx.positional.config import BAMConfig, PositionalConfig

LAYOUTS = {"ring2": (1, 2), "ulysses2": (2, 1)}
POSITIONALS = {"bam": PositionalConfig(kind="bam", bam=BAMConfig()), "rope": PositionalConfig()}


def _names_rank(rank, world):
    results = {}
    for layout, (ulysses, ring) in LAYOUTS.items():
        config = ParallelConfig(dp=1, ulysses=ulysses, ring=ring)
        mesh = build_mesh(config)
        for kind, positional in POSITIONALS.items():
            plain_model = positional_model(positional)
            plain = plain_model.state_dict()
            wrapped = parallelize(positional_model(positional), config, mesh)
            # a differently seeded state, loaded strictly through the wrapper's names
            torch.manual_seed(123)
            other = {name: torch.randn_like(t) for name, t in plain.items()}
            wrapped.load_state_dict(other, strict=True)
            saved = wrapped.state_dict()
            results[layout, kind] = {
                "plain_names": sorted(plain),
                "wrapped_names": sorted(saved),
                "round_trip": all(torch.equal(saved[n], other[n]) for n in other),
                "core_type": type(wrapped.layers[0].self_attn.core).__name__,
                "checkpoint_names": [name for name, _ in unique_parameters(wrapped)],
                "plain_parameters": [
                    name for name, p in plain_model.named_parameters() if p.requires_grad
                ],
            }
    return results


@pytest.fixture(scope="module")
def name_results():
    return run_on_ranks(_names_rank, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", POSITIONALS)
def test_wrapped_model_keeps_plain_names(name_results, layout, kind):
    for result in name_results:
        got = result[layout, kind]
        assert got["core_type"] in ("RingAttention", "KeyGatherAttention", "UlyssesAttention")
        assert got["wrapped_names"] == got["plain_names"]
        assert got["round_trip"]
        assert got["checkpoint_names"] == got["plain_parameters"]
    if kind == "bam":  # the case that has parameters inside the wrapped core
        assert any(".core." in name for name in name_results[0][layout, kind]["plain_names"])


def test_layer_wrappers_keep_plain_names():
    """Activation checkpointing and offload wrap each decoder layer (``model/wrappers.py``):
    the state dict, ``named_parameters`` and the checkpoint's ``unique_parameters`` keep the
    plain model's names, a plain state dict loads strictly and round-trips, and the wrapped
    layer's modules are still reachable by attribute and by ``get_submodule``."""
    from longctx.model.wrappers import CheckpointedLayer, OffloadedLayer
    from longctx.parallel.apply import TransformPlan, apply_transforms

    positional = POSITIONALS["bam"]  # parameters inside the attention core too
    plain_model = positional_model(positional)
    plain = plain_model.state_dict()
    plan = TransformPlan(activation_checkpointing=True, offload_activations=True)
    wrapped = apply_transforms(positional_model(positional), plan)
    assert isinstance(wrapped.layers[0], OffloadedLayer)
    assert isinstance(wrapped.layers[0].wrapped, CheckpointedLayer)
    torch.manual_seed(123)
    other = {name: torch.randn_like(t) for name, t in plain.items()}
    wrapped.load_state_dict(other, strict=True)
    saved = wrapped.state_dict()
    assert list(saved) == list(plain)
    assert all(torch.equal(saved[n], other[n]) for n in other)
    plain_names = [name for name, _ in plain_model.named_parameters()]
    assert [name for name, _ in wrapped.named_parameters()] == plain_names
    assert [name for name, _ in unique_parameters(wrapped)] == plain_names
    q_proj = wrapped.get_submodule("layers.0.self_attn.q_proj")
    assert wrapped.layers[0].self_attn.q_proj is q_proj
