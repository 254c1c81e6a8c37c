"""Source mixtures by tokens, with long-document upsampling: which training documents an epoch
packs, and how often each.

Given the training documents of ``S`` sources (one ``TokenCorpus`` each), normalised weights
``p_s`` and an optional upsampling (documents of at least ``min_tokens`` tokens weigh
``factor``, the others 1), an epoch holds as many tokens as the sources together,
``N = sum_s T_s``, of which source ``s`` supplies ``B_s = p_s N``. Inside source ``s`` document
``d`` (length ``L_d``, upsampling weight ``u_d``) is drawn ``c_d = B_s u_d / sum_e(u_e L_e)``
times in expectation: the integer part always, one more time with the probability of the
fraction (seeded), so the expected tokens of a source are exactly ``B_s`` and a document is
never drawn much more or less often than its share. Hence

- a source's achieved token fraction is ``p_s`` up to the rounding of its documents' counts;
- within a source, long documents hold ``f L_long / (f L_long + L_short)`` of its tokens
  instead of ``L_long / (L_long + L_short)`` (``L_long``, ``L_short``: its natural tokens in
  long and in short documents).

A small source with a large weight repeats its documents; a large one with a small weight
contributes a seeded subset. The drawn documents are shuffled together by the seed, so the plan
is a pure function of (lengths, weights, upsampling, seed) and is the same on every rank and
after a resume (the loader's cursor indexes the rows packed from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from longctx.data.config import LongUpsampling
from longctx.data.corpus import TokenCorpus
from longctx.errors import LongctxError


@dataclass(frozen=True)
class MixturePlan:
    """The documents one epoch packs, in order: draw ``k`` is document ``documents[k]`` of source
    ``sources[k]`` (both ``[draws]`` int64). ``natural_tokens`` / ``drawn_tokens`` (``[S]``) and
    ``long_*`` (tokens in documents at or above the upsampling threshold) feed ``describe``."""

    sources: np.ndarray
    documents: np.ndarray
    weights: np.ndarray  # [S] normalised
    natural_tokens: np.ndarray  # [S]
    drawn_tokens: np.ndarray  # [S]
    natural_long_tokens: int
    drawn_long_tokens: int

    def describe(self, names: Sequence[str], upsampling: LongUpsampling | None) -> str:
        """One line: tokens per source, achieved fraction against the weight, long share."""
        total = int(self.drawn_tokens.sum())
        parts = [
            f"{name} {drawn / total:.1%} (weight {weight:.2f}, {drawn} tokens from {natural})"
            for name, weight, natural, drawn in zip(
                names, self.weights, self.natural_tokens.tolist(), self.drawn_tokens.tolist()
            )
        ]
        line = f"data mixture, {total} training tokens an epoch: " + ", ".join(parts)
        if upsampling is not None:
            natural_share = self.natural_long_tokens / max(int(self.natural_tokens.sum()), 1)
            line += (
                f"; documents >= {upsampling.min_tokens} tokens upsampled x{upsampling.factor:g}: "
                f"{self.drawn_long_tokens / total:.1%} of tokens (natural {natural_share:.1%})"
            )
        return line


def plan_mixture(
    corpora: Sequence[TokenCorpus],
    weights: Sequence[float],
    upsampling: LongUpsampling | None,
    rng: np.random.Generator,
    names: Sequence[str],
) -> MixturePlan:
    """Draw one epoch's documents from ``corpora`` (see the module docstring); ``names`` name
    the sources in errors."""
    probs = np.asarray(weights, dtype=np.float64)
    probs = probs / probs.sum()
    lengths = [c.document_lengths().astype(np.int64) for c in corpora]
    natural = np.asarray([int(lens.sum()) for lens in lengths], dtype=np.int64)
    for name, prob, total in zip(names, probs, natural):
        if prob > 0 and total == 0:
            raise LongctxError(
                f"data source {name!r} has weight {prob:.2f} but no training documents (after "
                "the held-out split); add documents to it, lower data.eval_fraction or give it "
                "weight 0"
            )
    epoch_tokens = float(natural.sum())
    sources, documents = [], []
    drawn = np.zeros(len(corpora), dtype=np.int64)
    natural_long = drawn_long = 0
    for s, lens in enumerate(lengths):
        is_long = (
            np.zeros(len(lens), dtype=bool) if upsampling is None else lens >= upsampling.min_tokens
        )
        boost = np.where(is_long, 1.0 if upsampling is None else upsampling.factor, 1.0)
        natural_long += int(lens[is_long].sum())
        if probs[s] == 0:
            continue
        expected = probs[s] * epoch_tokens * boost / float((boost * lens).sum())  # [n_s]
        whole = np.floor(expected)
        counts = (whole + (rng.random(len(lens)) < expected - whole)).astype(np.int64)
        picked = np.repeat(np.arange(len(lens), dtype=np.int64), counts)
        sources.append(np.full(len(picked), s, dtype=np.int64))
        documents.append(picked)
        drawn[s] = int((counts * lens).sum())
        drawn_long += int((counts * lens)[is_long].sum())
    all_sources, all_documents = np.concatenate(sources), np.concatenate(documents)
    order = rng.permutation(len(all_sources))
    return MixturePlan(
        all_sources[order],
        all_documents[order],
        probs,
        natural,
        drawn,
        natural_long,
        drawn_long,
    )
