"""Per-query float64 references for the score-side position encodings (SPECS 2.2-2.4).

Each reference walks the queries one at a time and writes the SPECS equation of that row
directly (explicit sums over the visible keys, no cumsum, no gather, no chunking), so it shares
no code path with ``longctx.attention.scored`` or ``longctx.positional``. Test helper, imported
by module name (tests/ is not a package).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# row_logits(b, h, i, keys) -> logits [len(keys)] of query i over its visible keys (float64)
RowLogits = Callable[[int, int, int, list[int]], Tensor]


def visible_keys(i: int, positions: list[int], docs: list[int] | None, window: int | None):
    """Indices j of the keys query i sees: causal on positions, same document, in the window."""
    keys = []
    for j, pos in enumerate(positions):
        if pos > positions[i]:
            continue
        if window is not None and positions[i] - pos >= window:
            continue
        if docs is not None and docs[j] != docs[i]:
            continue
        keys.append(j)
    return keys


def per_query_attention(
    v: Tensor,
    row_logits: RowLogits,
    *,
    heads: int,
    positions: list[int],
    doc_ids: Tensor | None = None,
    window: int | None = None,
) -> Tensor:
    """out [B, H, T, D] (float64) of softmax(row_logits) @ v row by row; v [B, H, T, D]."""
    batch, _, length, dim = v.shape
    rows = []
    for b in range(batch):
        docs = None if doc_ids is None else doc_ids[b].tolist()
        per_head = []
        for h in range(heads):
            per_query = []
            for i in range(length):
                keys = visible_keys(i, positions, docs, window)
                if not keys:
                    per_query.append(torch.zeros(dim, dtype=torch.float64))
                    continue
                probs = torch.softmax(row_logits(b, h, i, keys), dim=0)  # [n]
                per_query.append(probs @ v[b, h, keys].double())
            per_head.append(torch.stack(per_query))
        rows.append(torch.stack(per_head))
    return torch.stack(rows)


def expand_kv(x: Tensor, heads: int) -> Tensor:
    """GQA: kv head of query head h is h // (heads / Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def cope_row(q: Tensor, k: Tensor, pos_emb: Tensor, npos_max: int) -> RowLogits:
    """CoPE (SPECS 2.2): s_ij, gates, p_ij = min(sum_{t=j..i visible} g_it, npos-1),
    logit s_ij + interp(q_i . e[floor p], q_i . e[ceil p])."""
    scale = 1.0 / math.sqrt(q.shape[-1])

    def row(b: int, h: int, i: int, keys: list[int]) -> Tensor:
        qi = q[b, h, i].double()
        table = pos_emb[0 if pos_emb.shape[0] == 1 else h].double()  # [D, npos]
        s = torch.stack([qi @ k[b, h, j].double() * scale for j in keys])
        gates = torch.sigmoid(s)
        out = []
        for n, _ in enumerate(keys):
            p = torch.clamp(gates[n:].sum(), max=npos_max - 1)
            lo, hi = math.floor(p.item()), math.ceil(p.item())
            frac = p - lo
            term = (qi @ table[:, lo]) * (1 - frac) + (qi @ table[:, hi]) * frac
            out.append(s[n] + term)
        return torch.stack(out)

    return row


def bam_row(
    q: Tensor,
    k: Tensor,
    positions: list[int],
    theta_scale: Tensor,
    theta_shape: Tensor,
    ssmax_scale: Tensor | None,
) -> RowLogits:
    """BAM (SPECS 2.3): s_ij - exp(scale_h) (|i - j| + 1e-5)^shape_h, times s_h ln(n_i)."""
    scale = 1.0 / math.sqrt(q.shape[-1])

    def row(b: int, h: int, i: int, keys: list[int]) -> Tensor:
        out = []
        for j in keys:
            d = float(positions[i] - positions[j])
            prior = -torch.exp(theta_scale[h].double()) * (abs(d) + 1e-5) ** theta_shape[
                h
            ].double().clamp(min=0)
            out.append(q[b, h, i].double() @ k[b, h, j].double() * scale + prior)
        logits = torch.stack(out)
        if ssmax_scale is not None:
            logits = logits * ssmax_scale[h].double() * math.log(len(keys))
        return logits

    return row


def tapa_score(qm: Tensor, kn: Tensor, distance: float, theta: float, alpha: float) -> Tensor:
    """TAPA (SPECS 2.4) for one pair of head vectors, written from the equation."""
    dim = qm.shape[0]
    a = round(theta * dim)
    amp = sum(qm[x] * kn[x] for x in range(a)) / math.sqrt(a)
    phase = sum(qm[x] * kn[x] for x in range(a, dim)) / math.sqrt(dim - a)
    return amp * torch.cos(2 * math.pi * abs(distance) ** alpha * phase)


def tapa_row(q: Tensor, k: Tensor, positions: list[int], theta: float, alpha: float) -> RowLogits:
    def row(b: int, h: int, i: int, keys: list[int]) -> Tensor:
        return torch.stack(
            [
                tapa_score(
                    q[b, h, i].double(),
                    k[b, h, j].double(),
                    float(positions[i] - positions[j]),
                    theta,
                    alpha,
                )
                for j in keys
            ]
        )

    return row
